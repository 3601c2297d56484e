# SPDX-License-Identifier: MIT
"""SECURITY A2 (16 kinds of tampered, replayed or downgraded updates) and A6 (the pinned trust
anchor) against a real mosquitto, a real TUF repository and the real agent.

For every kind: the device refuses with a typed reason, its installed model is unchanged (same
sha256, the Updater idle on it, the store verifies) and still answers, and an ``update``
report with ``attack: true`` reaches the hub's subscriber (the birth says ``attack`` too).
The bad metadata is crafted with python-tuf's Metadata API on the repository's own files.
The root role has two keys and a threshold of 2.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from support.fleet import wait_until
from support.updates import Models, UpdateHub, build_models, greedy
from tuf.api.metadata import Metadata, MetaFile, Root

from edgellm.fleet.agent import Agent
from edgellm.fleet.slots import SlotStore
from edgellm.fleet.tuf_repo import TufRepo

DEV = "dev-000"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def hub(tmp_path: Path, models: Models) -> Iterator[UpdateHub]:
    with UpdateHub(tmp_path, models) as h:
        yield h


@pytest.fixture
def agent(hub: UpdateHub) -> Agent:
    return hub.agent(DEV)


def assert_unchanged(hub: UpdateHub, agent: Agent, sha: str, golden: str) -> None:
    """The model with sha is active, idle, verified on disk, and answers as before."""
    u = agent.updater
    assert u is not None and u.active is not None
    assert u.active.model_sha256 == sha
    assert u.journal()["state"] == "idle"
    store = SlotStore(u.root)
    assert store.read_pointer("current") == u.active
    store.verify(u.active)
    assert not list(store.staging.iterdir())
    assert greedy(agent.model_path()) == golden


def refused(hub: UpdateHub, agent: Agent, names: dict[str, str], reason: str | set[str], *,
            sha: str | None = None, golden: str | None = None) -> dict[str, Any]:
    """Offer names; the refusal is typed, marked as an attack, and changed nothing."""
    m = hub.models
    r = hub.offer_and_wait(agent, names)
    want = {reason} if isinstance(reason, str) else reason
    assert r["outcome"] == "refused" and r["reason"] in want and r["attack"] is True, r
    assert_unchanged(hub, agent, sha or Models.sha(m.b1), golden or m.golden1)
    assert agent.updates is not None and agent.updates.attack
    assert wait_until(lambda: any(b["attack"] for b in hub.births(DEV))), hub.births(DEV)
    return r


def _current(hub: UpdateHub, agent: Agent, tag: str) -> dict[str, str]:
    """Re-publish the running v1 (release 1) and offer it: the device refreshes its metadata
    and answers already_installed."""
    names = hub.publish(hub.models.b1, release=1, tag=tag)
    r = hub.offer_and_wait(agent, names)
    assert r["outcome"] == "already_installed" and r["attack"] is False, r
    return names


def _target_file(hub: UpdateHub, name: str) -> Path:
    p = hub.repo.target_file(name)
    assert p is not None and p.is_file()
    return p


def _resign_targets(repo: TufRepo, change: Any, signer: CryptoSigner | None = None) -> None:
    """A new targets version with change(md) applied, signed by the targets key (or signer),
    published through a new snapshot and timestamp."""
    md = repo.load("targets")
    change(md)
    md.signed.version += 1
    if signer is None:
        repo._write(md)
    else:
        md.signatures.clear()
        md.sign(signer)
        repo._write(md, sign=False)
    repo._publish_snapshot(md.signed.version)


# -- 1-3: the bundle's bytes ---------------------------------------------------------------------

def test_a2_01_byte_flip(hub: UpdateHub, agent: Agent) -> None:
    names = hub.publish(hub.models.b2, release=2)
    p = _target_file(hub, names["model"])
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    p.write_bytes(bytes(raw))
    refused(hub, agent, names, "hash_mismatch")


def test_a2_02_truncated(hub: UpdateHub, agent: Agent) -> None:
    names = hub.publish(hub.models.b2, release=2)
    p = _target_file(hub, names["model"])
    p.write_bytes(p.read_bytes()[:-4096])
    refused(hub, agent, names, "length_mismatch")


def test_a2_03_appended(hub: UpdateHub, agent: Agent) -> None:
    names = hub.publish(hub.models.b2, release=2)
    p = _target_file(hub, names["model"])
    with open(p, "ab") as f:
        f.write(b"\0" * 100)
    refused(hub, agent, names, "length_mismatch")


# -- 4-6: what the metadata says and who signed it --------------------------------------------------

def test_a2_04_right_hash_wrong_length(hub: UpdateHub, agent: Agent) -> None:
    names = hub.publish(hub.models.b2, release=2)

    def shorter(md: Metadata[Any]) -> None:
        md.signed.targets[names["model"]].length -= 1000  # the sha256 stays right

    _resign_targets(hub.repo, shorter)
    refused(hub, agent, names, "length_mismatch")


def test_a2_05_unknown_key(hub: UpdateHub, agent: Agent) -> None:
    names = hub.publish(hub.models.b2, release=2)
    rogue = CryptoSigner.generate_ed25519()

    def bump(md: Metadata[Any]) -> None:
        md.signed.targets[names["model"]].unrecognized_fields["custom"]["release"] = 99

    _resign_targets(hub.repo, bump, signer=rogue)
    refused(hub, agent, names, "bad_signature")


def test_a2_06_under_threshold_and_a_key_counted_twice(hub: UpdateHub, agent: Agent) -> None:
    repo = hub.repo
    assert repo.load("root").signed.roles["root"].threshold == 2
    names = hub.publish(hub.models.b2, release=2)
    rogue = CryptoSigner.generate_ed25519()
    root = repo.load("root")
    root.signed.version += 1  # a root that hands the targets role to the attacker's key
    for keyid in list(root.signed.roles["targets"].keyids):
        root.signed.revoke_key(keyid, "targets")
    root.signed.add_key(rogue.public_key, "targets")
    root.signatures.clear()
    root.sign(repo.signers["root"][0])  # one of the two signatures needed
    path = repo._write(root, sign=False)
    refused(hub, agent, names, "bad_signature")
    # the same signature listed twice: one key counts once (spec 5.3.4)
    doc = json.loads(path.read_bytes())
    assert len(doc["signatures"]) == 1
    doc["signatures"] = doc["signatures"] * 2
    path.write_bytes(json.dumps(doc).encode())
    r = refused(hub, agent, names, {"bad_signature", "repository"})
    assert agent.updates is not None
    assert "signature" in r["detail"].lower() or "keyid" in r["detail"].lower(), r


# -- 7-11: freshness ------------------------------------------------------------------------------

def test_a2_07_replayed_timestamp(hub: UpdateHub, agent: Agent) -> None:
    old = (hub.repo.metadata_dir / "timestamp.json").read_bytes()
    names = hub.publish(hub.models.b2, release=2)
    _current(hub, agent, "a")  # the device now trusts a newer timestamp
    (hub.repo.metadata_dir / "timestamp.json").write_bytes(old)
    refused(hub, agent, names, "rollback")


def test_a2_08_rolled_back_snapshot_and_targets(hub: UpdateHub, agent: Agent) -> None:
    repo = hub.repo
    names = hub.publish(hub.models.b2, release=2)
    _current(hub, agent, "a")
    snap = repo.load("snapshot").signed.version
    targets = repo.load("targets").signed.version
    # a fresh timestamp naming the previous snapshot
    repo.refresh_timestamp(snapshot_version=snap - 1)
    refused(hub, agent, names, "rollback")
    # a fresh snapshot (and timestamp) naming the previous targets
    md = repo.load("snapshot")
    md.signed.version += 1
    md.signed.meta["targets.json"] = MetaFile(version=targets - 1)
    repo._write(md)
    repo.refresh_timestamp(snapshot_version=md.signed.version)
    refused(hub, agent, names, "rollback")


def test_a2_09_expired_freeze(hub: UpdateHub, agent: Agent) -> None:
    names = hub.publish(hub.models.b2, release=2)
    past = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(hours=1)
    hub.repo.refresh_timestamp(expires=past)
    refused(hub, agent, names, "expired")


def test_a2_10_mix_and_match(hub: UpdateHub, agent: Agent) -> None:
    repo = hub.repo
    hub.publish(hub.models.b1, release=1, tag="a")
    old_targets = (repo.metadata_dir / f"{repo.load('targets').signed.version}.targets.json")
    old = old_targets.read_bytes()
    names = hub.publish(hub.models.b2, release=2)
    n = repo.load("targets").signed.version
    new_path = repo.metadata_dir / f"{n}.targets.json"
    # snapshot N+1 binds targets N by hash; the mirror serves the previous targets under it
    md = repo.load("snapshot")
    md.signed.version += 1
    md.signed.meta["targets.json"] = MetaFile(version=n, hashes={
        "sha256": __import__("hashlib").sha256(new_path.read_bytes()).hexdigest()})
    repo._write(md)
    repo.refresh_timestamp(snapshot_version=md.signed.version)
    new_path.write_bytes(old)
    refused(hub, agent, names, "hash_mismatch")


def test_a2_11_fast_forward_then_recovery_by_key_rotation(hub: UpdateHub, agent: Agent) -> None:
    repo = hub.repo
    names1 = _current(hub, agent, "a")
    ts_path = repo.metadata_dir / "timestamp.json"
    legit = ts_path.read_bytes()
    # the compromised timestamp key signs version 10^6; the device takes it (validly signed)
    ff = repo.load("timestamp")
    ff.signed.version = 10**6
    repo._write(ff)
    r = hub.offer_and_wait(agent, names1)
    assert r["outcome"] == "already_installed", r
    ts_path.write_bytes(legit)  # the hub never knew: its own counter goes on from legit
    names = hub.publish(hub.models.b2, release=2)
    refused(hub, agent, names, "rollback")
    # recovery (spec 5.3.11): a new root (both root keys) rotates the timestamp key
    fresh = CryptoSigner.generate_ed25519()
    root = repo.load("root")
    root.signed.version += 1
    for keyid in list(root.signed.roles["timestamp"].keyids):
        root.signed.revoke_key(keyid, "timestamp")
    root.signed.add_key(fresh.public_key, "timestamp")
    repo._write(root)
    repo.signers["timestamp"] = [fresh]
    repo.refresh_timestamp()
    r = hub.offer_and_wait(agent, names, outcome="committed")
    assert r["attack"] is False and r["release"] == 2
    assert agent.updater is not None and agent.updater.active is not None
    assert agent.updater.active.model_sha256 == Models.sha(hub.models.b2)
    assert agent.updates is not None and not agent.updates.attack  # cleared by the commit


# -- 12-14, 16: the target policy and the delta's base ------------------------------------------------

def test_a2_12_lower_release_counter(hub: UpdateHub, agent: Agent) -> None:
    m = hub.models
    r = hub.offer_and_wait(agent, hub.publish(m.b2, release=5), outcome="committed")
    assert r["release"] == 5
    assert agent.updates is not None and agent.updates.installed is not None
    assert agent.updates.installed.release == 5
    state = json.loads((agent.cfg.state_dir / "updates.json").read_bytes())
    assert state["installed"]["release"] == 5  # durable
    golden2 = greedy(m.b2.folder / "model.gguf")
    refused(hub, agent, hub.publish(m.b3, release=3), "release_downgrade",
            sha=Models.sha(m.b2), golden=golden2)
    # the same counter for other bytes is a downgrade too
    refused(hub, agent, hub.publish(m.b3, release=5, tag="x"), "release_downgrade",
            sha=Models.sha(m.b2), golden=golden2)


def test_a2_13_wrong_board(hub: UpdateHub, agent: Agent) -> None:
    refused(hub, agent, hub.publish(hub.models.b2, release=2, board="jetson-orin-nano"),
            "wrong_board")


def test_a2_14_another_devices_target(hub: UpdateHub, agent: Agent) -> None:
    refused(hub, agent, hub.publish(hub.models.b2, release=2, devices=["dev-001", "dev-002"]),
            "wrong_device")


def test_a2_16_delta_against_the_wrong_base(hub: UpdateHub, agent: Agent) -> None:
    m = hub.models
    # signed as a delta from the active v1, but built from v3: refused before any write, and
    # the release is not trusted any further (no fallback to its bundle)
    names = hub.publish(m.b2, release=2, delta=m.delta32, delta_base=Models.sha(m.b1))
    refused(hub, agent, names, "base_mismatch")


# -- 15: endless data -------------------------------------------------------------------------

def test_a2_15_endless_data(hub: UpdateHub, agent: Agent) -> None:
    names = hub.publish(hub.models.b2, release=2)
    ts = hub.repo.metadata_dir / "timestamp.json"
    legit = ts.read_bytes()
    ts.write_bytes(legit + b" " * 20_000)  # over UpdaterConfig.timestamp_max_length (16 KiB)
    refused(hub, agent, names, "length_mismatch")
    ts.write_bytes(legit)
    p = _target_file(hub, names["model"])
    with open(p, "ab") as f:  # a target stream far past its signed length
        f.write(os.urandom(1 << 20))
    refused(hub, agent, names, "length_mismatch")


# -- A6: the trust anchor is the provisioned root ------------------------------------------------------

def test_a6_cached_root_corruptions_change_nothing(hub: UpdateHub, agent: Agent,
                                                    tmp_path: Path) -> None:
    m = hub.models
    _current(hub, agent, "a")
    md = agent.cfg.state_dir / "tuf" / "metadata"
    cached = md / "root.json"
    provisioned = agent.cfg.tuf_root
    assert provisioned is not None and cached.is_symlink()
    # an attacker's root: its own keys for every role, version 2 (so it also looks "newer")
    evil_key = CryptoSigner.generate_ed25519()
    evil = Metadata(Root(version=2))
    for role in ("root", "targets", "snapshot", "timestamp"):
        evil.signed.add_key(evil_key.public_key, role)
    evil.sign(evil_key)
    evil_bytes = evil.to_bytes()
    elsewhere = tmp_path / "evil-root.json"
    elsewhere.write_bytes(evil_bytes)

    def different() -> None:
        cached.unlink()
        cached.write_bytes(evil_bytes)
        (md / "root_history" / "2.root.json").write_bytes(evil_bytes)

    def truncated() -> None:
        data = cached.read_bytes()
        cached.unlink()
        cached.write_bytes(data[:100])

    def symlink_swap() -> None:
        cached.unlink()
        cached.symlink_to(elsewhere)

    for i, corrupt in enumerate((different, truncated, symlink_swap)):
        corrupt()
        r = hub.offer_and_wait(agent, hub.publish(m.b1, release=1, tag=f"c{i}"))
        # the hub's metadata still verifies: the provisioned root is the one trusted
        assert r["outcome"] == "already_installed" and r["attack"] is False, (corrupt, r)
        assert cached.is_symlink() and cached.resolve().read_bytes() == provisioned.read_bytes()
        assert_unchanged(hub, agent, Models.sha(m.b1), m.golden1)
    assert agent.updates is not None and not agent.updates.attack
    r = hub.offer_and_wait(agent, hub.publish(m.b2, release=2), outcome="committed")
    assert agent.updater is not None and agent.updater.active is not None
    assert agent.updater.active.model_sha256 == Models.sha(m.b2)
