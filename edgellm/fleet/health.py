# SPDX-License-Identifier: MIT
"""The health check a new model must pass before it is committed, run in a child process.

The hub records, with each release, a ``HealthSpec``: a golden prompt, the greedy
continuation it expects (token ids), how much of it must agree, and a latency budget. The
device loads the new model in a *child* process (``python -m edgellm.fleet.health``), so a
crash or a hang on load cannot take the agent down, and judges what the child measured:

- load: the model (and its adapter) loads at all (``LOAD_FAILED``; a child killed by a
  signal is ``CRASH``, one over the memory limit ``OOM``, one past the timeout ``TIMEOUT``);
- every logit of the prompt and of each generated step is finite (``NAN``);
- the greedy continuation agrees with the expected one on at least ``min_agreement`` of its
  tokens, counted up to the first difference (``WRONG_OUTPUT``);
- the 95th percentile of per-token decode time is within ``max_ms_per_token`` (``TOO_SLOW``);
- over ``rounds`` runs ``interval_s`` apart (the health window), every run gives the same
  continuation, and the p95 covers all of them.

Public API: ``Reason`` (every reason an update is refused or rolled back, sent upstream),
``HealthSpec``, ``HealthResult``, ``check_model`` (the child-process check), ``check_files``
(the cheap in-process check used where a test is about file operations), ``record_golden``
(hub side), ``greedy_run`` (what both sides run).

.. versionadded:: 0.1
"""

from __future__ import annotations

import enum
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import EdgeLLMError

__all__ = ["HealthResult", "HealthSpec", "Reason", "check_files", "check_model", "greedy_run",
           "record_golden"]


class Reason(str, enum.Enum):
    """Why an update was refused, aborted or rolled back (the ``reason`` of a report)."""

    OK = "ok"
    ALREADY_INSTALLED = "already_installed"  # the offered model is the active one (B7)
    LOAD_FAILED = "load_failed"  # the loader raised: malformed, truncated, unsupported
    CRASH = "crash"  # the child died without a result (a signal, an abort)
    TIMEOUT = "timeout"  # no result within the watchdog's time (a hang)
    OOM = "oom"  # out of memory (the limit, or the kernel's OOM killer)
    NAN = "nan"  # non-finite logits
    WRONG_OUTPUT = "wrong_output"  # the golden prompt's continuation is outside tolerance
    TOO_SLOW = "too_slow"  # p95 decode latency over the budget
    VERIFY_FAILED = "verify_failed"  # a file's size or sha256 differs from its manifest
    BASE_MISMATCH = "base_mismatch"  # a delta or adapter for a model this device lacks
    PATCH_INVALID = "patch_invalid"  # a patch that does not parse or does not verify
    NO_SPACE = "no_space"  # not enough free space for the staged copy (B6)
    BOOT_LOOP = "boot_loop"  # the model on trial failed to start too many times (B4)
    INTERRUPTED = "interrupted"  # a power cut before the update was verified and installed
    INVALID = "invalid"  # an offer that contradicts itself (node, sha, kind)
    # Refusals before the updater (TUF verification, target policy: fleet.device_updates)
    BAD_SIGNATURE = "bad_signature"  # metadata under its role's threshold / by unknown keys
    ROLLBACK = "rollback"  # metadata older than trusted (replay, rollback, mix of versions)
    EXPIRED = "expired"  # metadata past its expiry (a freeze attack or a silent signer)
    HASH_MISMATCH = "hash_mismatch"  # bytes whose sha256 differs from the signed one
    LENGTH_MISMATCH = "length_mismatch"  # bytes longer / shorter than signed, over the limits
    REPOSITORY = "repository"  # other malformed or inconsistent metadata
    UNKNOWN_TARGET = "unknown_target"  # the offer names a target the signed metadata lacks
    RELEASE_DOWNGRADE = "release_downgrade"  # a release counter below the installed one
    WRONG_BOARD = "wrong_board"  # signed for another hardware id
    WRONG_DEVICE = "wrong_device"  # signed for other device ids
    WRONG_NODE = "wrong_node"  # signed for another model node
    DOWNLOAD_FAILED = "download_failed"  # the hub or broker did not deliver (not tampering)


