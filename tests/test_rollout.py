# SPDX-License-Identifier: MIT
"""Releases and rollouts at the hub (issue 6, part 5): wave logic and halting on real SQLite,
publishing signed targets into a real TUF repository, the protocol's offer and update
messages, the hub service's offers against a real mosquitto, and the CLI with its errors."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support.fleet import Inbox, close, device_client, make_home, running_broker
from support.releases import DEMO_LEAF_Q4, stories_bundles
from tuf.api.metadata import Metadata

from edgellm.boards import UnknownBoardError
from edgellm.cli import main
from edgellm.errors import (
    InvalidArgumentError,
    ReleaseError,
    RolloutError,
    UnknownDeviceError,
)
from edgellm.fleet import protocol, rollout, store
from edgellm.fleet.health import HealthSpec
from edgellm.fleet.home import HubHome
from edgellm.fleet.protocol import ProtocolError
from edgellm.fleet.release import (
    health_custom,
    keep_fresh,
    publish_release,
    release_lock,
    target_names,
)
from edgellm.fleet.service import HubService
from edgellm.fleet.tuf_repo import TufRepo
from edgellm.hub.registry import NewBuild, NewVersion, Registry

NOW = 1_764_000_000.0
NODE = "stories"
DEVS = [f"dev-{i:03d}" for i in range(20)]


# --------------------------------------------------------------------------------------
# Shares and wave plans


@pytest.mark.parametrize("text, share", [("10%", 0.1), ("0.1", 0.1), ("10", 0.1), ("100%", 1.0),
                                         ("0%", 0.0), (" 2.5% ", 0.025), ("1", 1.0)])
def test_parse_share(text: str, share: float) -> None:
    assert rollout.parse_share(text) == pytest.approx(share)


@pytest.mark.parametrize("text", ["ten", "120%", "-5%", "nan", "", "%"])
def test_parse_share_refuses(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        rollout.parse_share(text)


def test_parse_waves_and_plans() -> None:
    assert rollout.parse_waves("10%,50%,100%") == [0.1, 0.5, 1.0]
    assert rollout.parse_waves("5%,25%") == [0.05, 0.25, 1.0]  # the rest is the last wave
    for bad in ("50%,10%", "0%,100%", "10%,10%", ",", "x"):
        with pytest.raises(InvalidArgumentError):
            rollout.parse_waves(bad)
    assert rollout.plan_waves(20, [0.1, 1.0]) == [2, 20]
    assert rollout.plan_waves(200, [0.1, 0.5, 1.0]) == [20, 100, 200]
    assert rollout.plan_waves(3, [0.1, 1.0]) == [1, 3]  # a canary is at least one device
    assert rollout.plan_waves(1, [0.1, 1.0]) == [1]  # a wave that adds nobody is dropped
    assert rollout.plan_waves(5, [0.1, 0.2, 0.3, 1.0]) == [1, 2, 3, 5]
    assert rollout.plan_waves(10, [0.5]) == [5, 10]  # the last wave covers everyone


# --------------------------------------------------------------------------------------
# Wave logic on a real SQLite file


def update_msg(device: str, outcome: str, *, rid: int | None = 1, release: int = 2,
               reason: str = "ok", attack: bool = False, rep: str | None = None
               ) -> dict[str, Any]:
    msg = {"type": "update", "device": device, "id": rep or f"bundle-v2-{device}.{outcome}",
           "rollout": rid, "node": NODE, "version": 2, "release": release, "outcome": outcome,
           "reason": reason, "detail": "", "attack": attack, "hour": int(NOW // 3600)}
    return protocol.decode(protocol.encode(msg))


class Db:
    """A hub database with release 2 of NODE and helpers to drive its rollouts."""

    def __init__(self, path: Path) -> None:
        self.conn = store.connect(path)
        self.fleet = store.FleetStore(self.conn)
        with self.conn:
            for rel in (2, 3):
                self.conn.execute(
                    "INSERT INTO fleet_releases (node, release, version, board, model_sha256, "
                    "targets, source, health, created_at) VALUES (?, ?, 2, 'rpi5', ?, ?, '', 1, ?)",
                    (NODE, rel, "a" * 64, json.dumps({"manifest": f"s.r{rel}.json",
                                                      "model": f"s.r{rel}.gguf"}), NOW))

    def create(self, devices: list[str] = DEVS, shares: tuple[float, ...] = (0.1, 1.0),
               halt_at: float = 0.2, release: int = 2, board: str = "rpi5", **kw: Any) -> int:
        with self.conn:
            return rollout.create(self.conn, node=NODE, release=release, version=2,
                                  board=board, devices=devices, shares=shares, halt_at=halt_at,
                                  now=NOW, **kw)

    def offer_due(self, now: float = NOW) -> list[str]:
        """Send what is due (as the service does); the devices offered."""
        with self.conn:
            rollout.tick(self.conn, now)
        due = rollout.due_offers(self.conn)
        with self.conn:
            rollout.mark_offered(self.conn, due, now)
        return sorted(o.device for o in due)

    def report(self, device: str, outcome: str, now: float = NOW, **kw: Any) -> str | None:
        msg = update_msg(device, outcome, **kw)
        with self.conn:
            rid = rollout.match(self.conn, device, msg)
            if self.fleet.update_report(device, msg, now, rid) == "duplicate":
                return "duplicate"
            return rollout.on_report(self.conn, device, msg, rid, now)

    def status(self, rid: int = 1) -> dict[str, Any]:
        return rollout.status(self.conn, rid)


@pytest.fixture
def db(tmp_path: Path) -> Db:
    return Db(tmp_path / "hub.db")


def test_canary_then_the_rest_then_done(db: Db) -> None:
    rid = db.create()
    canary = db.offer_due()
    assert len(canary) == 2 and db.offer_due() == []  # offered once, not again
    st = db.status(rid)
    assert st["state"] == "active" and st["wave"] == 1
    assert [w["devices"] for w in st["waves"]] == [2, 18]
    assert db.report(canary[0], "committed") is None  # the wave is still under way
    assert db.offer_due() == []
    assert db.report(canary[1], "already_installed") == "next"  # both count as success
    rest = db.offer_due()
    assert len(rest) == 18 and not set(rest) & set(canary)
    for d in rest[:-1]:
        assert db.report(d, "committed") is None
    assert db.report(rest[-1], "committed") == "done"
    st = db.status(rid)
    assert st["state"] == "done" and st["counts"] == {"committed": 19, "already_installed": 1}
    assert db.offer_due() == []


def test_failing_canary_halts_and_no_further_wave_is_offered(db: Db) -> None:
    rid = db.create()
    canary = db.offer_due()
    assert db.report(canary[0], "rolled_back", reason="wrong_output") == "halt"  # 1 > 20% of 2
    st = db.status(rid)
    assert st["state"] == "halted" and "wave 1: 1 of 1 reported failed" in st["reason"]
    assert db.offer_due(NOW + 3600) == []
    assert db.report(canary[1], "committed") is None  # a halted rollout stays halted
    assert db.offer_due() == [] and db.status(rid)["state"] == "halted"
    assert rollout.resend_offers(db.conn, canary[1]) == []  # no re-sends either
    with db.conn:  # by hand: accept the canary, go on
        rollout.resume(db.conn, rid, NOW + 10)
    assert len(db.offer_due()) == 18 and db.status(rid)["wave"] == 2


def test_halt_share_is_strictly_above(db: Db) -> None:
    rid = db.create(devices=DEVS[:10], shares=(0.5, 1.0), halt_at=0.2)
    first = db.offer_due()
    assert len(first) == 5
    assert db.report(first[0], "refused", reason="wrong_board", attack=True) is None  # 1 = 20%
    for d in first[1:]:
        db.report(d, "committed")
    assert db.status(rid)["wave"] == 2  # 1 of 5 is not above 20 %: the next wave started
    second = db.offer_due()
    assert len(second) == 5
    assert db.report(second[0], "rolled_back") is None
    # a second failure: 2 of 5 can only end above 20 %, halted before the others report
    assert db.report(second[1], "refused") == "halt"
    st = db.status(rid)
    assert st["state"] == "halted" and st["waves"][1]["failed"] == 2
    assert [d for d in st["devices"] if d["attack"]] == [
        {"device": first[0], "wave": 1, "state": "refused", "offers": 1, "reason": "wrong_board",
         "detail": "", "attack": 1}]
    assert db.conn.execute("SELECT attack FROM fleet_devices WHERE device = ?",
                           (first[0],)).fetchone()[0] == 1


def test_halt_at_zero_and_waves(db: Db) -> None:
    rid = db.create(shares=(0.1, 0.5, 1.0), halt_at=0.0)
    assert [w["devices"] for w in db.status(rid)["waves"]] == [2, 8, 10]
    for d in db.offer_due():
        db.report(d, "committed")
    second = db.offer_due()
    assert len(second) == 8
    assert db.report(second[0], "rolled_back") == "halt"  # any failure at 0 %


def test_wave_timeout_moves_on_without_silent_devices(db: Db) -> None:
    rid = db.create(wave_timeout=60.0)
    canary = db.offer_due()
    db.report(canary[0], "committed")
    assert db.offer_due(NOW + 59) == []
    assert len(db.offer_due(NOW + 61)) == 18  # the silent canary did not block it
    assert db.status(rid)["wave"] == 2
    st = rollout.status(db.conn, rid)
    assert {d["device"]: d["state"] for d in st["devices"]}[canary[1]] == "offered"
    rid2 = db.create(release=3, wave_timeout=1.0)  # nobody reported: a timeout alone waits
    assert len(db.offer_due()) == 2 and db.offer_due(NOW + 100) == []
    assert rollout.status(db.conn, rid2)["wave"] == 1


def test_manual_halt_resume_and_errors(db: Db) -> None:
    rid = db.create()
    with db.conn:
        rollout.halt(db.conn, rid, NOW, "by the ward's IT")
    assert db.offer_due() == []
    with pytest.raises(RolloutError, match="only an active one"):
        rollout.halt(db.conn, rid, NOW)
    with db.conn:
        rollout.resume(db.conn, rid, NOW)
    assert len(db.offer_due()) == 2 and db.status(rid)["wave"] == 1  # nothing was skipped
    with pytest.raises(RolloutError, match="only a halted one"):
        rollout.resume(db.conn, rid, NOW)
    with pytest.raises(RolloutError, match="no rollout 99"):
        rollout.status(db.conn, 99)
    with pytest.raises(InvalidArgumentError, match="nothing to roll out"):
        db.create(devices=[])


def test_reports_dedupe_match_and_resend(db: Db) -> None:
    rid = db.create(devices=DEVS[:2], shares=(1.0,))
    assert db.offer_due() == DEVS[:2]
    assert [o.device for o in rollout.resend_offers(db.conn, DEVS[0])] == [DEVS[0]]
    with db.conn:
        rollout.mark_offered(db.conn, rollout.resend_offers(db.conn, DEVS[0]), NOW)
    assert {d["device"]: d["offers"] for d in db.status(rid)["devices"]} == {DEVS[0]: 2,
                                                                          DEVS[1]: 1}
    # no rollout in the report (the device found the release on its own): matched by release
    assert db.report(DEVS[0], "committed", rid=None, rep="r1") is None
    assert db.report(DEVS[0], "committed", rid=None, rep="r1") == "duplicate"  # QoS 1 re-send
    assert rollout.resend_offers(db.conn, DEVS[0]) == []  # answered: nothing to re-send
    assert db.report(DEVS[1], "committed", rid=None, release=7) is None  # another release
    assert db.status(rid)["counts"] == {"committed": 1, "offered": 1}
    rows = db.conn.execute("SELECT device, id, rollout FROM fleet_updates ORDER BY device").fetchall()
    assert [tuple(r) for r in rows] == [(DEVS[0], "r1", rid),
                                        (DEVS[1], f"bundle-v2-{DEVS[1]}.committed", None)]


def test_a_birth_with_the_new_version_needs_no_resend_and_a_commit_sticks(db: Db) -> None:
    rid = db.create(devices=DEVS[:2], shares=(1.0,))
    db.offer_due()
    birth = {"type": "birth", "device": DEVS[0], "bdSeq": 3, "hour": 1, "board": "rpi5",
             "node": NODE, "version": 2, "adapter": None, "runtime": "edgellm-0.1"}
    with db.conn:  # the device committed and was born again before its report arrived
        db.fleet.birth(DEVS[0], protocol.decode(protocol.encode(birth)), NOW)
    assert rollout.resend_offers(db.conn, DEVS[0]) == []
    assert [o.device for o in rollout.resend_offers(db.conn, DEVS[1])] == [DEVS[1]]
    db.report(DEVS[0], "committed", now=NOW + 1)
    db.report(DEVS[0], "already_installed", now=NOW + 2)  # an offer re-sent after the commit
    dev = {d["device"]: d for d in db.status(rid)["devices"]}[DEVS[0]]
    assert dev["state"] == "committed"
    db.report(DEVS[0], "rolled_back", now=NOW + 3, rep="boot-loop")  # a later failure counts
    assert {d["device"]: d for d in db.status(rid)["devices"]}[DEVS[0]]["state"] == "rolled_back"


def test_a_new_release_supersedes_the_old_rollout(db: Db) -> None:
    old = db.create()
    db.offer_due()
    new = db.create(release=3)
    assert db.status(old)["state"] == "superseded"
    offered = rollout.due_offers(db.conn)
    assert {o.rollout for o in offered} == {new}
    assert offered[0].targets == {"manifest": "s.r3.json", "model": "s.r3.gguf"}
    assert rollout.offer_message(offered[0]) == {
        "type": "offer", "rollout": new, "targets": {"manifest": "s.r3.json", "model": "s.r3.gguf"}}
    text = rollout.format_status(rollout.rollouts(db.conn))
    assert f"rollout {new}: stories v2 (release 3) for rpi5: active" in text
    assert "superseded by release 3" in text


def test_a_release_for_every_board_and_one_for_a_board_supersede_each_other(db: Db) -> None:
    # else the hub keeps re-sending the older offer on births and devices refuse it as a
    # release_downgrade (attack=true)
    with db.conn:
        for rel in (4, 5):
            db.conn.execute(
                "INSERT INTO fleet_releases (node, release, version, board, model_sha256, "
                "targets, source, health, created_at) VALUES (?, ?, 2, 'rpi5', ?, ?, '', 1, ?)",
                (NODE, rel, "a" * 64, json.dumps({"model": f"s.r{rel}.gguf"}), NOW))
    rpi5 = db.create(DEVS[:10], release=2, board="rpi5")
    jetson = db.create(DEVS[10:], release=3, board="jetson-orin-nano")
    assert db.status(rpi5)["state"] == "active"  # other boards do not touch each other
    star = db.create(release=4, board="*")
    assert [db.status(r)["state"] for r in (rpi5, jetson)] == ["superseded"] * 2
    assert db.status(rpi5)["reason"] == "superseded by release 4"
    again = db.create(DEVS[:10], release=5, board="rpi5")
    assert db.status(star)["state"] == "superseded"
    assert {o.rollout for o in rollout.due_offers(db.conn)} == {again}


def test_migration_2_brings_an_old_database_forward(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    from edgellm.hub import db as hubdb
    conn = hubdb.connect(path, {"fleet": store.MIGRATIONS[:1]})
    with conn:
        conn.execute("INSERT INTO fleet_devices (device, last_seen_hour) VALUES ('dev-000', 1)")
    conn.close()
    conn = store.connect(path)
    assert hubdb.schema_version(conn, "fleet") == 2
    assert dict(conn.execute("SELECT device, attack FROM fleet_devices").fetchone()) == {
        "device": "dev-000", "attack": 0}
    for t in ("fleet_releases", "fleet_rollouts", "fleet_rollout_devices", "fleet_updates"):
        assert conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] == 0
    conn.close()


# --------------------------------------------------------------------------------------
# The protocol's messages


def test_offer_update_and_birth_schemas() -> None:
    offer = {"type": "offer", "rollout": 3, "targets": {"manifest": "a.v2.r3.rpi5.json",
                                                        "model": "a.v2.r3.rpi5.gguf"}}
    assert protocol.decode(protocol.encode(offer))["targets"]["model"] == "a.v2.r3.rpi5.gguf"
    for bad in ({"manifest": "x.json"}, {"manifest": "../x", "model": "m"},
                {"manifest": "a", "model": "b", "extra": "c"}):
        with pytest.raises(ProtocolError):
            protocol.encode({**offer, "targets": bad})
    rep = update_msg("dev-001", "rolled_back", reason="nan")
    del rep["device"]  # optional: the topic names the sender
    assert protocol.decode(protocol.encode(rep))["outcome"] == "rolled_back"
    for key, bad in (("outcome", "exploded"), ("reason", "Bad Reason"), ("attack", 1),
                     ("detail", "x" * 201), ("detail", "patient Ana\u00efs"), ("rollout", -1),
                     ("release", "3")):
        with pytest.raises(ProtocolError):
            protocol.encode({**rep, key: bad})
    birth = {"type": "birth", "device": "dev-001", "bdSeq": 0, "hour": 1, "board": "rpi5",
             "node": NODE, "version": 1, "adapter": None, "runtime": "edgellm-0.1"}
    assert "attack" not in protocol.decode(protocol.encode(birth))  # old agents: still valid
    assert protocol.decode(protocol.encode({**birth, "attack": True}))["attack"] is True
    with pytest.raises(ProtocolError):
        protocol.encode({**birth, "attack": "yes"})


# --------------------------------------------------------------------------------------
# Publishing: signed targets, counters, names, errors


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return stories_bundles(tmp_path_factory.mktemp("stories"), node=NODE, versions=3)


def new_home(tmp_path: Path, n: int = 20, node: str = NODE, **kw: Any) -> HubHome:
    home = HubHome.init(tmp_path / "hub", host="127.0.0.1", port=18999, **kw)
    for d in DEVS[:n]:
        home.add_device(d, board="rpi5", node=node)
    return home


def signed_targets(home: HubHome) -> dict[str, Any]:
    md = Metadata.from_file(str(TufRepo.open(home).metadata_dir / "timestamp.json"))
    assert md.signed.expires.timestamp() > time.time()
    return {n: t.unrecognized_fields["custom"] for n, t in
            TufRepo.open(home).load("targets").signed.targets.items()}


def test_hub_init_makes_the_tuf_repo_and_every_device_gets_its_root(tmp_path: Path) -> None:
    home = new_home(tmp_path, n=2, root_keys=3, root_threshold=2)
    root = Metadata.from_file(str(home.root / "tuf" / "metadata" / "1.root.json"))
    assert len(root.signed.roles["root"].keyids) == 3 and root.signed.roles["root"].threshold == 2
    assert len(root.signatures) == 3 and len(list((home.keys_dir / "root").glob("*.pem"))) == 3
    for d in DEVS[:2]:
        assert (home.device_dir(d) / "provisioned-root.json").read_bytes() == \
            (home.root / "tuf" / "metadata" / "1.root.json").read_bytes()
    with pytest.raises(InvalidArgumentError, match="threshold"):
        HubHome.init(tmp_path / "h2", root_keys=1, root_threshold=2)
    again = HubHome.init(tmp_path / "hub", port=18998, force=True)  # new keys, new root
    assert len(list((again.keys_dir / "root").glob("*.pem"))) == 1
    assert not list((again.root / "devices").iterdir())


def test_publish_signs_every_target_with_the_contract_fields(tmp_path: Path,
                                                            bundles: list[Any]) -> None:
    home = new_home(tmp_path)
    b1, b2, _ = bundles
    r1 = publish_release(home, NODE, 1, bundle=b1.folder, start_rollout=False)
    assert r1.release == 1 and r1.rollout is None and r1.board == "rpi5"
    r2 = publish_release(home, NODE, 2, bundle=b2.folder, delta_from=1, halt_at=0.3)
    assert r2.release == 2 and r2.rollout is not None and r2.waves == [2, 20]
    assert sorted(r2.devices) == DEVS
    names = target_names(NODE, 2, 2, "rpi5", 1)
    assert names["adapter"] == "stories.v2.r2.rpi5.adapter.patch"
    assert r2.targets == {k: v for k, v in names.items() if k != "adapter"} == {
        "model": "stories.v2.r2.rpi5.gguf", "manifest": "stories.v2.r2.rpi5.json",
        "delta": "stories.v2.r2.rpi5.from-v1.patch"}
    long = target_names("en/medical/cardiology/paediatric/congenital/rare", 12, 345, "rpi5", 11)
    assert all(protocol.TARGET_NAME.fullmatch(n) for n in long.values())
    assert r2.sizes["delta"] < r2.sizes["model"] / 10  # two tensors changed
    custom = signed_targets(home)
    assert set(custom) == {*r1.targets.values(), *r2.targets.values()}
    sha2 = b2.file("model.gguf").sha256
    for kind, name in r2.targets.items():
        c = custom[name]
        assert {k: c[k] for k in ("node", "version", "release", "board", "kind",
                                  "model_sha256")} == {
            "node": NODE, "version": 2, "release": 2, "board": "rpi5", "kind": kind,
            "model_sha256": sha2}
        assert "devices" not in c  # every device of the node and board
        spec = HealthSpec.from_dict({k: float(v) if k in ("min_agreement", "max_ms_per_token",
                                                          "timeout_s", "interval_s") else v
                                     for k, v in c["health"].items()})
        assert spec == r2.health and len(spec.expected) == 16
    assert custom[r2.targets["delta"]]["base_sha256"] == b1.file("model.gguf").sha256
    # the counter only goes up, also for an earlier version (a deliberate downgrade)
    r3 = publish_release(home, NODE, 1, bundle=b1.folder, devices=DEVS[:3], health=False)
    assert r3.release == 3 and r3.waves == [1, 3] and "health" not in \
        signed_targets(home)[r3.targets["model"]]
    assert signed_targets(home)[r3.targets["model"]]["devices"] == DEVS[:3]
    conn = store.connect(home.registry_db)
    assert [r["state"] for r in rollout.rollouts(conn)] == ["active", "superseded"]
    conn.close()
    # one targets version per release: root, then targets 2 (r1), 3 (r2), 4 (r3)
    assert TufRepo.open(home).load("targets").signed.version == 4


def test_adapter_release_and_expiring_metadata(tmp_path: Path, bundles: list[Any]) -> None:
    import datetime as dt

    import numpy as np
    from support.bundles import small_adapter

    from edgellm.formats.bundle import sha256_file

    home = new_home(tmp_path, n=2)
    b1 = bundles[0]
    lora = small_adapter(b1.model_path, tmp_path / "lora.gguf", np.random.default_rng(0))
    rel = publish_release(home, NODE, 1, bundle=b1.folder, adapter=lora)
    assert set(rel.targets) == {"model", "manifest", "adapter"}
    c = signed_targets(home)[rel.targets["adapter"]]
    sha1 = b1.file("model.gguf").sha256
    assert c["kind"] == "adapter" and c["model_sha256"] == c["base_sha256"] == sha1
    assert c["adapter_sha256"] == sha256_file(lora)
    assert rel.health is not None  # recorded with the adapter attached
    # online metadata is re-signed before it expires; nothing while it is fresh
    repo = TufRepo.open(home)
    assert repo.refresh_expiring() == []
    now = dt.datetime.now(dt.timezone.utc)
    ts = repo.load("timestamp").signed.version
    assert repo.refresh_expiring(now + dt.timedelta(hours=13)) == ["timestamp"]
    assert repo.load("timestamp").signed.version == ts + 1
    assert repo.refresh_expiring(now + dt.timedelta(days=6)) == ["snapshot", "timestamp"]
    tv = repo.load("targets").signed.version
    assert repo.refresh_expiring(now + dt.timedelta(days=85)) == ["targets", "snapshot",
                                                                 "timestamp"]
    assert repo.load("targets").signed.version == tv + 1
    assert set(signed_targets(home)) == set(rel.targets.values())  # the same targets


def test_keep_fresh_never_waits_for_a_release_in_progress(tmp_path: Path) -> None:
    # the service calls it from its loop: waiting for a long `hub release --delta-from`
    # would stop its TUF answers, acks and offers for minutes
    home = new_home(tmp_path, n=0)
    got: list[Any] = []
    with release_lock(home):  # a `hub release` holds the repository
        t = threading.Thread(target=lambda: got.append(keep_fresh(home)), daemon=True)
        t.start()
        t.join(10)
        waited = t.is_alive()
    t.join()
    assert not waited and got == [None]  # busy: skipped, the next look re-signs
    assert keep_fresh(home) == []  # free again (and nothing expires soon)


def test_a_target_is_signed_as_stored_even_if_its_source_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgellm.fleet import tuf_repo

    home = new_home(tmp_path, n=0)
    src = tmp_path / "model.gguf"
    src.write_bytes(b"v1" * 4096)

    class Racing(tuf_repo.TargetFile):  # the source is rewritten right after a hash
        @classmethod
        def from_file(cls, *args: Any, **kw: Any) -> Any:
            tf = super().from_file(*args, **kw)
            src.write_bytes(b"v2" * 4096)
            return tf

    monkeypatch.setattr(tuf_repo, "TargetFile", Racing)
    repo = TufRepo.open(home)
    repo.add_target(src, {"node": NODE, "version": 1, "release": 1, "board": "rpi5",
                          "kind": "model"}, name="s.v1.r1.rpi5.gguf")
    signed = repo.load("targets").signed.targets["s.v1.r1.rpi5.gguf"]
    stored = repo.target_file("s.v1.r1.rpi5.gguf")
    assert stored is not None and stored.exists()
    data = stored.read_bytes()
    assert hashlib.sha256(data).hexdigest() == signed.hashes["sha256"]
    assert len(data) == signed.length and data == b"v1" * 4096
    assert not list(repo.targets_dir.glob(".*.tmp"))


def test_health_custom_is_signable_and_round_trips() -> None:
    spec = HealthSpec("Once", (1, 2, 3), min_agreement=0.75, max_ms_per_token=250.0,
                      timeout_s=30.0, interval_s=0.5)
    c = health_custom(spec)
    assert c["min_agreement"] == "0.75" and c["max_ms_per_token"] == 250 and \
        c["interval_s"] == "0.5"
    assert not any(isinstance(v, float) for v in c.values())
    from securesystemslib.formats import encode_canonical
    assert encode_canonical(c)


def test_release_errors(tmp_path: Path, bundles: list[Any]) -> None:
    home = new_home(tmp_path, n=2)
    b1, b2, _ = bundles
    with pytest.raises(ReleaseError, match="holds stories v1, not stories v2"):
        publish_release(home, NODE, 2, bundle=b1.folder)
    with pytest.raises(ReleaseError, match="holds stories v1, not other v1"):
        publish_release(home, "other", 1, bundle=b1.folder)
    with pytest.raises(UnknownBoardError, match="valid boards"):
        publish_release(home, NODE, 1, bundle=b1.folder, board="rpi9")
    with pytest.raises(ReleaseError, match="never released"):
        publish_release(home, NODE, 2, bundle=b2.folder, delta_from=1)
    with pytest.raises(UnknownDeviceError, match="no device 'dev-999'"):
        publish_release(home, NODE, 1, bundle=b1.folder, devices=["dev-999"])
    with pytest.raises(InvalidArgumentError, match="nothing to roll out"):
        publish_release(home, NODE, 1, bundle=b1.folder, board="x86-host")
    with pytest.raises(ReleaseError, match="no model registry"):
        publish_release(home, NODE, 1)
    with pytest.raises(InvalidArgumentError, match="increasing"):
        publish_release(home, NODE, 1, bundle=b1.folder, waves=[0.5, 0.2])
    # nothing above was published or recorded
    assert signed_targets(home) == {}
    conn = store.connect(home.registry_db)
    assert conn.execute("SELECT count(*) FROM fleet_releases").fetchone()[0] == 0
    conn.close()


def test_release_from_the_model_registry(tmp_path: Path, bundles: list[Any]) -> None:
    home = new_home(tmp_path, n=3)
    b1 = bundles[0]
    with Registry.open(home.root / "registry.sqlite") as reg:
        builds = [NewBuild(board, recipe, b1.folder, 1000,
                           [(f.name, f.sha256, f.size) for f in b1.files])
                  for board, recipe in (("rpi5", "q4_0"), ("rpi5", "q8_0"), ("rpi4", "q8_0"))]
        reg.register(NewVersion(NODE, None, None, "c", "k", "t", {}, b1.folder, 1000, 1), builds)
    with pytest.raises(ReleaseError, match=r"unknown node 'en' .*nodes: stories"):
        publish_release(home, "en", 1)
    with pytest.raises(ReleaseError, match=r"has no version 4 \(versions: 1\)"):
        publish_release(home, NODE, 4)
    with pytest.raises(ReleaseError, match="builds for rpi4, rpi5 board"):
        publish_release(home, NODE, 1)
    with pytest.raises(ReleaseError, match="no build of stories v1 for jetson-orin-nano"):
        publish_release(home, NODE, 1, board="jetson-orin-nano")
    rel = publish_release(home, NODE, 1, board="rpi5", health=False)
    assert rel.source == b1.folder and rel.waves == [1, 3]


# --------------------------------------------------------------------------------------
# The CLI


def test_cli_release_and_rollout(tmp_path: Path, bundles: list[Any], capsys: Any) -> None:
    home = new_home(tmp_path, n=20)
    h = ["--home", str(home.root)]
    b1, b2, _ = bundles
    assert main(["hub", "release", NODE, "--version", "1", "--bundle", str(b1.folder),
                 "--no-rollout", *h]) == 0
    assert "published only (no rollout)" in capsys.readouterr().out
    assert main(["hub", "release", NODE, "--version", "2", "--bundle", str(b2.folder),
                 "--delta-from", "1", "--canary", "25%", "--halt-at", "10%", *h]) == 0
    out = capsys.readouterr().out
    assert "release 2 of stories: v2 for rpi5" in out and "delta" in out
    assert "rollout 1: 20 devices in waves of 5, 20" in out
    assert main(["hub", "rollout", "status", *h]) == 0
    assert "rollout 1: stories v2 (release 2) for rpi5: active, wave 1 of 2" in \
        capsys.readouterr().out
    assert main(["hub", "rollout", "halt", "1", *h]) == 0
    assert "halted" in capsys.readouterr().out
    assert main(["hub", "rollout", "status", "1", "--json", *h]) == 0
    st = json.loads(capsys.readouterr().out)[0]
    assert st["state"] == "halted" and st["halt_at"] == 0.1 and len(st["devices"]) == 20
    assert main(["hub", "rollout", "resume", "1", *h]) == 0
    assert "active" in capsys.readouterr().out
    errors = [
        (["hub", "release", NODE, "--version", "2", "--bundle", str(b2.folder), "--canary",
          "150%"], "--canary '150%': use 0% to 100%"),
        (["hub", "release", NODE, "--version", "2", "--bundle", str(b2.folder), "--halt-at",
          "lots"], "--halt-at 'lots': write a percentage"),
        (["hub", "release", NODE, "--version", "2", "--bundle", str(b2.folder), "--waves",
          "50%,10%"], "--waves '50%,10%'"),
        (["hub", "release", NODE, "--version", "9", "--bundle", str(b2.folder)],
         "holds stories v2, not stories v9"),
        (["hub", "release", NODE, "--version", "2", "--bundle", str(b2.folder), "--board",
          "pi"], "unknown board 'pi'"),
        (["hub", "release", NODE, "--version", "2"], "no model registry"),
        (["hub", "rollout", "halt", "7"], "no rollout 7"),
        (["hub", "rollout", "resume", "1"], "only a halted one"),
        (["hub", "rollout", "halt"], "needs a rollout ID"),
    ]
    for argv, msg in errors:
        assert main([*argv, *h]) == 1, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (argv, err)
    with pytest.raises(SystemExit) as done:
        main(["hub", "release", "--help"])
    assert done.value.code == 0
    assert "edgellm hub release en/medical/cardiology --version 3" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# The service sends the offers (real mosquitto): waves, halt, re-send on birth


def test_service_sends_offers_in_waves_and_resends_on_birth(tmp_path: Path,
                                                           bundles: list[Any]) -> None:
    home = make_home(tmp_path, tuf=True)
    for d in DEVS[:4]:
        home.add_device(d, board="rpi5", node=NODE)
    rel = publish_release(home, NODE, 1, bundle=bundles[0].folder, health=False,
                          waves=[0.25, 1.0])
    canary_dev = rollout.status(_conn(home), int(rel.rollout or 0))["devices"][0]["device"]
    with running_broker(home):
        inbox = Inbox()
        clients = {}
        for d in DEVS[:4]:
            c = device_client(home, d)
            c.message_callback_add(protocol.topic(d, "cmd"), inbox)
            c.subscribe(protocol.topic(d, "cmd"), qos=1)
            clients[d] = c
        time.sleep(0.3)  # SUBACKs
        with HubService(home, offer_interval=0.05) as svc:
            assert inbox.wait_for(1, 10.0)
            time.sleep(0.3)
            assert inbox.topics() == [protocol.topic(canary_dev, "cmd")]  # the canary only
            offer = protocol.decode(bytes(inbox.messages[0].payload))
            assert offer == {"v": 1, "type": "offer", "rollout": rel.rollout,
                             "targets": rel.targets}
            # the canary reconnects: its birth makes the hub send the offer again
            birth = {"type": "birth", "device": canary_dev, "bdSeq": 1, "hour": 1,
                     "board": "rpi5", "node": NODE, "version": 0, "adapter": None,
                     "runtime": "edgellm-0.1", "attack": False}
            clients[canary_dev].publish(protocol.topic(canary_dev, "state"),
                                        protocol.encode(birth), qos=1)
            assert inbox.wait_for(2, 10.0)
            # its report (QoS 1, not retained) completes the canary wave: the rest follow
            rep = {**update_msg(canary_dev, "committed", rid=rel.rollout, release=1),
                   "version": 1}
            clients[canary_dev].publish(protocol.topic(canary_dev, "state"),
                                        protocol.encode(rep), qos=1)
            assert inbox.wait_for(5, 10.0)
            time.sleep(0.3)
            assert sorted(inbox.topics()[2:]) == sorted(protocol.topic(d, "cmd") for d in
                                                         DEVS[:4] if d != canary_dev)
            assert svc.stats["offers"] == 5 and svc.stats["update"] == 1
            # a failure in wave 2 halts it; nothing more is offered, even on a birth
            other = next(d for d in DEVS[:4] if d != canary_dev)
            bad = {**update_msg(other, "rolled_back", rid=rel.rollout, release=1,
                                reason="nan"), "version": 1}
            clients[other].publish(protocol.topic(other, "state"), protocol.encode(bad), qos=1)
            deadline = time.time() + 10
            while rollout.status(_conn(home), int(rel.rollout or 0))["state"] != "halted":
                assert time.time() < deadline
                time.sleep(0.05)
            for d in DEVS[:4]:
                clients[d].publish(protocol.topic(d, "state"), protocol.encode(
                    {**birth, "device": d, "bdSeq": 2}), qos=1)
            time.sleep(0.5)
            assert len(inbox.messages) == 5
        close(*clients.values())


def _conn(home: HubHome) -> sqlite3.Connection:
    return store.connect(home.registry_db)


def test_demo_leaf_bundle_publishes(tmp_path: Path) -> None:
    home = new_home(tmp_path, n=2, node="en/medical/cardiology")
    rel = publish_release(home, "en/medical/cardiology", 1,
                          bundle=DEMO_LEAF_Q4, prompt="The heart")
    assert rel.targets["model"] == "en-medical-cardiology.v1.r1.rpi5.gguf"
    assert rel.health is not None and rel.waves == [1, 2]
