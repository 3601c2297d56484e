# SPDX-License-Identifier: MIT
"""The device's atomic apply: power cuts at every mutation (B1, B2, B8), health-gated commit and
rollback with real bad models in a child process (B3), the boot-loop guard (B4), refusals (B6,
B7, C1) and the delta's fallback to the full bundle (C2)."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from support.bundles import make_bundle, rewrite_gguf, small_adapter, tweak_gguf

import edgellm
from edgellm.fleet.fsops import FaultFS, FileOps, PowerCut
from edgellm.fleet.health import HealthResult, HealthSpec, check_files, record_golden
from edgellm.fleet.patch import make_adapter_patch, make_delta, sha256_path
from edgellm.fleet.slots import Active, SlotStore
from edgellm.fleet.updater import Update, Updater
from edgellm.formats.bundle import Bundle
from edgellm.formats.convert import convert

DATA = Path(__file__).parent / "data" / "stories260K"
NODE = "en/medical"
PROMPT = "Once upon a time"


# --------------------------------------------------------------------------------------
# Models and bundles


def _float_rewrite(src: Path, dst: Path, fn: Callable[[str, np.ndarray], np.ndarray | None]) -> Path:
    """rewrite_gguf() for an F32 file, with fn seeing float32 arrays."""
    def change(name: str, raw: np.ndarray) -> np.ndarray | None:
        out = fn(name, raw.view(np.float32))
        return None if out is None else np.ascontiguousarray(out, np.float32).view(np.uint8)
    return rewrite_gguf(src, dst, change)


@dataclasses.dataclass
class World:
    root: Path
    m1: Path
    m2: Path
    b1: Bundle
    b2: Bundle
    delta: Path
    adapter: Path
    adapter_patch: Path
    spec: HealthSpec
    template: Path  # a device provisioned with b1

    def old(self) -> Active:
        return Active(self.b1.file("model.gguf").sha256, NODE, 1)

    def new_bundle(self) -> Active:
        return Active(self.b2.file("model.gguf").sha256, NODE, 2)

    def bundle_update(self, b: Bundle | None = None, spec: HealthSpec | None = None) -> Update:
        b = b or self.b2
        return Update("bundle", NODE, b.version, b.file("model.gguf").sha256,
                      {"model.gguf": b.folder / "model.gguf", "bundle.json": b.folder / "bundle.json"},
                      health=spec)

    def delta_update(self, patch: Path | None = None, fallback: bool = False) -> Update:
        return Update("delta", NODE, 2, self.b2.file("model.gguf").sha256,
                      {"patch": patch or self.delta, "bundle.json": self.b2.folder / "bundle.json"},
                      fallback=self.bundle_update() if fallback else None)

    def adapter_update(self, spec: HealthSpec | None = None) -> Update:
        return Update("adapter", NODE, 1, self.b1.file("model.gguf").sha256,
                      {"patch": self.adapter_patch}, adapter_sha256=sha256_path(self.adapter),
                      adapter_scale=1.0, health=spec)

    def device(self, name: str) -> Path:
        dev = self.root / name
        if dev.exists():
            shutil.rmtree(dev)
        shutil.copytree(self.template, dev)
        return dev


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    # The enumeration makes ~10^4 folder operations: on tmpfs where there is one (10x faster
    # than a disk's journal); FaultFS models durability, so the medium does not matter.
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        root = Path(tempfile.mkdtemp(prefix="edgellm-apply-", dir=shm))
    else:
        root = tmp_path_factory.mktemp("apply")
    try:
        yield _make_world(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _make_world(root: Path) -> World:
    m1 = convert(DATA / "stories260K.bin", root / "m1.gguf", type="q8_0",
                 tokenizer=DATA / "tok512.bin", log=None)
    rng = np.random.default_rng(0)
    # v2: two tensors re-trained
    m2 = tweak_gguf(m1, root / "m2.gguf", ("blk.0.attn_q.weight", "blk.1.ffn_up.weight"), rng)
    b1 = make_bundle(root / "b1", m1, node=NODE, version=1, board="x86-host")
    b2 = make_bundle(root / "b2", m2, node=NODE, version=2, board="x86-host")
    delta = root / "v1-v2.patch"
    delta.write_bytes(make_delta(m1, m2, node=NODE))
    adapter = small_adapter(m1, root / "adapter.gguf", rng)
    apatch = root / "adapter.patch"
    apatch.write_bytes(make_adapter_patch(adapter, m1, node=NODE))
    spec = record_golden(m1, PROMPT, 16)
    template = root / "template"
    SlotStore(template).provision(b1.folder)
    return World(root, m1, m2, b1, b2, delta, adapter, apatch, spec, template)


FAST = FileOps(sync=False)  # throwaway folders: the FaultFS model decides what is durable


def cheap(model: Path, spec: HealthSpec | None, adapter: Path | None, scale: float) -> HealthResult:
    """The in-process files-only check: these tests are about file operations."""
    return check_files(model, adapter=adapter, adapter_scale=scale)


# --------------------------------------------------------------------------------------
# B1, B2, B8: a power cut at every mutation point


def assert_one_verified(dev: Path, active: Active, allowed: set[Active]) -> None:
    """Exactly one verified model is active: current names it, it verifies, nothing is half."""
    store = SlotStore(dev)
    cur = store.read_pointer("current")
    assert cur == active and cur in allowed, (cur, allowed)
    store.verify(cur)  # sha256 of every file against its manifest (and the adapter's)
    good = store.read_pointer("last_good")
    assert good is not None and store.valid(good)
    journal = store.read_json("journal")  # missing: never updated, which is idle too
    assert journal is None or journal["state"] == "idle", journal
    assert list(store.staging.iterdir()) == []


CUT_CHUNK = 64 << 10  # small appends, so cuts also land inside a file being written


def _apply(dev: Path, fs: FileOps, update: Update) -> Updater:
    u = Updater(dev, fs=fs, health=cheap, chunk=CUT_CHUNK)
    u.boot()
    u.apply(update)
    return u


def _enumerate(world: World, kind: str) -> dict[str, Any]:
    update = {"bundle": world.bundle_update, "delta": world.delta_update,
              "adapter": world.adapter_update}[kind]()
    new = update.target
    allowed = {world.old(), new}
    dev = world.device(f"count-{kind}")
    counter = FaultFS(dev)
    report = _apply(dev, counter, update).log[-1]
    assert report["outcome"] == "committed", report
    n = len(counter.points)
    rng = random.Random(f"nested-{kind}")
    stats = {"points": n, "runs": 0, "ended_new": 0, "ended_old": 0, "nested_cuts": 0}
    for k in range(n):
        for mode in ("strict", "meta"):
            dev = world.device("cut")
            cut = FaultFS(dev, cut_at=k, mode=mode)
            with pytest.raises(PowerCut):
                before = Updater(dev, fs=cut, health=cheap, chunk=CUT_CHUNK)
                try:
                    before.boot()
                    before.apply(update)
                finally:
                    acked = list(before.log)
            # Every state file is whole (old or new, never empty or torn) after the cut...
            state = [dev / n for n in ("journal", "current", "last_good", "boot_count")]
            for p in state + sorted((dev / "outbox").glob("*.json")):
                if p.exists():
                    assert SlotStore(dev).read_json(str(p.relative_to(dev))) is not None, \
                        (kind, k, mode, p.name)
            # ...and every report made (acknowledged) before the cut survived it (B8).
            for r in acked:
                assert SlotStore(dev).read_json(f"outbox/{r['id']}.json") == r, (kind, k, mode)
            snapshot = world.root / "snapshot"
            if snapshot.exists():
                shutil.rmtree(snapshot)
            shutil.copytree(dev, snapshot)
            # Restart 1, clean: recovery ends idle with one verified model.
            fs1 = FaultFS(dev)
            active = Updater(dev, fs=fs1, health=cheap).boot()
            assert_one_verified(dev, active, allowed)
            stats["ended_new" if active == new else "ended_old"] += 1
            # Restart 2 is a fixed point: no mutation, the same model.
            fs2 = FaultFS(dev)
            assert Updater(dev, fs=fs2, health=cheap).boot() == active
            assert fs2.points == [], (kind, k, mode, fs2.points)
            # The update still lands when offered again.
            again = Updater(dev, fs=FAST, health=cheap)
            again.boot()
            again.apply(update)
            assert again.active == new
            assert_one_verified(dev, new, {new})
            # Recovery itself cut, up to three times in a row (B2), then a clean restart
            # converges.
            if fs1.points:
                for _ in range(rng.choice([1, 1, 2, 3])):
                    nested = FaultFS(snapshot, cut_at=rng.randrange(len(fs1.points)), mode=mode)
                    try:
                        Updater(snapshot, fs=nested, health=cheap).boot()
                    except PowerCut:
                        stats["nested_cuts"] += 1
                        continue
                    break
                active2 = Updater(snapshot, fs=FAST, health=cheap).boot()
                assert_one_verified(snapshot, active2, allowed)
                fs3 = FaultFS(snapshot)
                assert Updater(snapshot, fs=fs3, health=cheap).boot() == active2
                assert fs3.points == []
            stats["runs"] += 1
    return stats


CUT_STATS: dict[str, dict[str, Any]] = {}


@pytest.mark.parametrize("kind", ["bundle", "delta", "adapter"])
def test_power_cut_at_every_mutation_point_converges(world: World, kind: str) -> None:
    stats = _enumerate(world, kind)
    CUT_STATS[kind] = stats
    print(f"\n{kind}: {stats}")
    assert stats["points"] >= 40  # every write, fsync, rename, unlink, mkdir of the apply
    assert stats["runs"] == 2 * stats["points"]
    # Early cuts leave the old model, late ones the new: both outcomes are exercised.
    assert stats["ended_new"] > 0 and stats["ended_old"] > 0


def test_fault_fs_drops_unsynced_data_and_entries(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_bytes(b"old")
    fs = FaultFS(tmp_path, cut_at=4)
    fs.write(tmp_path / "d" / "a", b"synced")
    fs.fsync(tmp_path / "d" / "a")
    fs.write(tmp_path / "d" / "b", b"unsynced")
    fs.rename(tmp_path / "d" / "old", tmp_path / "d" / "renamed")
    with pytest.raises(PowerCut):
        fs.fsync_dir(tmp_path / "d")
    # No fsync of the folder: the new names are gone, the rename undone.
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["old"]
    with pytest.raises(PowerCut):  # the process is dead
        fs.write(tmp_path / "x", b"")
    meta = FaultFS(tmp_path, cut_at=3, mode="meta")
    meta.write(tmp_path / "d" / "a", b"synced")
    meta.fsync(tmp_path / "d" / "a")
    meta.write(tmp_path / "d" / "b", b"unsynced")
    with pytest.raises(PowerCut):
        meta.fsync_dir(tmp_path / "d")
    assert (tmp_path / "d" / "a").read_bytes() == b"synced"
    assert (tmp_path / "d" / "b").read_bytes() == b""  # the entry survived, its data did not


# --------------------------------------------------------------------------------------
# B3: health-gated commit, rollback with real bad models (child process)


def _bad_models(world: World) -> dict[str, tuple[Path, HealthSpec]]:
    root = world.root / "bad"
    root.mkdir(exist_ok=True)
    f32 = convert(DATA / "stories260K.bin", root / "f32.gguf", type="f32",
                  tokenizer=DATA / "tok512.bin", log=None)
    truncated = root / "truncated.gguf"
    raw = world.m1.read_bytes()
    truncated.write_bytes(raw[: len(raw) * 2 // 3])
    nan = _float_rewrite(f32, root / "nan.gguf",
                         lambda n, a: np.full_like(a, np.nan) if n == "blk.0.attn_norm.weight" else None)
    rng = np.random.default_rng(5)
    wrong = _float_rewrite(f32, root / "wrong.gguf",
                           lambda n, a: rng.standard_normal(a.shape).astype(np.float32) * 0.1
                           if a.ndim and a.size > 1000 else None)
    spec = world.spec
    return {
        "load_failed": (truncated, spec),
        "nan": (nan, spec),
        "wrong_output": (wrong, spec),
        "too_slow": (world.m2, dataclasses.replace(spec, max_ms_per_token=1e-4)),
        "timeout": (world.m2, dataclasses.replace(spec, timeout_s=0.05)),
        "oom": (world.m2, dataclasses.replace(spec, memory_limit_bytes=64 << 10)),
    }


def test_bad_models_roll_back_within_60s_and_report(world: World) -> None:
    cases = _bad_models(world)
    for i, (reason, (gguf, spec)) in enumerate(cases.items()):
        dev = world.device(f"bad-{reason}")
        bundle = make_bundle(world.root / f"bad-bundle-{reason}", gguf, node=NODE, version=10 + i,
                             board="x86-host", summary_from=world.m1)
        u = Updater(dev)  # the real child-process health check
        assert u.boot() == world.old()
        t0 = time.monotonic()
        report = u.apply(world.bundle_update(bundle, spec))
        elapsed = time.monotonic() - t0
        print(f"\n{reason}: rolled back in {elapsed:.2f} s ({report['detail'][:70]})")
        assert report["outcome"] == "rolled_back", report
        assert report["reason"] == reason, report
        assert report["health"]["reason"] == reason
        assert elapsed < 60.0
        assert u.active == world.old() and SlotStore(dev).read_pointer("current") == world.old()
        assert [r["reason"] for r in u.reports()] == [reason]
        # The failed bundle is gone, the previous model verifies and answers.
        assert not (dev / "bundles" / bundle.file("model.gguf").sha256).exists()
        SlotStore(dev).verify(u.active)
        with edgellm.Model(u.model_path(), n_threads=1) as m:
            text = m.generate(PROMPT, max_tokens=8, temperature=0.0)
            assert m.tokenize(PROMPT + text, add_bos=True)[: len(m.tokenize(PROMPT))] == \
                m.tokenize(PROMPT)
        assert text.strip()


def test_good_update_commits_after_the_child_check(world: World) -> None:
    dev = world.device("good")
    u = Updater(dev)
    u.boot()
    window = dataclasses.replace(world.spec, rounds=3, interval_s=0.05)  # a short window
    report = u.apply(world.bundle_update(spec=window))
    assert (report["outcome"], report["reason"]) == ("committed", "ok")
    assert report["health"]["measured"]["agreement"] >= 0.75
    assert report["health"]["measured"]["rounds"] == 3
    assert u.active == world.new_bundle()
    assert SlotStore(dev).read_pointer("last_good") == world.new_bundle()
    assert not (dev / "bundles" / world.old().model_sha256).exists()  # the old one is collected


def test_delta_update_with_the_child_check(world: World) -> None:
    dev = world.device("delta-child")
    u = Updater(dev)
    u.boot()
    upd = dataclasses.replace(world.delta_update(), health=world.spec)
    report = u.apply(upd)
    assert (report["kind"], report["outcome"], report["reason"]) == ("delta", "committed", "ok")
    assert u.model_path().read_bytes() == world.m2.read_bytes()  # the hub's v2, byte for byte


def test_corrupted_after_install_rolls_back_before_switch(world: World) -> None:
    dev = world.device("corrupt")
    u = Updater(dev, health=cheap)
    u.boot()
    u.offer(world.bundle_update())
    assert u.prepare(world.bundle_update()) is None  # staged, verified, installed
    model = dev / "bundles" / world.new_bundle().model_sha256 / "model.gguf"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    report = u.poll()
    assert report is not None and report["reason"] == "verify_failed"
    assert u.active == world.old()


def test_adapter_update_with_the_child_check(world: World) -> None:
    spec = record_golden(world.m1, PROMPT, 16, adapter=world.adapter)
    dev = world.device("adapter-child")
    u = Updater(dev)
    u.boot()
    report = u.apply(world.adapter_update(spec))
    assert (report["outcome"], report["reason"]) == ("committed", "ok"), report
    assert u.active is not None and u.active.adapter_sha256 == sha256_path(world.adapter)
    assert u.adapter_path() is not None and u.adapter_path().is_file()  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------
# B4: three failed starts fall back without the network


class AgentDied(BaseException):
    """The whole agent went down while the model on trial started (OOM killer, watchdog)."""


def test_three_failed_starts_fall_back_to_last_good(world: World) -> None:
    dev = world.device("bootloop")

    def dies(*_: Any) -> HealthResult:
        raise AgentDied

    u = Updater(dev, health=dies)
    u.boot()
    with pytest.raises(AgentDied):
        u.apply(world.bundle_update())
    assert SlotStore(dev).read_pointer("current") == world.new_bundle()
    for start in (2, 3):
        with pytest.raises(AgentDied):
            Updater(dev, health=dies).boot()
        assert SlotStore(dev).boot_count() == start

    def never(*_: Any) -> HealthResult:
        raise AssertionError("the fourth start must not try the model again")

    u = Updater(dev, health=never)
    assert u.boot() == world.old()
    assert [r["reason"] for r in u.reports()] == ["boot_loop"]
    assert SlotStore(dev).boot_count() == 0


# --------------------------------------------------------------------------------------
# B6, B7, C1, C2: refusals before any write, and the fallback to the full bundle


def test_already_installed_is_a_noop(world: World) -> None:
    dev = world.device("noop")
    u = Updater(dev, health=cheap)
    u.boot()
    fs = FaultFS(dev)
    u2 = Updater(dev, fs=fs, health=cheap)
    u2.boot()
    report = u2.apply(world.bundle_update(world.b1))
    assert (report["outcome"], report["reason"]) == ("already_installed", "already_installed")
    assert {op for op, _ in fs.points} <= {"write", "fsync", "rename", "fsync_dir"}
    assert all(p.startswith("outbox") for _, p in fs.points), fs.points  # only the report


@pytest.mark.parametrize("slack", [-1, 0, 1])
def test_space_is_checked_before_anything_is_written(world: World, slack: int) -> None:
    dev = world.device("space")
    need = world.b2.model_size + (world.b2.folder / "bundle.json").stat().st_size
    fs = FaultFS(dev)
    u = Updater(dev, fs=fs, health=cheap, free_bytes=lambda: need + slack)
    u.boot()
    report = u.apply(world.bundle_update())
    if slack < 0:
        assert report["reason"] == "no_space"
        assert all(p.startswith("outbox") for _, p in fs.points)
        assert u.active == world.old()
    else:
        assert report["outcome"] == "committed"


def test_delta_for_another_base_is_refused_before_any_write(world: World) -> None:
    dev = world.device("wrongbase")
    other = world.root / "other.patch"
    other.write_bytes(make_delta(world.m2, world.m1, node=NODE))  # needs v2 as its base
    fs = FaultFS(dev)
    u = Updater(dev, fs=fs, health=cheap)
    u.boot()
    upd = dataclasses.replace(world.delta_update(other), model_sha256=world.old().model_sha256,
                              version=1)
    report = u.apply(dataclasses.replace(upd, version=3))
    assert report["reason"] == "base_mismatch"
    assert all(p.startswith("outbox") for _, p in fs.points)
    assert u.active == world.old()


@pytest.mark.parametrize("scenario", ["no_base", "corrupt_patch", "missing_patch"])
def test_a_failed_delta_falls_back_to_the_full_bundle(world: World, scenario: str) -> None:
    dev = world.device(f"fallback-{scenario}")
    patch = world.root / f"{scenario}.patch"
    if scenario == "no_base":
        patch.write_bytes(make_delta(world.m2, world.m2, node=NODE))  # base: a model not here
        upd = world.delta_update(patch, fallback=True)
    elif scenario == "corrupt_patch":
        data = bytearray(world.delta.read_bytes())
        data[-20] ^= 0x40  # inside the last compressed blob
        patch.write_bytes(bytes(data))
        upd = world.delta_update(patch, fallback=True)
    else:
        upd = world.delta_update(world.root / "does-not-exist.patch", fallback=True)
    u = Updater(dev, health=cheap)
    u.boot()
    report = u.apply(upd)
    assert (report["kind"], report["outcome"]) == ("bundle", "committed"), report
    assert u.active == world.new_bundle()
    first = u.log[0]
    assert first["kind"] == "delta" and first["outcome"] == "refused"
    assert first["reason"] in ("base_mismatch", "patch_invalid", "invalid")
    assert_one_verified(dev, world.new_bundle(), {world.new_bundle()})


def test_reports_stay_until_acknowledged(world: World) -> None:
    dev = world.device("ack")
    u = Updater(dev, health=cheap)
    u.boot()
    u.apply(world.bundle_update())
    (r,) = u.reports()
    assert r["outcome"] == "committed" and r["type"] == "update_report"
    assert Updater(dev, health=cheap).reports() == [r]  # durable across a restart
    u.ack_report(r["id"])
    u.ack_report(r["id"])  # idempotent
    assert u.reports() == []
