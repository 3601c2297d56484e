# SPDX-License-Identifier: MIT
"""The device's update state machine: stage, verify, install, switch, health check, commit or
roll back; plus the update lock and the maintenance-window policy that decide *when*.

The verified bytes of an update (from the TUF fetcher) come in as an ``Update``: a full bundle
(model.gguf + bundle.json), a delta (a patch + the new bundle.json) or an adapter (a patch).
``Updater`` turns them into the running model (docs/updates.md walks through it)::

    idle -> staging -> installed -> trial -> committing -> idle      (the health check passed)
                 \\                      \\-> rolling_back -> idle    (it failed: the old model)
                  \\-> idle (refused or interrupted: nothing changed; a delta falls back)

Each arrow is one durable journal write (``journal``, write_atomic), made *before* the step it
names, and each step is idempotent, so ``boot()`` after a power cut at any point finishes (or
undoes) the step the journal names and ends idle with exactly one verified model active.
A model on trial counts its starts in ``boot_count``; after ``max_starts`` failed starts the
device returns to the last good model on its own (no network).

When: ``UpdateLock`` is held by the serving code around every answer (``with
lock.session():``); a swap takes the lock only when no session holds it, and sessions wait
while a swap runs. ``UpdatePolicy`` allows a swap inside the maintenance window or after an
idle period. Staging (copy, patch, verify) may run while sessions are active; only the switch,
the health check and the commit or rollback need the lock.

Between processes: ``store_lock(root)`` is an ``fcntl.flock`` on ``ROOT/.updater.lock``, held
by ``boot``, ``prepare``, ``poll`` and ``apply`` (``poll`` only tries it: busy, it skips the
tick) and by the flash receiver's ``install_package``, so one process never recovers, collects
or switches under another's journal. It is re-entrant within a process (one object per store).

Public API: ``Update``, ``Updater`` (``boot``, ``offer``, ``poll``, ``apply``, ``reports``,
``ack_report``), ``UpdateLock``, ``UpdatePolicy``, ``UpdateScheduler``, ``StoreLock`` and
``store_lock``, ``report`` dicts with a ``Reason``.

.. versionadded:: 0.1
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..errors import (
    EdgeLLMError,
    InvalidArgumentError,
    PatchBaseError,
    PatchError,
    StateError,
    UpdateError,
)
from ..formats.bundle import MANIFEST_NAME, MODEL_NAME, read_manifest
from .fsops import FileOps
from .health import HealthResult, HealthSpec, Reason, check_files, check_model
from .patch import CHUNK, Patch, apply_patch, read_patch
from .slots import Active, SlotStore

__all__ = ["LOCK_NAME", "HealthFn", "StoreLock", "Update", "UpdateLock", "UpdatePolicy",
           "UpdateScheduler", "Updater", "store_lock"]

KINDS = ("bundle", "delta", "adapter")
MAX_STARTS = 3  # B4: three failed starts of a model on trial, then back to the last good one
LOCK_NAME = ".updater.lock"  # in the store root: the inter-process lock file (never removed)
T = TypeVar("T")
# (model.gguf, spec or None, adapter or None, adapter scale) -> verdict
HealthFn = Callable[[Path, "HealthSpec | None", "Path | None", float], HealthResult]


def default_health(model: Path, spec: HealthSpec | None, adapter: Path | None,
                   scale: float) -> HealthResult:
    """The child-process check when the release has a spec, else the files-only check."""
    if spec is None:
        return check_files(model, adapter=adapter, adapter_scale=scale)
    return check_model(model, spec, adapter=adapter, adapter_scale=scale)


@dataclass(frozen=True)
class Update:
    """The verified bytes of one update, and what they must turn into.

    kind "bundle": files {"model.gguf", "bundle.json"}; "delta": files {"patch",
    "bundle.json"} (the patch turns the active model into model_sha256); "adapter": files
    {"patch"}, model_sha256 is the base the adapter is for and version that bundle's version.
    ``fallback`` is the full bundle to install when a delta cannot apply (C2).
    """

    kind: str
    node: str
    version: int
    model_sha256: str
    files: Mapping[str, Path]
    adapter_sha256: str | None = None
    adapter_scale: float = 1.0
    health: HealthSpec | None = None
    fallback: Update | None = None

    @property
    def target(self) -> Active:
        return Active(self.model_sha256, self.node, self.version,
                      self.adapter_sha256 if self.kind == "adapter" else None,
                      self.adapter_scale if self.kind == "adapter" else 1.0)

    @property
    def txn(self) -> str:
        sha = self.adapter_sha256 if self.kind == "adapter" and self.adapter_sha256 else \
            self.model_sha256
        return f"{self.kind}-v{self.version}-{sha[:16]}"


# --------------------------------------------------------------------------------------
# When: the lock and the policy


class UpdateLock:
    """Sessions (readers) versus a model swap (the writer); a swap never waits for a session.

    - serving code: ``with lock.session(): answer(...)`` (waits while a swap runs);
    - the updater: ``with lock.try_swap() as got:`` gets the lock only if no session holds it;
    - ``lock.idle_since``: when the last session ended (the idle policy reads it).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._cond = threading.Condition()
        self._sessions = 0
        self._swapping = False
        self.clock = clock
        self.idle_since = clock()

    @property
    def sessions(self) -> int:
        return self._sessions

    @property
    def swapping(self) -> bool:
        return self._swapping

    def begin(self) -> None:
        """Start a session (blocks while a swap runs)."""
        with self._cond:
            while self._swapping:
                self._cond.wait()
            self._sessions += 1

    def end(self) -> None:
        """End a session."""
        with self._cond:
            if self._sessions <= 0:
                raise StateError("UpdateLock.end() without a session")
            self._sessions -= 1
            if self._sessions == 0:
                self.idle_since = self.clock()
            self._cond.notify_all()

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Hold the lock for one answer: no model swap can happen inside."""
        self.begin()
        try:
            yield
        finally:
            self.end()

    @contextlib.contextmanager
    def try_swap(self) -> Iterator[bool]:
        """Yield True holding the swap if no session is active, else yield False."""
        with self._cond:
            got = self._sessions == 0 and not self._swapping
            if got:
                self._swapping = True
        try:
            yield got
        finally:
            if got:
                with self._cond:
                    self._swapping = False
                    self._cond.notify_all()


class StoreLock:
    """The store's inter-process lock: ``fcntl.flock`` on ``ROOT/.updater.lock``.

    Re-entrant in the thread that holds it (a depth count); other threads of the process wait
    on an RLock first, other processes on the flock. Get it with ``store_lock(root)``, which
    hands every caller in the process the same object for a store.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root) / LOCK_NAME
        self._mutex = threading.RLock()
        self._fd: int | None = None
        self._depth = 0

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock (waiting when blocking); False when not blocking and it is busy."""
        if not self._mutex.acquire(blocking):
            return False
        if self._depth == 0:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                except BaseException:
                    os.close(fd)
                    raise
            except BlockingIOError:
                self._mutex.release()
                return False
            except BaseException:
                self._mutex.release()
                raise
            self._fd = fd
        self._depth += 1
        return True

    def release(self) -> None:
        """Release one level; the flock goes when the outermost holder releases."""
        if self._depth <= 0:
            raise StateError(f"{self.path}: release() without acquire()")
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor drops the flock
        self._mutex.release()

    @contextlib.contextmanager
    def hold(self, blocking: bool = True) -> Iterator[bool]:
        """Yield True holding the lock, or False (not blocking, another holder has it)."""
        got = self.acquire(blocking)
        try:
            yield got
        finally:
            if got:
                self.release()


_STORE_LOCKS: dict[str, StoreLock] = {}
_STORE_LOCKS_GUARD = threading.Lock()


def store_lock(root: str | os.PathLike[str]) -> StoreLock:
    """The process's one StoreLock for the store at root (same object for the same folder)."""
    key = os.path.realpath(root)
    with _STORE_LOCKS_GUARD:
        lk = _STORE_LOCKS.get(key)
        if lk is None:
            lk = _STORE_LOCKS[key] = StoreLock(key)
        return lk