@dataclass(frozen=True)
class HealthSpec:
    """What the hub expects of a release on a device (recorded with the release)."""

    prompt: str
    expected: tuple[int, ...]  # greedy continuation token ids, as the hub's run produced them
    min_agreement: float = 0.75  # share of expected tokens matched before the first difference
    max_ms_per_token: float = 1000.0  # p95 decode latency budget on the device
    timeout_s: float = 60.0  # the watchdog: load + prompt + decode
    n_threads: int = 1
    memory_limit_bytes: int | None = None  # address space loading may add (None: no limit)
    rounds: int = 1  # golden runs in the health window (B3: e.g. 15 on a device)
    interval_s: float = 0.0  # pause between rounds (e.g. 60: a 15-minute window)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["expected"] = list(self.expected)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HealthSpec:
        """From to_dict(), or from its signed form (release.health_custom: TUF's canonical
        JSON has no floats, so they come as ints or decimal strings and are cast back)."""
        out = {**d, "expected": tuple(int(t) for t in d["expected"])}
        for k in ("min_agreement", "max_ms_per_token", "timeout_s", "interval_s"):
            if k in out:
                out[k] = float(out[k])
        for k in ("n_threads", "rounds"):
            if k in out:
                out[k] = int(out[k])
        if out.get("memory_limit_bytes") is not None:
            out["memory_limit_bytes"] = int(out["memory_limit_bytes"])
        return cls(**out)


@dataclass
class HealthResult:
    """The verdict: ok, the reason when not, a one-line detail and the measurements."""

    ok: bool
    reason: Reason
    detail: str = ""
    measured: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "reason": self.reason.value, "detail": self.detail,
                "measured": self.measured}


def greedy_run(model: Any, prompt: str, n_tokens: int) -> dict[str, Any]:
    """Greedy-decode n_tokens after prompt with a loaded Model; time each step.

    Returns:
        {"tokens": [...], "finite": bool, "step_ms": [...]}; decoding goes on past an end of
        sequence token (the hub's record does the same), and stops at the first non-finite
        logits.
    """
    import numpy as np

    ids = model.tokenize(prompt)
    out: list[int] = []
    step_ms: list[float] = []
    with model.session(n_ctx=len(ids) + n_tokens + 1) as s:
        logits = s.eval(ids, logits="all")
        if not np.isfinite(logits).all():
            return {"tokens": out, "finite": False, "step_ms": step_ms}
        last = logits[-1]
        for _ in range(n_tokens):
            nxt = int(np.argmax(last))
            out.append(nxt)
            t0 = time.perf_counter()
            last = s.eval([nxt])
            step_ms.append((time.perf_counter() - t0) * 1e3)
            if not np.isfinite(last).all():
                return {"tokens": out, "finite": False, "step_ms": step_ms}
    return {"tokens": out, "finite": True, "step_ms": step_ms}


def record_golden(model_path: str | os.PathLike[str], prompt: str, n_tokens: int = 16, *,
                  adapter: str | os.PathLike[str] | None = None, adapter_scale: float = 1.0,
                  **kwargs: Any) -> HealthSpec:
    """Hub side: run the release once and record its spec (kwargs: the tolerances)."""
    from ..runtime.model import Model

    with Model(model_path, n_threads=1) as m:
        if adapter is not None:
            m.attach_adapter(adapter, adapter_scale)
        run = greedy_run(m, prompt, n_tokens)
    if not run["finite"]:
        raise EdgeLLMError(f"{model_path}: non-finite logits; this release cannot ship")
    return HealthSpec(prompt, tuple(run["tokens"]), **kwargs)


def _p95(xs: list[float]) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)]


def judge(run: dict[str, Any], spec: HealthSpec) -> HealthResult:
    """Compare a child's measurements with the spec."""
    tokens = [int(t) for t in run.get("tokens", [])]
    p95 = _p95([float(x) for x in run.get("step_ms", [])])
    agree = 0
    for a, b in zip(tokens, spec.expected):
        if a != b:
            break
        agree += 1
    share = agree / len(spec.expected) if spec.expected else 1.0
    measured = {"tokens": tokens, "agreement": share, "p95_ms_per_token": p95,
                "load_s": run.get("load_s"), "rounds": run.get("rounds", 1)}
    if not run.get("finite", False):
        return HealthResult(False, Reason.NAN, "non-finite logits", measured)
    if not run.get("stable", True):
        return HealthResult(False, Reason.WRONG_OUTPUT, "the golden continuation changed "
                            "between rounds of the health window", measured)
    if share < spec.min_agreement:
        return HealthResult(False, Reason.WRONG_OUTPUT,
                            f"golden prompt: {agree}/{len(spec.expected)} tokens agree, "
                            f"{spec.min_agreement:.0%} needed", measured)
    if p95 > spec.max_ms_per_token:
        return HealthResult(False, Reason.TOO_SLOW, f"p95 decode {p95:.3g} ms/token over the "
                            f"budget of {spec.max_ms_per_token:g}", measured)
    return HealthResult(True, Reason.OK, "", measured)


