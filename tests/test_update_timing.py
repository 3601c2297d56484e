# SPDX-License-Identifier: MIT
"""When updates land (B5): 1,000 seeded random interleavings of sessions, offers, windows and
idle periods on a simulated clock; no swap while a session holds the lock, and each update
lands at the first poll after unlock that the policy allows. Then real threads, and the real
Updater on a simulated clock, and the store lock held from another process."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.bundles import write_bundle_manifest

from edgellm.errors import InvalidArgumentError, StateError
from edgellm.fleet.fsops import FileOps
from edgellm.fleet.health import HealthResult, HealthSpec, check_files
from edgellm.fleet.slots import Active, SlotStore
from edgellm.fleet.updater import (
    LOCK_NAME,
    Update,
    UpdateLock,
    UpdatePolicy,
    Updater,
    UpdateScheduler,
    store_lock,
)
from edgellm.formats.bundle import Bundle

DATA = Path(__file__).parent / "data" / "stories260K"
DAY = 86400.0


class Clock:
    """A simulated clock: tests advance it; nothing sleeps."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _policy(rng: random.Random) -> UpdatePolicy:
    window = None
    if rng.random() < 0.7:
        start = rng.randrange(1440)
        window = (start, (start + rng.randrange(30, 300)) % 1440)  # some wrap past midnight
    idle = rng.choice([None, 60.0, 600.0, 3600.0])
    return UpdatePolicy(window, idle, utc_offset_s=rng.choice([0, 3600, -5 * 3600]))


