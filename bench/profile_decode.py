# SPDX-License-Identifier: MIT
"""Where a token's time goes in edgellm: each matmul of the model, replayed single-threaded.

For one GGUF file it replays the weight matmuls of one forward step (every layer's
q, k, v, o, gate, up, down and the output matrix, in model order, on the file's own mapped
weights, so they stream from DRAM as in decode) through edgellm_matmul_q8, per ISA, for
n_tok = 1 (decode) and 64 (one prefill chunk). It prints per-kind time per token, GB/s of
weights and GOP/s, and compares the matmul total with a full session step (eval of one
token, and of a 64-token chunk) at 1 and 2 threads: the rest is attention, norms, RoPE,
activation quantisation, thread sync and the Python call. "hot" repeats layer 0's matrix
for every layer, so weights come from cache: hot ~ cold means the kernel is compute-bound.

Usage: python bench/profile_decode.py [--model smollm-135m] [--type q4_0] [--isas avx2,avx512]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output")
GGML_TYPE = {"q8_0": 8, "q4_0": 2}


def weights(path: Path, n_layers: int) -> list[tuple[str, np.ndarray, int, int, int]]:
    """(kind, data [rows, row_bytes] uint8 view of the mapping, type, rows, cols), model order."""
    import gguf

    r = gguf.GGUFReader(path)
    t = {x.name: x for x in r.tensors}
    out = []
    for i in range(n_layers):
        for k in KINDS[:-1]:
            x = t[f"blk.{i}.{k}.weight"]
            out.append((k, x.data, int(x.tensor_type), int(x.shape[1]), int(x.shape[0])))
    x = t.get("output.weight") or t["token_embd.weight"]
    out.append(("output", x.data, int(x.tensor_type), int(x.shape[1]), int(x.shape[0])))
    return out


def replay(
    ws: list[tuple[str, np.ndarray, int, int, int]],
    isa: int,
    n_tok: int,
    reps: int,
    hot: bool = False,
) -> dict[str, float]:
    """Median seconds per kind (summed over layers) of one step over n_tok tokens.

    hot: every layer's call uses layer 0's matrix instead, so weights that fit in L2/L3 come
    from cache: the kernel's compute speed, without DRAM.
    """
    if hot:
        first: dict[str, tuple[str, np.ndarray, int, int, int]] = {}
        for w in ws:
            first.setdefault(w[0], w)
        ws = [first[w[0]] for w in ws]
    from edgellm._native import ffi, lib

    rng = np.random.default_rng(0)
    max_cols = max(w[4] for w in ws)
    max_rows = max(w[3] for w in ws)
    xq = {}
    for cols in {w[4] for w in ws}:
        x = rng.standard_normal((n_tok, cols)).astype(np.float32)
        q = np.empty(n_tok * cols // 32 * 34, dtype=np.uint8)
        for t in range(n_tok):
            lib.edgellm_quantize(
                8, ffi.from_buffer("float[]", x[t]), ffi.from_buffer(q[t * cols // 32 * 34 :]), cols
            )
        xq[cols] = ffi.from_buffer(q)
    y = np.empty(n_tok * max_rows, dtype=np.float32)
    y_c = ffi.from_buffer("float[]", y, require_writable=True)
    ptrs = [(k, ffi.from_buffer(d), ty, rows, cols) for k, d, ty, rows, cols in ws]
    del max_cols
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(reps + 1):  # the first pass pages the weights in
        acc: dict[str, float] = defaultdict(float)
        for k, p, ty, rows, cols in ptrs:
            t0 = time.perf_counter()
            rc = lib.edgellm_matmul_q8(isa, ty, p, rows, cols, xq[cols], n_tok, y_c)
            acc[k] += time.perf_counter() - t0
            if rc:
                raise RuntimeError(f"edgellm_matmul_q8 status {rc}")
        for k, v in acc.items():
            samples[k].append(v)
    return {k: common.median(v[1:]) for k, v in samples.items()}


def session_step(path: Path, threads: int, n_tok: int, reps: int) -> float:
    """Median seconds of one edgellm_session_eval of n_tok tokens after a 128-token prompt."""
    from edgellm._native import ffi, lib
    from edgellm.runtime.model import Model

    m = Model(path, n_threads=threads, n_ctx=512)
    s = m.session()
    rng = np.random.default_rng(1)
    prompt = [1] + [int(v) for v in rng.integers(259, m.config.vocab_size, 127)]
    toks = np.asarray(rng.integers(259, m.config.vocab_size, n_tok), dtype=np.int32)
    logits = np.empty(m.config.vocab_size, dtype=np.float32)
    lc = ffi.from_buffer("float[]", logits, require_writable=True)
    tc = ffi.from_buffer("int32_t[]", toks)
    s.eval(prompt)
    ts = []
    for _ in range(reps + 1):
        h = s._handle()
        t0 = time.perf_counter()
        rc = lib.edgellm_session_eval(h, tc, n_tok, lib.EDGELLM_LOGITS_LAST, lc)
        ts.append(time.perf_counter() - t0)
        lib.edgellm_session_truncate(h, len(prompt))
        if rc:
            raise RuntimeError(f"edgellm_session_eval status {rc}")
    s.close()
    m.close()
    return common.median(ts[1:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm-135m", choices=list(common.MODELS))
    ap.add_argument("--type", default="q4_0", choices=list(common.TYPES))
    ap.add_argument("--isas", default="", help="comma-separated (default: every supported one)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", default="1,64", help="n_tok values to replay")
    args = ap.parse_args(argv)
    from edgellm import _native
    from edgellm._native import lib

    path = common.model_path(args.model, args.type)
    spec = common.MODELS[args.model]
    ws = weights(path, spec["n_layers"])
    names = _native.isa_names()
    bi = _native.build_info()
    isas = (
        [i for i in args.isas.split(",") if i]
        or [n for n in bi["has"] if n != "generic"]
        or ["generic"]
    )
    bw1 = common.read_bandwidth(1)["best_bytes_per_s"]
    ctx = common.context()
    out = common.JsonLines("profile")
    common.log(
        f"{args.model} {args.type}: {ctx['git']}, {ctx['machine']['cpu']}, active ISA "
        f"{bi['active']}, load {common.load_avg()}; 1-thread read bandwidth "
        f"{bw1 / 1e9:.1f} GB/s"
    )
    bytes_kind: dict[str, int] = defaultdict(int)
    ops_kind: dict[str, int] = defaultdict(int)
    for k, d, _, rows, cols in ws:
        bytes_kind[k] += d.nbytes
        ops_kind[k] += 2 * rows * cols
    for n_tok in [int(t) for t in args.tokens.split(",")]:
        step = {t: session_step(path, t, n_tok, args.reps) for t in (1, 2)}
        for isa in isas:
            res = replay(ws, names.index(isa), n_tok, args.reps)
            hot = replay(ws, names.index(isa), n_tok, args.reps, hot=True)
            total = sum(res.values())
            common.log(
                f"\nn_tok={n_tok} isa={isa}: matmuls {total * 1e3:.2f} ms per step "
                f"(hot: {sum(hot.values()) * 1e3:.2f}) "
                f"(1 thread); session step {step[1] * 1e3:.2f} ms at 1 thread, "
                f"{step[2] * 1e3:.2f} ms at 2 threads -> matmuls are "
                f"{100 * total / step[1]:.0f}% of the 1-thread step"
                + (" (active ISA)" if isa == bi["active"] else "")
            )
            common.log(
                f"  {'kind':12s} {'ms/step':>8s} {'share':>6s} {'GB/s':>6s} "
                f"{'GOP/s':>7s} {'of bw':>6s} {'hot ms':>8s} {'hot GB/s':>9s}"
            )
            for k in KINDS:
                if k not in res:
                    continue
                gbs = bytes_kind[k] / res[k] / 1e9
                gops = ops_kind[k] * n_tok / res[k] / 1e9
                common.log(
                    f"  {k:12s} {res[k] * 1e3:8.3f} {100 * res[k] / total:5.1f}% "
                    f"{gbs:6.1f} {gops:7.1f} {100 * gbs * 1e9 / bw1:5.0f}% "
                    f"{hot[k] * 1e3:8.3f} {bytes_kind[k] / hot[k] / 1e9:9.1f}"
                )
                out.write(
                    {
                        **ctx,
                        "kind": "profile_matmul",
                        "model": args.model,
                        "type": args.type.upper(),
                        "isa_replayed": isa,
                        "n_tok": n_tok,
                        "matrix": k,
                        "s_per_step": res[k],
                        "bytes": bytes_kind[k],
                        "ops_per_token": ops_kind[k],
                        "gb_per_s": gbs,
                        "gop_per_s": gops,
                        "hot_s_per_step": hot[k],
                        "load": common.load_avg(),
                    }
                )
            row: dict[str, Any] = {
                **ctx,
                "kind": "profile_step",
                "model": args.model,
                "type": args.type.upper(),
                "isa_replayed": isa,
                "n_tok": n_tok,
                "matmul_s": total,
                "session_step_s_1t": step[1],
                "session_step_s_2t": step[2],
                "bandwidth_1t": bw1,
                "load": common.load_avg(),
            }
            out.write(row)
    common.log(f"\nJSON lines: {out.path}")
    del lib
    return 0


if __name__ == "__main__":
    sys.exit(main())