def _minutes(text: str) -> int:
    h, sep, m = text.strip().partition(":")
    if not sep or not h.isdigit() or not m.isdigit() or int(h) > 23 or int(m) > 59:
        raise InvalidArgumentError(f"bad time {text!r}: use HH:MM (24 h)")
    return int(h) * 60 + int(m)


@dataclass(frozen=True)
class UpdatePolicy:
    """When a swap may happen: inside the maintenance window, or after an idle period.

    window: (start, end) in minutes after the device's local midnight; end < start wraps
    past midnight; None: no window. idle_s: seconds without a session that also allow a
    swap; None: the window only. Both None: any time the lock is free.
    """

    window: tuple[int, int] | None = None
    idle_s: float | None = None
    utc_offset_s: int = 0

    @classmethod
    def from_config(cls, window: str | None = None, idle_s: float | None = None,
                    utc_offset_s: int = 0) -> UpdatePolicy:
        """From config text: window "02:00-04:30", idle_s 900.

        Raises:
            InvalidArgumentError: a malformed window or a negative idle period.
        """
        win = None
        if window:
            start, sep, end = window.partition("-")
            if not sep:
                raise InvalidArgumentError(f"bad window {window!r}: use HH:MM-HH:MM")
            win = (_minutes(start), _minutes(end))
        if idle_s is not None and idle_s < 0:
            raise InvalidArgumentError("idle_s must be >= 0")
        return cls(win, idle_s, utc_offset_s)

    def in_window(self, now: float) -> bool:
        if self.window is None:
            return False
        minute = int((now + self.utc_offset_s) // 60) % 1440
        start, end = self.window
        return start <= minute < end if start <= end else (minute >= start or minute < end)

    def allows(self, now: float, idle_since: float) -> bool:
        if self.window is None and self.idle_s is None:
            return True
        if self.in_window(now):
            return True
        return self.idle_s is not None and now - idle_since >= self.idle_s


class UpdateScheduler:
    """Runs a swap function only when the policy allows it and no session holds the lock."""

    def __init__(self, lock: UpdateLock, policy: UpdatePolicy,
                 clock: Callable[[], float] = time.time) -> None:
        self.lock, self.policy, self.clock = lock, policy, clock

    def run(self, fn: Callable[[], T], now: float | None = None) -> T | None:
        """fn() under the swap lock if allowed now, else None (try again at the next poll)."""
        t = self.clock() if now is None else now
        if not self.policy.allows(t, self.lock.idle_since):
            return None
        with self.lock.try_swap() as got:
            if not got:
                return None
            return fn()


# --------------------------------------------------------------------------------------
# What: the state machine


class _Refused(Exception):
    """An offer refused before anything changed (or after a clean abort)."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class _Sink:
    """Buffers a streamed result into appends of at least chunk bytes (fewer, larger writes)."""

    def __init__(self, fs: FileOps, path: Path, chunk: int) -> None:
        self.fs, self.path, self.buf, self.chunk = fs, path, bytearray(), chunk
        fs.write(path, b"")

    def __call__(self, piece: bytes) -> None:
        self.buf += piece
        if len(self.buf) >= self.chunk:
            self.fs.append(self.path, bytes(self.buf))
            self.buf.clear()

    def close(self) -> None:
        if self.buf:
            self.fs.append(self.path, bytes(self.buf))
            self.buf.clear()
        self.fs.fsync(self.path)


@dataclass
class Updater:
    """Applies updates to one device's store; every mutation through ``fs``.

    - ``u = Updater(root)``; ``active = u.boot()`` at every start (recovery, boot-loop guard,
      pointer repair) and serve ``u.model_path()``;
    - ``u.offer(update)`` queues it; ``u.poll()`` (the agent's loop) stages it at once and
      swaps when the scheduler allows; ``u.apply(update)`` does all of it now (waiting for
      the lock) and returns the report;
    - ``u.reports()`` are the reports for the hub, kept until ``u.ack_report(report["id"])``;
    - ``on_swap(active)`` is called after each switch so the serving code reloads.

    Not thread-safe: one agent thread drives it; sessions only touch ``lock``. ``flock``
    (``store_lock(root)``) keeps other processes out while it recovers, stages or swaps.
    """

    root: Path
    fs: FileOps = field(default_factory=FileOps)
    health: HealthFn = default_health
    lock: UpdateLock = field(default_factory=UpdateLock)
    policy: UpdatePolicy = field(default_factory=UpdatePolicy)
    clock: Callable[[], float] = time.time
    max_starts: int = MAX_STARTS
    free_bytes: Callable[[], int] | None = None  # default: the store's file system's free space
    on_swap: Callable[[Active], None] | None = None
    chunk: int = CHUNK  # bytes per append of a staged file

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.store = SlotStore(self.root, self.fs, self.chunk)
        self.scheduler = UpdateScheduler(self.lock, self.policy, self.clock)
        self.flock = store_lock(self.root)  # against other processes on this store
        self.active: Active | None = None
        self.pending: Update | None = None
        self.log: list[dict[str, Any]] = []  # reports made by this instance, in order

    # -- the journal ----------------------------------------------------------------------

    def journal(self) -> dict[str, Any]:
        j = self.store.read_json("journal")
        return j if isinstance(j, dict) and isinstance(j.get("state"), str) else {"state": "idle"}

    def _set(self, j: dict[str, Any]) -> None:
        if self.store.read_json("journal") != j:
            self.store.write_json("journal", j)

    # -- boot -----------------------------------------------------------------------------

    def boot(self) -> Active:
        """Recover from whatever a crash left, then return the verified model to serve.

        Raises:
            UpdateError: no verified model is left on the device.
        """
        with self.flock.hold():
            self.store.init()
            j = self.journal()
            state = j.get("state")
            try:
                if state == "staging":
                    self._abort(j, Reason.INTERRUPTED,
                                "power was lost before the update installed")
                elif state == "installed":
                    self._switch_and_trial(j)
                elif state == "trial":
                    self._trial(j)
                elif state == "rolling_back":
                    self._rollback(j, Reason(j.get("reason", Reason.INTERRUPTED.value)),
                                   str(j.get("detail", "")))
                elif state == "committing":
                    self._commit(j)
            except (UpdateError, KeyError, ValueError) as exc:
                # A journal naming models that are gone: fall through to the pointers.
                self.store.write_json("journal", {"state": "idle", "note": str(exc)[:200]})
            active, source = self.store.resolve()
            if source != "current":
                self._report({"txn": f"boot-{active.model_sha256[:16]}", "kind": "boot",
                              "target": active.to_dict(), "previous": None}, "fallback",
                             Reason.VERIFY_FAILED, f"the current model failed verification; "
                             f"serving {active.describe()} from {source}")
            self.store.gc([active, self.store.read_pointer("last_good")])
            self.active = active
            return active

    def model_path(self) -> Path:
        """The active model.gguf (after boot)."""
        if self.active is None:
            raise StateError("call boot() first")
        return self.store.model_path(self.active)

    def adapter_path(self) -> Path | None:
        if self.active is None:
            raise StateError("call boot() first")
        return self.store.adapter_path(self.active)

    # -- offers ---------------------------------------------------------------------------

    def offer(self, update: Update) -> dict[str, Any] | None:
        """Queue an update; returns the already-installed report when it is the active one."""
        if self.active is None:
            raise StateError("call boot() first")
        if update.target == self.active:
            return self._report(self._jrec(update, "idle"), "already_installed",
                                Reason.ALREADY_INSTALLED, f"{self.active.describe()} is active")
        self.pending = update
        return None

    def poll(self, now: float | None = None) -> dict[str, Any] | None:
        """One step of the agent's loop: stage a pending offer; swap when allowed.

        An offer made while another update waits installed is staged after that one lands
        (a newer offer replaces an older one that is still only pending).

        Returns:
            The report when an update was committed, rolled back or refused; else None.
        """
        if self.active is None:
            raise StateError("call boot() first")
        with self.flock.hold(blocking=False) as got:
            if not got:  # another process (a flash receiver) is installing
                return None  # a later tick tries again
            if self.journal()["state"] == "idle":
                self._follow_pointer()
            if self.journal()["state"] == "idle" and self.pending is not None:
                u, self.pending = self.pending, None  # from here on the journal holds it
                if u.target == self.active:
                    return self._report(self._jrec(u, "idle"), "already_installed",
                                        Reason.ALREADY_INSTALLED,
                                        f"{u.target.describe()} is active")
                refused = self.prepare(u)
                if refused is not None:
                    return refused
            if self.journal()["state"] != "installed":
                return None
            return self.scheduler.run(self._switch_and_trial, now)

    def _follow_pointer(self) -> None:
        """Serve what ``current`` names when another process (``edgellm receive``, under the
        store lock) switched it: once no session holds the lock, verified, then on_swap."""
        cur = self.store.read_pointer("current")
        if cur is None or cur == self.active:
            return
        with self.lock.try_swap() as got:
            if got and self.store.valid(cur):
                self.active = cur
                if self.on_swap is not None:
                    self.on_swap(cur)

    def apply(self, update: Update) -> dict[str, Any]:
        """Stage, install, switch (waiting for the lock, ignoring the policy), check, commit."""
        with self.flock.hold():
            noop = self.offer(update)
            if noop is not None:
                return noop
            refused = self.prepare(update)
            self.pending = None
            if refused is not None:
                return refused
            while True:
                with self.lock.try_swap() as got:
                    if got:
                        return self._switch_and_trial()
                time.sleep(0.01)

    # -- staging --------------------------------------------------------------------------

    def _jrec(self, u: Update, state: str) -> dict[str, Any]:
        assert self.active is not None
        return {"state": state, "txn": u.txn, "kind": u.kind, "target": u.target.to_dict(),
                "previous": self.active.to_dict(),
                "health": None if u.health is None else u.health.to_dict()}

    def prepare(self, u: Update) -> dict[str, Any] | None:
        """Stage, verify and install an update beside the active model (no switch yet).

        Returns:
            None when it is installed and waits for the switch; the report when it was
            refused (then its fallback, if any, has been prepared in its place).
        """
        with self.flock.hold():
            j = self._jrec(u, "staging")
            patch: Patch | None = None
            try:
                patch, _ = self._check(u)
                self._set(j)
                staged = self.store.staging_dir(u.txn)
                self._stage(u, patch, staged)
                if u.kind == "adapter":
                    assert u.adapter_sha256 is not None
                    self.store.install_adapter(staged / "adapter.gguf", u.adapter_sha256)
                else:
                    self.store.install_bundle(staged, u.target)
                j["state"] = "installed"
                self._set(j)
                return None
            except _Refused as r:
                report = self._abort(j, r.reason, r.detail, outcome="refused")
            if u.fallback is not None and report["reason"] in (
                    Reason.BASE_MISMATCH.value, Reason.PATCH_INVALID.value,
                    Reason.VERIFY_FAILED.value, Reason.INVALID.value):
                return self.prepare(u.fallback)
            return report

    def _check(self, u: Update) -> tuple[Patch | None, int]:
        """Refuse an offer that cannot apply here, before any write (C1, B6)."""
        assert self.active is not None
        if u.kind not in KINDS:
            raise _Refused(Reason.INVALID, f"unknown update kind {u.kind!r}")
        need = {"bundle": ("model.gguf", "bundle.json"), "delta": ("patch", "bundle.json"),
                "adapter": ("patch",)}[u.kind]
        missing = [n for n in need if n not in u.files or not Path(u.files[n]).is_file()]
        if missing:
            raise _Refused(Reason.INVALID, f"the update lacks {missing}")
        patch = None
        size = sum(Path(u.files[n]).stat().st_size for n in need if n != "patch")
        if u.kind in ("delta", "adapter"):
            try:
                patch = read_patch(u.files["patch"])
            except PatchError as exc:
                raise _Refused(Reason.PATCH_INVALID, str(exc)) from None
            want_kind = "delta" if u.kind == "delta" else "adapter"
            result = u.model_sha256 if u.kind == "delta" else u.adapter_sha256
            if patch.kind != want_kind or patch.result_sha256 != result:
                raise _Refused(Reason.INVALID, f"the patch is a {patch.kind} for "
                               f"{patch.result_sha256[:12]}..., the offer wants {want_kind} "
                               f"{(result or '')[:12]}...")
            if patch.base_sha256 != self.active.model_sha256:
                raise _Refused(Reason.BASE_MISMATCH, f"the patch needs base "
                               f"{patch.base_sha256[:12]}...; this device runs "
                               f"{self.active.describe()}")
            size += patch.result_size
        if u.kind == "adapter" and u.model_sha256 != self.active.model_sha256:
            raise _Refused(Reason.BASE_MISMATCH, "the adapter is for another base model")
        free = self.free_bytes() if self.free_bytes else shutil.disk_usage(self.root).free
        if size > free:
            raise _Refused(Reason.NO_SPACE, f"{size} bytes to stage, {free} free")
        return patch, size

    def _stage(self, u: Update, patch: Patch | None, staged: Path) -> None:
        """Write the update into staging/<txn>/ (fsynced) and verify it there."""
        assert self.active is not None
        fs = self.fs
        if staged.exists():
            fs.remove_tree(staged)
        fs.mkdir(staged)
        fs.fsync_dir(self.store.staging)
        try:
            if u.kind == "bundle":
                self.store.copy_in(Path(u.files["model.gguf"]), staged / MODEL_NAME)
            if u.kind in ("delta", "adapter"):
                assert patch is not None
                out = staged / (MODEL_NAME if u.kind == "delta" else "adapter.gguf")
                sink = _Sink(fs, out, self.chunk)
                # The base is hashed again while read (A8: what is verified is what is used).
                apply_patch(patch, self.store.model_path(self.active), sink)
                sink.close()
            if u.kind != "adapter":
                self.store.copy_in(Path(u.files["bundle.json"]), staged / MANIFEST_NAME)
            fs.fsync_dir(staged)
            if u.kind != "adapter":
                b = read_manifest(staged).verify()
                if (b.file(MODEL_NAME).sha256, b.node, b.version) != (
                        u.model_sha256, u.node, u.version):
                    raise UpdateError(f"the staged bundle is {b.node}@{b.version} "
                                      f"{b.file(MODEL_NAME).sha256[:12]}..., the signed offer "
                                      f"says {u.node}@{u.version} {u.model_sha256[:12]}...")
        except PatchBaseError as exc:
            raise _Refused(Reason.BASE_MISMATCH, str(exc)) from None
        except PatchError as exc:
            raise _Refused(Reason.PATCH_INVALID, str(exc)) from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _Refused(Reason.NO_SPACE, str(exc)) from None
            raise
        except EdgeLLMError as exc:
            raise _Refused(Reason.VERIFY_FAILED, str(exc)) from None

    # -- switch, trial, commit, rollback -----------------------------------------------------

    def _switch_and_trial(self, j: dict[str, Any] | None = None) -> dict[str, Any]:
        j = self.journal() if j is None else j
        target = Active.from_dict(j["target"])
        if not self.store.valid(target):
            return self._rollback(j, Reason.VERIFY_FAILED,
                                  f"the installed update {target.describe()} no longer verifies")
        self._switch(j)
        return self._trial(j)

    def _switch(self, j: dict[str, Any]) -> None:
        target = Active.from_dict(j["target"])
        self.store.write_pointer("current", target)
        if j["state"] != "trial":
            self.store.set_boot_count(0)
            j["state"] = "trial"
            self._set(j)
        self.active = target
        if self.on_swap is not None:
            self.on_swap(target)

    def _trial(self, j: dict[str, Any]) -> dict[str, Any]:
        target = Active.from_dict(j["target"])
        starts = self.store.boot_count()
        if starts >= self.max_starts:
            return self._rollback(j, Reason.BOOT_LOOP,
                                  f"{starts} starts of {target.describe()} did not finish")
        self.store.set_boot_count(starts + 1)  # durable before the load (B4)
        self.store.write_pointer("current", target)
        self.active = target
        spec = HealthSpec.from_dict(j["health"]) if j.get("health") else None
        adapter = self.store.adapter_path(target)
        result = self.health(self.store.model_path(target), spec, adapter, target.adapter_scale)
        if result.ok:
            return self._commit(j, result)
        return self._rollback(j, result.reason, result.detail, result)

    def _commit(self, j: dict[str, Any], result: HealthResult | None = None) -> dict[str, Any]:
        if result is not None:
            j["result"] = result.to_dict()
        j["state"] = "committing"
        self._set(j)
        target = Active.from_dict(j["target"])
        self.store.write_pointer("current", target)
        self.store.write_pointer("last_good", target)
        self.store.set_boot_count(0)
        self.store.gc([target])
        self.active = target
        report = self._report(j, "committed", Reason.OK, f"{target.describe()} is active")
        self._set({"state": "idle", "last": {"txn": j["txn"], "outcome": "committed"}})
        return report

    def _rollback(self, j: dict[str, Any], reason: Reason, detail: str,
                  result: HealthResult | None = None) -> dict[str, Any]:
        if result is not None:
            j["result"] = result.to_dict()
        j.update(state="rolling_back", reason=reason.value, detail=detail)
        self._set(j)
        previous = Active.from_dict(j["previous"])
        self.store.write_pointer("current", previous)
        self.store.set_boot_count(0)
        good = self.store.read_pointer("last_good")
        self.store.gc([previous, good])
        self.active, _ = self.store.resolve()
        if self.on_swap is not None:
            self.on_swap(self.active)
        report = self._report(j, "rolled_back", reason, detail)
        self._set({"state": "idle", "last": {"txn": j["txn"], "outcome": "rolled_back"}})
        return report

    def _abort(self, j: dict[str, Any], reason: Reason, detail: str,
               outcome: str = "aborted") -> dict[str, Any]:
        staged = self.store.staging / j["txn"]
        if staged.exists():
            self.fs.remove_tree(staged)
            self.fs.fsync_dir(self.store.staging)
        report = self._report(j, outcome, reason, detail)
        if self.journal()["state"] != "idle":
            self._set({"state": "idle", "last": {"txn": j["txn"], "outcome": outcome}})
        return report

    # -- reports --------------------------------------------------------------------------

    def _report(self, j: dict[str, Any], outcome: str, reason: Reason,
                detail: str) -> dict[str, Any]:
        """Build a report and store it durably in the outbox before anyone sees it (B8)."""
        r: dict[str, Any] = {
            "v": 1, "type": "update_report", "id": f"{j['txn']}.{outcome}", "txn": j["txn"],
            "kind": j["kind"],
            "outcome": outcome, "reason": reason.value, "detail": detail[:500],
            "target": j.get("target"), "previous": j.get("previous"),
            "active": None if self.active is None else self.active.to_dict(),
            "health": j.get("result"), "at": self.clock(),
        }
        self.store.put_report(r)
        self.log.append(r)
        return r

    def reports(self) -> list[dict[str, Any]]:
        """Reports waiting for the hub's acknowledgement (durable)."""
        return self.store.reports()

    def ack_report(self, report_id: str) -> None:
        """The hub acknowledged the report with this ``id``: drop it from the outbox."""
        self.store.ack_report(report_id)
