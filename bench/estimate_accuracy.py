# SPDX-License-Identifier: MIT
"""How close edgellm.hub.estimate comes to measurements on this machine: decode speed and memory.

Three modes (human output on stderr, JSON lines in bench/out/estimate-<time>.jsonl):

- speed (default): measures this machine's read bandwidth with boards.calibrate_bandwidth()
  and each weight type's per-core kernel rate (hub.bench.kernel_rates), predicts decode
  tokens/s with the x86-host profile at that bandwidth, and measures decode tokens/s (median
  of --reps runs, 1 thread and all threads, 128-token prompt then --gen-tokens greedy tokens)
  on models big enough to be bandwidth-bound: the TinyLlama-1.1B-shaped Q4_0 and Q8_0 files of
  bench/make_models.py and a SmolLM-135M-shaped one. The goal: within 25%.
- --memory: peak RSS (loading plus 256 generated tokens) of the test models against
  estimate.memory_bytes. The goal: within 10% (tests/test_estimate.py asserts it in CI).
- --overhead: refits estimate.RUNTIME_BASE_BYTES, TOKENIZER_BYTES_PER_TOKEN and
  TOKENIZER_BYTES_PER_MERGE: the peak RSS (median of --reps) of 1-layer, dim-64 models with
  SentencePiece and byte-level BPE vocabularies of 512 to 65536 tokens, minus weights, KV
  cache and scratch, fitted by least squares over (1, vocab_size, merges).

Usage:
    python bench/estimate_accuracy.py [--models tinyllama-1.1b-q4_0,...] [--reps 5]
    python bench/estimate_accuracy.py --memory
    python bench/estimate_accuracy.py --overhead
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from support.random_gguf import Shape, write_random_gguf  # noqa: E402

from edgellm.hub import estimate  # noqa: E402
from edgellm.hub.bench import measure_peak_rss, run_context  # noqa: E402

OUT = BENCH / "out"
VOCABS = (512, 4096, 16384, 32000, 65536)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def overhead(reps: int) -> list[dict[str, Any]]:
    """Fit the runtime overhead constants; returns the rows measured."""
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tok in ("spm", "bpe"):
            for v in VOCABS:
                shape = Shape(dim=64, hidden_dim=128, n_layers=1, n_heads=2, n_kv_heads=1,
                              vocab_size=v, seq_len=512, tied=True)
                path = write_random_gguf(Path(tmp) / f"{tok}{v}.gguf", shape, "q8_0", tokenizer=tok)
                facts = estimate.model_facts(path)
                runs = [measure_peak_rss(path, 512, n_threads=1, gen_tokens=256) for _ in range(reps)]
                hwm = statistics.median(r["VmHWM"] for r in runs)
                mem = estimate.memory_bytes(facts.config, facts.weights_bytes, 512, runs[0]["kv_type"],
                                            n_threads=1, n_tokens=runs[0]["positions"])
                rest = hwm - mem.weights - mem.kv_cache - mem.scratch
                rows.append({"kind": "overhead", "tokenizer": tok, "vocab_size": v,
                             "n_merges": facts.n_merges, "peak_rss": hwm, "weights": mem.weights,
                             "rest": rest})
                log(f"{tok} vocab {v:6d}, {facts.n_merges:6d} merges: peak RSS {hwm / 1e6:7.2f} MB, "
                    f"runtime {rest / 1e6:6.2f} MB")
    a = np.array([[1.0, r["vocab_size"], r["n_merges"]] for r in rows])
    y = np.array([r["rest"] for r in rows], dtype=float)
    (base, per_token, per_merge), *_ = np.linalg.lstsq(a, y, rcond=None)
    worst = max(abs(float(a[i] @ [base, per_token, per_merge]) - y[i]) for i in range(len(y)))
    log(f"fit: RUNTIME_BASE_BYTES = {base:,.0f}, TOKENIZER_BYTES_PER_TOKEN = {per_token:.1f}, "
        f"TOKENIZER_BYTES_PER_MERGE = {per_merge:.1f}; worst residual {worst / 1e6:.2f} MB "
        f"(now {estimate.RUNTIME_BASE_BYTES:,}, {estimate.TOKENIZER_BYTES_PER_TOKEN}, "
        f"{estimate.TOKENIZER_BYTES_PER_MERGE})")
    rows.append({"kind": "overhead_fit", "runtime_base_bytes": base, "tokenizer_bytes_per_token": per_token,
                 "tokenizer_bytes_per_merge": per_merge, "worst_residual": worst})
    return rows


# The memory-accuracy models: the same as tests/test_estimate.py.
MEMORY_MODELS = {
    "dim512-untied-q8_0": (Shape(dim=512, hidden_dim=1408, n_layers=8, n_heads=8, n_kv_heads=4,
                                 vocab_size=8000, seq_len=2048), "q8_0"),
    "dim768-tied-q4_0": (Shape(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=4,
                               vocab_size=16384, seq_len=2048, tied=True), "q4_0"),
}


def memory() -> list[dict[str, Any]]:
    from edgellm.formats.convert import convert

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = REPO / "tests" / "data" / "stories260K"
        paths = {"stories260K-q8_0": (convert(data / "stories260K.bin", Path(tmp) / "s.gguf", type="q8_0",
                                              tokenizer=data / "tok512.bin"), (300, 512))}
        for name, (shape, recipe) in MEMORY_MODELS.items():
            paths[name] = (write_random_gguf(Path(tmp) / f"{name}.gguf", shape, recipe, seed=1), (512, 2048))
        for name in ("smollm-135m-q8_0", "tinyllama-1.1b-q4_0"):  # real sizes, when written
            if (BENCH / "models" / f"{name}.gguf").is_file():
                paths[name] = (BENCH / "models" / f"{name}.gguf", (512, 2048))
        for name, (path, ctxs) in paths.items():
            facts = estimate.model_facts(path)
            for n_ctx in ctxs:
                r = measure_peak_rss(path, n_ctx, n_threads=1, gen_tokens=256)
                mem = estimate.memory_bytes(facts.config, facts.weights_bytes, n_ctx, r["kv_type"],
                                            n_threads=1, n_tokens=r["positions"],
                                            n_merges=facts.n_merges)
                err = (mem.total - r["VmHWM"]) / r["VmHWM"]
                rows.append({"kind": "memory", "model": name, "n_ctx": n_ctx, "measured": r["VmHWM"],
                             "estimate": mem.as_dict(), "positions": r["positions"], "error": err})
                log(f"{name:22s} n_ctx {n_ctx:5d}: measured {r['VmHWM'] / 2**20:7.1f} MiB, "
                    f"estimate {mem.total / 2**20:7.1f} MiB ({err:+.1%}); weights "
                    f"{mem.weights / 2**20:.1f}, KV {mem.kv_cache / 2**20:.1f}, scratch "
                    f"{mem.scratch / 2**20:.2f}, runtime {mem.runtime_overhead / 2**20:.1f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--overhead", action="store_true", help="refit the runtime overhead constants")
    mode.add_argument("--memory", action="store_true", help="memory estimate vs peak RSS")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (medians; default 5)")
    ap.add_argument("--models", default=",".join(SPEED_MODELS),
                    help="bench/models/<name>.gguf files (bench/make_models.py writes them), or "
                    "paths of .gguf files")
    ap.add_argument("--calibrations", type=int, default=3,
                    help="quiet attempts at the bandwidth and kernel rates; the best counts (default 3)")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    ap.add_argument("--gen-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="seconds to wait before each cell for other processes to go quiet (default 60)")
    ap.add_argument("--max-busy", type=float, default=0.10,
                    help="'quiet': others use at most this share of all CPUs (default 0.10)")
    args = ap.parse_args(argv)
    ctx = run_context()
    if args.overhead:
        rows = overhead(args.reps)
    elif args.memory:
        rows = memory()
    else:
        rows = speed(args)
    OUT.mkdir(exist_ok=True)
    path = OUT / f"estimate-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({**ctx, "load": os.getloadavg(), **r}) + "\n")
    log(f"JSON lines: {path}")
    return 0


def _cpu_jiffies() -> tuple[int, int, int]:
    """(all CPUs' busy jiffies, all jiffies, this process's jiffies) since boot."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    me = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return sum(f) - idle, sum(f), int(me[11]) + int(me[12])  # utime + stime, all threads