def _interleaving(seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    clock = Clock(1.7e9 + rng.random() * DAY)
    lock = UpdateLock(clock)
    policy = _policy(rng)
    sched = UpdateScheduler(lock, policy, clock)
    pending: list[int] = []  # the offer waiting (a newer offer supersedes an older one)
    landed: list[tuple[int, float]] = []
    last_unlock = clock.t
    counts = {"swaps": 0, "blocked_by_lock": 0, "blocked_by_policy": 0, "offers": 0}
    version = 1

    def swap() -> int:
        # Inside the swap: no session, and the policy allows it now.
        assert lock.sessions == 0 and lock.swapping
        assert policy.allows(clock.t, lock.idle_since)
        v = pending.pop()
        landed.append((v, clock.t))
        return v

    def poll() -> None:
        due = bool(pending) and lock.sessions == 0 and policy.allows(clock.t, lock.idle_since)
        if pending and lock.sessions:
            counts["blocked_by_lock"] += 1
        elif pending and not due:
            counts["blocked_by_policy"] += 1
        got = sched.run(swap) if pending else None
        # It lands exactly when it may: never under the lock, never later than needed.
        assert (got is not None) == due, (seed, clock.t, lock.sessions)
        if got is not None:
            counts["swaps"] += 1
            assert clock.t >= last_unlock

    for _ in range(rng.randrange(20, 80)):
        r = rng.random()
        if r < 0.25 and lock.sessions < 3:
            lock.begin()
        elif r < 0.5 and lock.sessions:
            lock.end()
            if lock.sessions == 0:
                last_unlock = clock.t
        elif r < 0.6:
            version += 1
            pending[:] = [version]
            counts["offers"] += 1
        else:
            clock.t += rng.choice([1.0, 30.0, 300.0, 1800.0, 7200.0]) * rng.random()
        poll()
    # Sessions end; within a day the window comes round or the idle period passes.
    while lock.sessions:
        lock.end()
    last_unlock = clock.t
    deadline = clock.t + DAY + 3600
    while pending and clock.t < deadline:
        clock.t += 60.0
        poll()
    assert not pending, f"seed {seed}: an update never landed"
    if counts["offers"]:
        assert landed and landed[-1][0] == version  # the newest offer is what runs at the end
    return counts


def test_thousand_interleavings_never_swap_under_the_lock() -> None:
    total = {"swaps": 0, "blocked_by_lock": 0, "blocked_by_policy": 0, "offers": 0}
    for seed in range(1000):
        for k, v in _interleaving(seed).items():
            total[k] += v
    print(f"\n1000 interleavings: {total}")
    # The random walk really exercised every branch.
    assert total["swaps"] > 500 and total["blocked_by_lock"] > 500
    assert total["blocked_by_policy"] > 500


def test_policy_windows_and_idle() -> None:
    p = UpdatePolicy.from_config("23:30-01:00", idle_s=None)
    midnight = 1_700_006_400.0  # a UTC midnight
    assert p.in_window(midnight) and p.in_window(midnight - 600)
    assert not p.in_window(midnight + 3600) and not p.in_window(midnight - 3600)
    q = UpdatePolicy.from_config("02:00-04:00", idle_s=900, utc_offset_s=3600)
    assert q.allows(midnight + 3600, idle_since=midnight + 3600)  # 02:00 local
    assert not q.allows(midnight + 5 * 3600, idle_since=midnight + 5 * 3600 - 899)
    assert q.allows(midnight + 5 * 3600, idle_since=midnight + 5 * 3600 - 900)
    for bad in ("2-4", "25:00-01:00", "02:00"):
        with pytest.raises(InvalidArgumentError):
            UpdatePolicy.from_config(bad)
    with pytest.raises(StateError):
        UpdateLock().end()


def test_sessions_on_threads_never_overlap_a_swap() -> None:
    lock = UpdateLock()
    sched = UpdateScheduler(lock, UpdatePolicy())
    state = {"in_session": 0, "swaps": 0, "answers": 0}
    guard = threading.Lock()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with lock.session():
                with guard:
                    state["in_session"] += 1
                time.sleep(0.002)  # decoding an answer
                with guard:
                    state["in_session"] -= 1
                    state["answers"] += 1
            time.sleep(0.001 * random.random())

    def swap() -> bool:
        with guard:
            assert state["in_session"] == 0
        time.sleep(0.003)  # the switch and health check; sessions must wait
        with guard:
            assert state["in_session"] == 0
            state["swaps"] += 1
        return True

    threads = [threading.Thread(target=serve) for _ in range(3)]
    for t in threads:
        t.start()
    t_end = time.monotonic() + 1.0
    while time.monotonic() < t_end:
        sched.run(swap)
        time.sleep(0.0005)
    stop.set()
    for t in threads:
        t.join()
    assert state["swaps"] > 5 and state["answers"] > 50


# --------------------------------------------------------------------------------------
# The real Updater on a simulated clock


def _bundle(folder: Path, gguf: Path, version: int) -> Bundle:
    folder.mkdir(parents=True)
    shutil.copy(gguf, folder / "model.gguf")
    with open(folder / "model.gguf", "ab") as f:  # a distinct file per version (GGUF ignores
        f.write(bytes(32 * version))              # trailing padding)
    return write_bundle_manifest(folder, gguf, node="en", version=version, board="x86-host")


def test_the_real_updater_waits_for_unlock_and_window(tmp_path: Path) -> None:
    from edgellm.formats.convert import convert

    gguf = convert(DATA / "stories260K.bin", tmp_path / "m.gguf", type="q8_0",
                   tokenizer=DATA / "tok512.bin", log=None)
    bundles = [_bundle(tmp_path / f"b{v}", gguf, v) for v in range(1, 6)]
    dev = tmp_path / "dev"
    SlotStore(dev).provision(bundles[0].folder)
    clock = Clock(1_700_006_400.0 + 12 * 3600)  # noon UTC
    lock = UpdateLock(clock)
    swaps: list[tuple[int, float]] = []

    def on_swap(active: Active) -> None:
        assert lock.sessions == 0
        swaps.append((active.version, clock.t))

    def cheap(m: Path, s: HealthSpec | None, a: Path | None, sc: float) -> HealthResult:
        return check_files(m, adapter=a)

    u = Updater(dev, fs=FileOps(sync=False), health=cheap, lock=lock, clock=clock,
                policy=UpdatePolicy.from_config("02:00-03:00", idle_s=1800), on_swap=on_swap)
    u.boot()
    rng = random.Random(7)
    for b in bundles[1:]:
        upd = Update("bundle", "en", b.version, b.file("model.gguf").sha256,
                     {"model.gguf": b.folder / "model.gguf", "bundle.json": b.folder / "bundle.json"})
        u.offer(upd)
        lock.begin()  # a clinician's session is open
        for _ in range(20):
            clock.t += rng.random() * 600
            assert u.poll() is None  # staged, but never swapped under the lock
        assert u.journal()["state"] == "installed"
        lock.end()
        unlocked = clock.t
        report = None
        while report is None:
            clock.t += 60
            report = u.poll()
        assert report["outcome"] == "committed"
        assert swaps[-1] == (b.version, clock.t) and clock.t > unlocked
        assert u.policy.in_window(clock.t) or clock.t - unlocked >= 1800
    assert [v for v, _ in swaps] == [2, 3, 4, 5]
    # Two offers while a session is open: both land, in order, after unlock.
    more = [_bundle(tmp_path / f"c{v}", gguf, v) for v in (6, 7)]
    lock.begin()
    for b in more:
        u.offer(Update("bundle", "en", b.version, b.file("model.gguf").sha256,
                       {"model.gguf": b.folder / "model.gguf",
                        "bundle.json": b.folder / "bundle.json"}))
        for _ in range(3):
            clock.t += 60
            assert u.poll() is None
    lock.end()
    for _ in range(60):
        clock.t += 60
        u.poll()
    assert [v for v, _ in swaps] == [2, 3, 4, 5, 6, 7]


HOLDER = """
import sys
from edgellm.fleet.updater import store_lock
with store_lock(sys.argv[1]).hold():
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_store_lock_from_another_process_skips_poll_and_holds_boot(tmp_path: Path) -> None:
    """RACE: a flash receiver (another process) holds models/.updater.lock: the agent's poll
    skips its tick (never blocks), boot waits, and both go on once it is released."""
    from edgellm.formats.convert import convert

    gguf = convert(DATA / "stories260K.bin", tmp_path / "m.gguf", type="q8_0",
                   tokenizer=DATA / "tok512.bin", log=None)
    b1, b2 = _bundle(tmp_path / "b1", gguf, 1), _bundle(tmp_path / "b2", gguf, 2)
    dev = tmp_path / "dev"
    SlotStore(dev).provision(b1.folder)

    def cheap(m: Path, s: HealthSpec | None, a: Path | None, sc: float) -> HealthResult:
        return check_files(m, adapter=a)

    u = Updater(dev, fs=FileOps(sync=False), health=cheap)
    u.boot()
    assert (dev / LOCK_NAME).is_file()
    u.offer(Update("bundle", "en", 2, b2.file("model.gguf").sha256,
                   {"model.gguf": b2.folder / "model.gguf", "bundle.json": b2.folder / "bundle.json"}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(dev)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        for _ in range(5):
            assert u.poll() is None  # busy: skipped at once, nothing staged
        assert time.monotonic() - t0 < 1.0
        assert u.journal()["state"] == "idle" and list((dev / "staging").iterdir()) == []
        assert u.pending is not None  # kept for a later tick
        booted: list[Active] = []
        other = Updater(dev, fs=FileOps(sync=False), health=cheap)
        th = threading.Thread(target=lambda: booted.append(other.boot()))
        th.start()
        th.join(0.5)
        assert th.is_alive() and booted == []  # boot waits for the other process
        holder.stdin.close()
        assert holder.wait(10) == 0
        th.join(10)
        assert booted == [u.active]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    report = u.poll()  # free again: staged and swapped in one tick (no policy, no session)
    assert report is not None and report["outcome"] == "committed"
    assert u.active is not None and u.active.version == 2


def test_store_lock_is_reentrant_in_a_process(tmp_path: Path) -> None:
    lk = store_lock(tmp_path)
    assert store_lock(tmp_path / "sub" / "..") is lk  # one object per store folder
    with lk.hold() as a, lk.hold(blocking=False) as b:
        assert a and b  # the holder may take it again (install_package -> Updater.boot)
    with pytest.raises(StateError):
        lk.release()