def check_model(model: str | os.PathLike[str], spec: HealthSpec, *,
                adapter: str | os.PathLike[str] | None = None,
                adapter_scale: float = 1.0) -> HealthResult:
    """Load a model in a child process, run the golden prompt, judge it (never raises).

    Args:
        model: the model.gguf to check.
        spec: the release's HealthSpec.
        adapter: an adapter GGUF to attach first.
        adapter_scale: its scale.

    Returns:
        The HealthResult; ``reason`` says what failed.
    """
    job = {"model": str(model), "adapter": None if adapter is None else str(adapter),
           "scale": adapter_scale, "prompt": spec.prompt, "n_tokens": len(spec.expected),
           "n_threads": spec.n_threads, "memory_limit": spec.memory_limit_bytes,
           "rounds": spec.rounds, "interval_s": spec.interval_s}
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable, "-m", "edgellm.fleet.health"],
                           input=json.dumps(job), capture_output=True, text=True, check=False,
                           timeout=spec.timeout_s)
    except subprocess.TimeoutExpired:
        return HealthResult(False, Reason.TIMEOUT, f"no result within {spec.timeout_s:g} s "
                            "(the child was killed)", {"wall_s": time.monotonic() - t0})
    wall = time.monotonic() - t0
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    try:
        out = json.loads(last) if last else None
    except json.JSONDecodeError:
        out = None
    if not isinstance(out, dict):
        if r.returncode < 0:
            sig = -r.returncode
            reason = Reason.OOM if sig == 9 else Reason.CRASH
            return HealthResult(False, reason, f"the child died of signal {sig}",
                                {"wall_s": wall})
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return HealthResult(False, Reason.CRASH, f"the child exited {r.returncode}: {tail}",
                            {"wall_s": wall})
    if "error" in out:
        oom = out["error"] == "MemoryError" or "memory" in str(out.get("message", "")).lower()
        reason = Reason.OOM if oom else Reason.LOAD_FAILED
        return HealthResult(False, reason, f"{out['error']}: {out.get('message', '')}"[:300],
                            {"wall_s": wall})
    result = judge(out, spec)
    result.measured["wall_s"] = wall
    return result


def check_files(model: str | os.PathLike[str], spec: HealthSpec | None = None, *,
                adapter: str | os.PathLike[str] | None = None,
                adapter_scale: float = 1.0) -> HealthResult:
    """The cheap in-process check: the files parse as a model (and adapter). No forward."""
    from ..formats.adapter import read_adapter
    from ..formats.gguf import read_gguf

    try:
        with read_gguf(model):
            pass
        if adapter is not None:
            with read_adapter(adapter):
                pass
    except (EdgeLLMError, OSError) as exc:
        return HealthResult(False, Reason.LOAD_FAILED, str(exc)[:300])
    return HealthResult(True, Reason.OK)


def _vm_size() -> int:
    """This process's mapped address space in bytes (Linux), 0 where unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _child() -> int:
    """The child's side: read the job from stdin, print one JSON line, exit."""
    job = json.loads(sys.stdin.read())
    try:
        from ..runtime.model import Model

        if job.get("memory_limit"):
            import resource

            # The limit is on what loading adds: the interpreter and numpy are already mapped.
            limit = _vm_size() + int(job["memory_limit"])
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        t0 = time.perf_counter()
        with Model(job["model"], n_threads=int(job["n_threads"])) as m:
            if job.get("adapter"):
                m.attach_adapter(job["adapter"], float(job["scale"]))
            load_s = time.perf_counter() - t0
            runs = []
            for r in range(max(1, int(job.get("rounds", 1)))):
                if r:
                    time.sleep(float(job.get("interval_s", 0.0)))
                runs.append(greedy_run(m, job["prompt"], int(job["n_tokens"])))
                if not runs[-1]["finite"]:
                    break
        run = {"tokens": runs[0]["tokens"], "finite": all(x["finite"] for x in runs),
               "step_ms": [ms for x in runs for ms in x["step_ms"]], "rounds": len(runs),
               "stable": all(x["tokens"] == runs[0]["tokens"] for x in runs), "load_s": load_s}
    except MemoryError as exc:
        print(json.dumps({"error": "MemoryError", "message": str(exc)}))
        return 3
    except Exception as exc:  # every failure becomes a typed line for the parent
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        return 3
    print(json.dumps(run))
    return 0


if __name__ == "__main__":
    sys.exit(_child())