class _Others:
    """Share of all CPUs that other processes kept busy while the block ran."""

    def __enter__(self) -> _Others:
        self.start = _cpu_jiffies()
        return self

    def __exit__(self, *exc: object) -> None:
        b1, t1, m1 = _cpu_jiffies()
        b0, t0, m0 = self.start
        self.busy = max(0.0, ((b1 - b0) - (m1 - m0)) / max(t1 - t0, 1))


def _wait_quiet(max_busy: float, timeout: float) -> float:
    """Wait up to timeout seconds until others use at most max_busy of the CPUs; return it."""
    deadline = time.monotonic() + timeout
    while True:
        with _Others() as o:
            time.sleep(1.0)
        if o.busy <= max_busy or time.monotonic() >= deadline:
            return o.busy


SPEED_MODELS = ("tinyllama-1.1b-q4_0", "tinyllama-1.1b-q8_0", "smollm-135m-q8_0")


def speed(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Decode tokens/s measured vs estimated with the x86-host profile at this machine's numbers."""
    from edgellm.boards import calibrate_bandwidth, load_board
    from edgellm.hub.bench import _prompt_ids, fmt_kernel_rates, kernel_rates, measure_speed
    from edgellm.runtime.model import Model, default_threads

    rows: list[dict[str, Any]] = []
    paths = [Path(m) if m.endswith(".gguf") else BENCH / "models" / f"{m}.gguf"
             for m in args.models.split(",")]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(map(str, missing))}: run python bench/make_models.py")
    threads = sorted({1, default_threads()})
    types = sorted({t for p in paths for t in estimate.model_facts(p).decode_bytes})
    types = [t for t in types if t in ("q4_0", "q8_0")]  # the weights; norms (f32) are tiny
    # Bandwidth: the best of --calibrations quiet attempts (others only slow a streaming read
    # down). Kernel constants (hub.bench.kernel_rates: decode of synthetic wide and narrow
    # models): the median of the attempts, key by key.
    bw = 0.0
    attempts: dict[str, list[float]] = {}
    for _ in range(args.calibrations):
        _wait_quiet(args.max_busy, args.quiet_wait)
        bw = max(bw, calibrate_bandwidth())  # best of 5 passes over 256 MiB, all CPUs
        for t in threads:
            _wait_quiet(args.max_busy, args.quiet_wait)
            for k, v in kernel_rates(types, n_threads=t).items():
                attempts.setdefault(k, []).append(v)
    rates = {k: statistics.median(v) for k, v in attempts.items()}
    log(f"bandwidth {bw:.1f} GB/s (boards.calibrate_bandwidth, {default_threads()} threads); "
        f"kernels: {fmt_kernel_rates(rates)}")
    base = load_board("x86-host", bandwidth_gbs=bw)
    with_rates = dataclasses.replace(base, measured={**base.measured, **rates})
    rows.append({"kind": "calibration", "bandwidth_gbs": bw, "kernel_gbs": rates})
    n_ctx = args.prompt_tokens + args.gen_tokens
    for path in paths:
        facts = estimate.model_facts(path)
        with Model(path, n_ctx=n_ctx) as m:
            ids = _prompt_ids(facts.config.vocab_size, args.prompt_tokens,
                              m.tokenizer.bos_id if m.tokenizer.add_bos else None)
            for t in threads:  # warm-up: pages the weights in, starts the threads
                measure_speed(m, t, ids, 8, 1, n_ctx=n_ctx)
            # Repetitions interleave the thread counts, and one that others disturbed (they
            # kept more than --max-busy of the CPUs busy during it) is run again, up to 3x reps.
            runs: dict[int, list[tuple[float, float]]] = {t: [] for t in threads}
            for _ in range(3 * args.reps):
                todo = [t for t in threads if sum(b <= args.max_busy for _, b in runs[t]) < args.reps]
                if not todo:
                    break
                for t in todo:
                    _wait_quiet(args.max_busy, args.quiet_wait)
                    with _Others() as o:
                        got = measure_speed(m, t, ids, args.gen_tokens, 1, n_ctx=n_ctx)
                    runs[t].append((got["decode_tokens_per_s"], o.busy))
            for t in threads:
                quiet = sorted(runs[t], key=lambda r: r[1])[: args.reps]  # the least disturbed
                meas = statistics.median(v for v, _ in quiet)
                busy = max(b for _, b in quiet)
                est = estimate.decode_estimate(facts.config, facts.decode_bytes, with_rates, n_ctx,
                                               kv_type=m.kv_type, n_threads=t,
                                               position=args.prompt_tokens + args.gen_tokens / 2,
                                               rows_per_token=facts.decode_rows)
                bw_only = estimate.decode_estimate(facts.config, facts.decode_bytes, base, n_ctx,
                                                   kv_type=m.kv_type, n_threads=t,
                                                   position=args.prompt_tokens + args.gen_tokens / 2)
                err = (est.tokens_per_s - meas) / meas
                rows.append({"kind": "speed", "model": path.name, "threads": t, "measured": meas,
                             "runs": runs[t], "estimate": est.tokens_per_s, "basis": est.basis,
                             "bound": est.bound, "error": err, "bandwidth_only": bw_only.tokens_per_s,
                             "bandwidth_only_error": (bw_only.tokens_per_s - meas) / meas,
                             "others_busy_max": busy, "load1": os.getloadavg()[0]})
                log(f"{path.name:24s} {t} thread(s): measured {meas:7.1f} tok/s (median of {len(quiet)}), "
                    f"estimate {est.tokens_per_s:7.1f} ({err:+.0%}, {est.bound}); bandwidth only "
                    f"{bw_only.tokens_per_s:7.1f} ({rows[-1]['bandwidth_only_error']:+.0%}); others kept "
                    f"up to {busy:.0%} of the CPUs busy")
    errs = [abs(r["error"]) for r in rows if r["kind"] == "speed"]
    log(f"worst |error| {max(errs):.0%}; goal <= 25%")
    return rows

if __name__ == "__main__":
    sys.exit(main())
