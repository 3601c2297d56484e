# SPDX-License-Identifier: MIT
"""Shared by the bench scripts: model shapes, file names, run context, bandwidth and JSON lines."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
MODELS_DIR = BENCH_DIR / "models"  # git-ignored
OUT_DIR = BENCH_DIR / "out"  # git-ignored

# Run edgellm from this checkout (`make build` builds the core in place), not an installed copy;
# or from the snapshot a bench run took of it (snapshot_package), so that one run measures one
# build even while others rebuild the checkout.
SNAPSHOT_ENV = "EDGELLM_BENCH_PKG"
_PKG_ROOT = os.environ.get(SNAPSHOT_ENV) or str(REPO)
if _PKG_ROOT not in sys.path:
    sys.path.insert(0, _PKG_ROOT)


def snapshot_package() -> Path:
    """Copy the checkout's edgellm package (with its built core) to bench/out/pkg-<time>/ and
    import from there in this process and its children. Call before importing edgellm."""
    if "edgellm" in sys.modules:
        raise RuntimeError("snapshot_package() must run before edgellm is imported")
    dest = OUT_DIR / f"pkg-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    shutil.copytree(
        REPO / "edgellm", dest / "edgellm", ignore=shutil.ignore_patterns("__pycache__")
    )
    os.environ[SNAPSHOT_ENV] = str(dest)
    if str(REPO) in sys.path:
        sys.path.remove(str(REPO))
    sys.path.insert(0, str(dest))
    return dest


# The two shapes we compare on (random weights; the shapes of the public checkpoints).
# Names follow the dimension vocabulary of STYLE.md section 5.
MODELS: dict[str, dict[str, Any]] = {
    "smollm-135m": {
        "label": "SmolLM-135M",
        "dim": 576,
        "hidden_dim": 1536,
        "n_layers": 30,
        "n_heads": 9,
        "n_kv_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tied": True,
        "rope_base": 10000.0,
        "seq_len": 2048,
        "norm_eps": 1e-5,
    },
    "tinyllama-1.1b": {
        "label": "TinyLlama-1.1B",
        "dim": 2048,
        "hidden_dim": 5632,
        "n_layers": 22,
        "n_heads": 32,
        "n_kv_heads": 4,
        "head_dim": 64,
        "vocab_size": 32000,
        "tied": False,
        "rope_base": 10000.0,
        "seq_len": 2048,
        "norm_eps": 1e-5,
    },
}
TYPES = ("q8_0", "q4_0")


def model_path(model: str, qtype: str) -> Path:
    """bench/models/<model>-<type>.gguf, written by make_models.py."""
    return MODELS_DIR / f"{model}-{qtype}.gguf"


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


# --------------------------------------------------------------------------------------
# Run context: every JSON line carries it (STYLE.md section 9).


def git_sha() -> str:
    """Short HEAD, with "-dirty" when the work tree differs from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def git_diff_id() -> str | None:
    """First 12 hex of sha256(git diff HEAD): tells two dirty trees of one commit apart."""
    try:
        diff = subprocess.run(
            ["git", "diff", "HEAD"], cwd=REPO, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return hashlib.sha256(diff).hexdigest()[:12] if diff else None


def native_id() -> dict[str, Any]:
    """Path, first 12 hex of sha256 and mtime of the compiled core edgellm imports."""
    try:
        from edgellm import _native

        so = Path(_native.__file__).parent.glob("_edgellm_cffi*.so")
        path = next(iter(sorted(so)))
        return {
            "native_path": str(path),
            "native_sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:12],
            "native_mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(path.stat().st_mtime)),
        }
    except Exception as exc:
        return {"native_error": f"{type(exc).__name__}: {exc}"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> list[float]:
    """1, 5 and 15 minute load averages (what `uptime` prints)."""
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
    return sum(f) - idle, sum(f)


def cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over the next `interval` seconds (others' load while we idle)."""
    try:
        b0, t0 = _cpu_times()
        time.sleep(interval)
        b1, t1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return round((b1 - b0) / max(t1 - t0, 1), 3)


def wait_quiet(max_busy: float, timeout: float) -> float:
    """Wait (up to timeout s) until others keep less than max_busy of the CPUs busy; return it."""
    deadline = time.monotonic() + timeout
    busy = cpu_busy()
    while busy > max_busy and time.monotonic() < deadline:
        busy = cpu_busy(2.0)
    return busy


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "kernel": platform.release(),
    }


def edgellm_info() -> dict[str, Any]:
    """ISA chosen by edgellm and the compiler of its core; error text when the core won't load."""
    try:
        from edgellm import _native

        bi = _native.build_info()
        return {
            "isa": bi.get("active"),
            "compiler": bi.get("compiler"),
            "edgellm_version": bi.get("version"),
        }
    except Exception as exc:
        return {"isa": None, "compiler": None, "edgellm_error": f"{type(exc).__name__}: {exc}"}


def llamacpp_version() -> str | None:
    try:
        import llama_cpp

        return str(llama_cpp.__version__)
    except Exception:
        return None


def context() -> dict[str, Any]:
    """The fields every result line carries."""
    return {
        "git": git_sha(),
        "git_diff": git_diff_id(),
        "machine": machine(),
        **edgellm_info(),
        **native_id(),
        "llama_cpp_python": llamacpp_version(),
        "python": platform.python_version(),
    }


def stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class JsonLines:
    """Appends one JSON object per line to bench/out/<name>-<time>.jsonl and keeps them."""

    def __init__(self, name: str) -> None:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        self.path = OUT_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        self.rows: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def log(msg: str) -> None:
    """Human output goes to stderr (STYLE.md section 9)."""
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Bytes each decoded token must read, and the machine's read bandwidth.


def weight_bytes_per_token(path: Path) -> dict[str, int]:
    """Bytes of weights one decode step reads: every 2-D weight once, the embedding as one row.

    With tied embeddings token_embd is also the output matrix, so it is read in full.
    """
    import gguf  # llama.cpp's reader: independent of the edgellm code under test

    r = gguf.GGUFReader(path)
    infos = {t.name: t for t in r.tensors}
    two_d = {n: int(i.n_bytes) for n, i in infos.items() if len(i.shape) == 2}
    total = sum(two_d.values())
    embd = two_d["token_embd.weight"]
    row = embd // int(infos["token_embd.weight"].shape[1])  # GGUF order: (dim, vocab_size)
    # Tied: token_embd is also the output matrix, so it is read in full besides the row.
    per_token = total - embd + row if "output.weight" in two_d else total + row
    return {
        "file_bytes": path.stat().st_size,
        "weight_bytes_2d": total,
        "bytes_per_token": per_token,
    }


_BW_SRC = BENCH_DIR / "bandwidth.c"


def _bandwidth_binary() -> Path | None:
    """Compile bench/bandwidth.c into bench/out/ (once per source change); None if no compiler."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    exe = OUT_DIR / "bandwidth"
    if exe.exists() and exe.stat().st_mtime >= _BW_SRC.stat().st_mtime:
        return exe
    # -O3 -march=native: the widest loads this CPU has, so the bound is not set by the test.
    r = subprocess.run(
        [cc, "-O3", "-march=native", "-pthread", "-o", str(exe), str(_BW_SRC)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        log(f"bandwidth.c did not compile ({r.stderr.strip()[:200]}); using numpy")
        return None
    return exe


def read_bandwidth(threads: int, mib: int = 512, reps: int = 11) -> dict[str, Any]:
    """Best-of-reps DRAM read bandwidth in bytes/s with `threads` readers over `mib` MiB."""
    exe = _bandwidth_binary()
    if exe is not None:
        out = subprocess.run(
            [str(exe), str(threads), str(mib), str(reps)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return {"method": "bench/bandwidth.c", "threads": threads, "mib": mib, **json.loads(out)}
    import numpy as np  # fallback: one reader only, so it understates multi-thread bandwidth

    a = np.ones(mib * 2**20 // 8, dtype=np.int64)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t))
    return {"method": "numpy sum", "threads": 1, "mib": mib, "best_bytes_per_s": best}
