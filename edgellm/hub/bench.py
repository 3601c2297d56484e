# SPDX-License-Identifier: MIT
"""The on-board benchmark behind `edgellm bench`: measured speed and memory beside the estimates.

- ``run_bench(model, board=..., threads=[1, 4])`` prints the board profile, the kernel table,
  threads and build facts to stderr, then measures prefill and decode tokens/s (medians of
  reps) and the peak RSS of a fresh process, beside the profile's estimates, and returns one
  JSON-ready record per thread count (the CLI writes them to stdout as JSON lines).
- ``measure_peak_rss(model, n_ctx)`` runs a fresh Python process that loads the model,
  opens one session and generates, and returns its VmHWM; tests/test_estimate.py and
  bench/estimate_accuracy.py compare it with estimate.memory_bytes.
- ``kernel_rates()`` decodes synthetic wide and narrow models to measure the decode-speed
  constants a board profile records: measured["kernel_gbs.<type>"], ["kernel_row_ns.<type>"]
  and ["token_overhead_us"] (docs/selection.md).

.. versionadded:: 0.1
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .._version import __version__
from ..errors import InvalidArgumentError, NativeError
from . import estimate

# The child of measure_peak_rss: what a user's process does, nothing more. It prints one JSON
# object: VmHWM (peak resident bytes), the positions the session holds, counts and timings.
_RSS_CHILD = r"""
import json, sys
from edgellm.runtime.model import Model
path, n_ctx, n_threads, gen, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
with Model(path, n_threads=n_threads, n_ctx=n_ctx) as m, m.session(n_ctx=n_ctx) as s:
    s.generate(prompt, max_tokens=gen, temperature=0)
    st = s.last_stats
    out = {"positions": s.pos, "prompt_tokens": st.prompt_tokens,
           "generated_tokens": st.generated_tokens, "kv_type": m.kv_type,
           "decode_tokens_per_s": st.decode_tokens_per_s}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
print(json.dumps(out))
"""

DEFAULT_PROMPT = "Once upon a time"


def measure_peak_rss(model: str | os.PathLike[str], n_ctx: int, *, n_threads: int = 1,
                     gen_tokens: int = 256, prompt: str = DEFAULT_PROMPT,
                     timeout: float = 600.0) -> dict[str, Any]:
    """Peak RSS of a fresh process that loads model, opens a session of n_ctx and generates.

    Args:
        model: a GGUF file.
        n_ctx: the session's context length.
        n_threads: the session's threads.
        gen_tokens: tokens to generate (greedy; fewer if the model ends the text).
        prompt: the prompt text.
        timeout: seconds before the child is killed.

    Returns:
        {"VmHWM": bytes, "VmRSS", "RssAnon", "RssFile", "positions": positions the session
        held, "prompt_tokens", "generated_tokens", "kv_type", "decode_tokens_per_s"}.

    Raises:
        NativeError: the child failed (its stderr is in the message).
    """
    if sys.platform != "linux":
        raise InvalidArgumentError("peak RSS is read from /proc/self/status: Linux only")
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(model), str(n_ctx), str(n_threads), str(gen_tokens), prompt],
        capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if r.returncode != 0:
        raise NativeError(f"peak RSS child failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------------------
# Kernel rates: decode of synthetic models of known bytes and rows


def _default_mib() -> int:
    """256 MiB, or a sixteenth of RAM on a small board (a Zero 2 W has 512 MB: 32 MiB)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 128
    return max(16, min(256, total // (16 << 20)))


_QK = 32  # weights per Q8_0 / Q4_0 block
_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}
_GGML = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}
_CAL_VOCAB = 512  # a small SentencePiece vocabulary: the output matrix is a few rows
_WEIGHT_SD = 0.02  # standard deviation of a trained Llama's weights
# Standard deviation of a random quant before scaling: uniform int8 ~74, a nibble - 8 ~4.6.
_QUANT_SD = {"q8_0": 74.0, "q4_0": 4.6}
_CAL_EOS = 2


def _synthetic_gguf(path: Path, weight_type: str, dim: int, n_layers: int) -> estimate.ModelFacts:
    """Write a random-weight llama GGUF of Llama proportions: hidden_dim = 2.75 x dim (a
    multiple of 32), 64-wide heads, 4 query heads per kv head, a 512-token vocabulary, tied
    embeddings; every block random (distinct data, as real weights are). The end-of-sequence
    row of the output is zero, so greedy decoding never stops early. Returns the file's facts."""
    import numpy as np

    from ..formats.gguf import RawTensor, write_gguf

    hidden = dim * 11 // 4 // 32 * 32
    n_heads = max(dim // 64, 1)
    n_kv = max(n_heads // 4, 1)
    rng = np.random.default_rng([dim, n_layers, _GGML[weight_type]])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(_CAL_VOCAB - len(tokens))]
    meta: dict[str, Any] = {
        "general.architecture": "llama", "general.name": f"edgellm bench calibration {dim}x{n_layers}",
        "llama.context_length": 256, "llama.embedding_length": dim, "llama.block_count": n_layers,
        "llama.feed_forward_length": hidden, "llama.attention.head_count": n_heads,
        "llama.attention.head_count_kv": n_kv, "llama.rope.dimension_count": 64,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": _CAL_VOCAB,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.zeros(_CAL_VOCAB, dtype=np.float32),
        "tokenizer.ggml.token_type": np.asarray([2, 3, 3] + [6] * 256 + [1] * (_CAL_VOCAB - 259), dtype=np.int32),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": _CAL_EOS,
    }

    def matrix(rows: int, cols: int) -> Any:
        if weight_type in ("f32", "f16"):
            w = (_WEIGHT_SD * rng.standard_normal((rows, cols), dtype=np.float32)).astype(
                np.float16 if weight_type == "f16" else np.float32)
            return RawTensor(w, (cols, rows))
        bb = _BLOCK_BYTES[weight_type]
        nb = rows * cols // _QK
        raw = np.frombuffer(bytearray(rng.bytes(nb * bb)), dtype=np.uint8).reshape(nb, bb)
        # Weights of a trained model's magnitude (standard deviation ~0.02): a decode step's
        # speed depends on the values (float ops on tiny intermediates run slower), so the
        # calibration must not use toy-sized weights.
        scale = _WEIGHT_SD / _QUANT_SD[weight_type] * rng.uniform(0.75, 1.25, nb)
        raw[:, :2] = scale.astype("<f2").view(np.uint8).reshape(nb, 2)
        return RawTensor(raw.reshape(rows, -1), (cols, rows))

    shapes = {"attn_q": (dim, dim), "attn_k": (n_kv * 64, dim), "attn_v": (n_kv * 64, dim),
              "attn_output": (dim, dim), "ffn_gate": (hidden, dim), "ffn_up": (hidden, dim),
              "ffn_down": (dim, hidden)}
    ones = np.ones(dim, dtype=np.float32)
    embd = matrix(_CAL_VOCAB, dim)
    embd.data[_CAL_EOS] = 0  # zero scales: the end token's logit is 0
    items: list[tuple[str, Any, int]] = [("token_embd.weight", embd, _GGML[weight_type])]
    for i in range(n_layers):
        for name, (rows, cols) in shapes.items():
            items.append((f"blk.{i}.{name}.weight", matrix(rows, cols), _GGML[weight_type]))
        items += [(f"blk.{i}.attn_norm.weight", ones, 0), (f"blk.{i}.ffn_norm.weight", ones, 0)]
    items.append(("output_norm.weight", ones, 0))
    write_gguf(path, meta, items)
    return estimate.model_facts(path)


KERNEL_WIDE_DIM = 2048  # long rows (64 and 176 blocks), a 1B-class model's (TinyLlama's dims)
KERNEL_NARROW_DIM = 512  # short rows (16 and 44 blocks), a 100M-class model's
KERNEL_TINY_DIM = 64  # one tiny layer: what a decode step costs beside its weights


def kernel_rates(types: Sequence[str] = ("q4_0", "q8_0"), *, n_threads: int = 1,
                 mib: int | None = None, tokens: int = 48, reps: int = 5,
                 workdir: str | os.PathLike[str] | None = None) -> dict[str, float]:
    """Decode-speed constants of this machine, as board-profile `measured` keys.

    A decode step is modelled as fixed cost + bytes / rate + rows * row cost: the weights
    stream from DRAM through the matmul kernels, every matrix row adds a cost of its own (its
    reduction and store, and with it the per-layer work of norms, RoPE and attention, which
    grows with the rows), and the Python loop and thread hand-offs cost the same every token.
    Three random-weight models of Llama proportions (FFN 2.75 x dim, 4:1 grouped-query
    attention) are decoded through the real runtime (Session.generate, greedy, n_threads
    threads): a tiny one (dim 64, 1 layer) gives the fixed cost; per weight type, a wide one
    (dim KERNEL_WIDE_DIM) and a narrow one (dim KERNEL_NARROW_DIM), each about `mib` MiB (far
    more than any last-level cache), give the rate and the row cost from their known bytes and
    rows per token. Each timing is the median of reps runs of `tokens` tokens, the models'
    runs interleaved.

    Returns:
        {"kernel_gbs.<type>": GB/s, "kernel_row_ns.<type>": ns per row,
        "token_overhead_us": us}; keys get "@<n>" for n_threads > 1.

    Raises:
        InvalidArgumentError: an unknown type, a bad count, or too small a size.
    """
    import tempfile

    from ..runtime.model import Model

    if n_threads < 1 or tokens < 1 or reps < 1:
        raise InvalidArgumentError("n_threads, tokens and reps must be >= 1")
    size = (mib or _default_mib()) << 20
    suffix = "" if n_threads == 1 else f"@{n_threads}"
    prompt = [1] + [300 + i for i in range(15)]

    def rows_of(f: estimate.ModelFacts) -> int:
        return sum(f.decode_rows.values())

    def per_token(paths: Sequence[Path]) -> list[float]:
        """Median seconds per decoded token of each model, runs interleaved (ABAB...) so a
        passing disturbance hits all of them alike."""
        models = [Model(p, n_threads=n_threads, n_ctx=len(prompt) + tokens) for p in paths]
        try:
            for m in models:  # warm-up: pages in, threads started
                measure_speed(m, n_threads, prompt, 4, 1)
            runs: list[list[float]] = [[] for _ in models]
            for _ in range(reps):
                for m, r in zip(models, runs):
                    got = measure_speed(m, n_threads, prompt, tokens, 1, warmup=False)
                    r.append(float(got["decode_tokens_per_s"]))
            return [1.0 / statistics.median(r) for r in runs]
        finally:
            for m in models:
                m.close()

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        _synthetic_gguf(Path(tmp) / "tiny.gguf", "f32", KERNEL_TINY_DIM, 1)
        (t0,) = per_token([Path(tmp) / "tiny.gguf"])
        out[estimate.MEASURED_OVERHEAD_KEY + suffix] = t0 * 1e6
        for t in types:
            if t not in _GGML:
                raise InvalidArgumentError(f"unknown weight type {t!r}; choose from {sorted(_GGML)}")
            bpp = _BLOCK_BYTES[t] / _QK if t in _BLOCK_BYTES else (2.0 if t == "f16" else 4.0)
            paths, facts = [], []
            for dim in (KERNEL_WIDE_DIM, KERNEL_NARROW_DIM):
                layers = max(1, round(size / ((2.5 + 3 * 2.75) * dim * dim * bpp)))
                paths.append(Path(tmp) / f"{t}-{dim}.gguf")
                facts.append(_synthetic_gguf(paths[-1], t, dim, layers))
            (bw_, rw), (bn, rn) = ((f.decode_weight_bytes, rows_of(f)) for f in facts)
            for _attempt in range(3):
                tw, tn = (x - t0 for x in per_token(paths))
                # Solve t = b / rate + r * row for (1 / rate, row). A disturbed run can give a
                # row cost below 0 or one that leaves the wide model's bytes no time: measure
                # again, and after three tries charge everything to the bytes (row cost 0).
                row = (tn * bw_ - tw * bn) / (rn * bw_ - rw * bn)
                if row >= 0 and tw - rw * row >= 0.5 * tw:
                    break
            else:
                row = 0.0
            inv_rate = (tw - rw * row) / bw_
            for p_ in paths:
                p_.unlink()
            out[f"{estimate.MEASURED_KERNEL_PREFIX}{t}{suffix}"] = 1.0 / inv_rate / 1e9
            out[f"{estimate.MEASURED_ROW_PREFIX}{t}{suffix}"] = row * 1e9
    return out


def fmt_kernel_rates(rates: Mapping[str, float]) -> str:
    """kernel_rates() output as one line: "q4_0 20.1 GB/s + 12 ns/row, q4_0@2 ..."."""
    parts = [f"fixed {v:.0f} us/token" + k[len(estimate.MEASURED_OVERHEAD_KEY):]
             for k, v in rates.items() if k.startswith(estimate.MEASURED_OVERHEAD_KEY)]
    for k, g in rates.items():
        if k.startswith(estimate.MEASURED_KERNEL_PREFIX):
            name = k[len(estimate.MEASURED_KERNEL_PREFIX):]
            row = rates.get(estimate.MEASURED_ROW_PREFIX + name)
            parts.append(f"{name} {g:.1f} GB/s" + (f" + {row:.0f} ns/row" if row is not None else ""))
    return ", ".join(parts) + "  (type@threads)"


def run_context() -> dict[str, Any]:
    """Where a number comes from: git commit (or package version), ISA, compiler, CPU."""
    from .. import _native

    info = _native.build_info()
    ctx: dict[str, Any] = {
        "edgellm": __version__,
        "git": _git_commit(),
        "isa": info.get("active"),
        "isa_built": info.get("built_with"),
        "cpu_features": info.get("cpu_features"),
        "compiler": info.get("compiler"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    return ctx


def _git_commit() -> str | None:
    """HEAD of the checkout edgellm runs from (with "-dirty"), or None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# The bench


def _prompt_ids(vocab_size: int, n: int, bos: int | None) -> list[int]:
    """A fixed prompt: BOS (when the model has one), then ordinary ids spread over the vocab."""
    ids = [] if bos is None else [bos]
    span = max(vocab_size - 3, 1)
    while len(ids) < n:
        ids.append(3 + (len(ids) * 7919) % span)  # skip the usual <unk> <s> </s>
    return ids


def measure_speed(model: Any, n_threads: int, prompt: Sequence[int], gen_tokens: int, reps: int,
                  *, n_ctx: int | None = None, warmup: bool = True) -> dict[str, Any]:
    """Prefill and decode tokens/s of an open Model: reps greedy generations in fresh sessions.

    Each repetition opens a session, prefills `prompt` (one batched eval) and generates up to
    gen_tokens greedy tokens through Session.generate, the path users take (sampling,
    detokenising and the cffi call each step count). A warm-up run comes first (it pages the
    weights in and starts the threads) and is dropped, unless warmup is false.

    Returns:
        {"prefill_tokens_per_s", "decode_tokens_per_s": medians; "prefill_all", "decode_all",
        "generated_tokens": per repetition}.
    """
    ctx = n_ctx or len(prompt) + gen_tokens
    prefill: list[float] = []
    decode: list[float] = []
    generated: list[int] = []
    skip = 1 if warmup else 0
    for _ in range(reps + skip):
        with model.session(n_ctx=ctx, n_threads=n_threads) as s:
            s.generate(list(prompt), max_tokens=gen_tokens, temperature=0)
            st = s.last_stats
        prefill.append(st.prompt_tokens / st.prefill_s if st.prefill_s > 0 else 0.0)
        decode.append(st.decode_tokens_per_s)
        generated.append(st.generated_tokens)
    prefill, decode, generated = prefill[skip:], decode[skip:], generated[skip:]
    return {"prefill_tokens_per_s": statistics.median(prefill),
            "decode_tokens_per_s": statistics.median(decode),
            "prefill_all": prefill, "decode_all": decode, "generated_tokens": generated}


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def run_bench(model: str | os.PathLike[str], *, board: Any = None, threads: Sequence[int] = (),
              prompt_tokens: int = 128, gen_tokens: int = 128, reps: int = 3,
              n_ctx: int | None = None, kernels: bool = False, log: IO[str] | None = None) -> list[dict[str, Any]]:
    """Benchmark a model on this machine beside a board profile's estimates.

    Args:
        model: a GGUF file.
        board: a board profile (edgellm.boards.BoardProfile) for the estimates, or None.
        threads: thread counts to run (default: 1 and all available CPUs).
        prompt_tokens: prompt length of the prefill measurement.
        gen_tokens: greedy tokens of the decode measurement.
        reps: repetitions per thread count; medians are reported.
        n_ctx: session context (default prompt_tokens + gen_tokens, at least 64).
        kernels: also measure kernel_rates() (adds seconds; gives measured["kernel_gbs.*"]).
        log: where the human report goes (default stderr).

    Returns:
        One record per thread count: run context, board, model sha256, measured prefill and
        decode tokens/s (median and every rep), peak RSS, and the estimates.

    Raises:
        InvalidArgumentError: bad counts.
    """
    from .. import _native
    from ..runtime.model import Model, default_threads

    out = log if log is not None else sys.stderr
    path = Path(model)
    if prompt_tokens < 1 or gen_tokens < 1 or reps < 1:
        raise InvalidArgumentError("prompt_tokens, gen_tokens and reps must be >= 1")
    thread_list = list(threads) or sorted({1, default_threads()})
    if any(t < 1 for t in thread_list):
        raise InvalidArgumentError(f"thread counts must be >= 1, got {thread_list}")
    ctx_len = n_ctx or max(prompt_tokens + gen_tokens, 64)
    if ctx_len < prompt_tokens + gen_tokens:
        raise InvalidArgumentError(f"n_ctx {ctx_len} < prompt_tokens + gen_tokens = {prompt_tokens + gen_tokens}")
    facts = estimate.model_facts(path, sha256=_sha256(path))
    if ctx_len > facts.config.seq_len:
        raise InvalidArgumentError(
            f"prompt_tokens + gen_tokens = {ctx_len} exceeds the model's seq_len {facts.config.seq_len}")
    context = run_context()
    info = _native.build_info()

    # Everything that qualifies the numbers comes first (STYLE.md section 9).
    print("edgellm bench", file=out)
    if board is not None:
        print(f"  board:         {board.name} ({getattr(board, 'soc', '')}, {getattr(board, 'cpu', '')}, "
              f"{board.cores} cores, {getattr(board, 'ram_mb', '?')} MB RAM, "
              f"{getattr(board, 'mem_bandwidth_gbs', 0):.1f} GB/s x {getattr(board, 'sustained_factor', 1):.2f} "
              "sustained)", file=out)
        print(f"  board ISA:     {' '.join(getattr(board, 'isa_features', ())) or '-'}", file=out)
    else:
        print("  board:         none given (no estimates; --board NAME adds them)", file=out)
    print(f"  build:         edgellm {__version__}, git {context['git'] or '-'}, {info.get('compiler')}", file=out)
    print(f"  kernels:       built {', '.join(info['built_with'])}; CPU runs {', '.join(info['has'])}; "
          f"active table: {info['active']}", file=out)
    print(f"  CPU features:  {' '.join(info['cpu_features']) or '-'}", file=out)
    print(f"  threads:       {', '.join(map(str, thread_list))}", file=out)
    cfg = facts.config
    print(f"  model:         {path.name}  sha256 {facts.sha256[:16] if facts.sha256 else '-'}...  "
          f"dim {cfg.dim} x {cfg.n_layers} layers, vocab {cfg.vocab_size}, "
          f"{_fmt_bytes(facts.weights_bytes)} of tensors", file=out)
    print(f"  workload:      prompt {prompt_tokens} tokens, generate {gen_tokens}, n_ctx {ctx_len}, "
          f"{reps} reps, load {os.getloadavg()[0]:.2f}", file=out)

    rates: dict[str, float] = {}  # measured-table keys -> GB/s and ns per row
    if kernels:
        # The model's weight types (not its f32 norms, a few KB).
        total = facts.decode_weight_bytes
        types = sorted(t for t, n in facts.decode_bytes.items() if t in _GGML and n > 0.05 * total)
        for t in sorted({1, *thread_list}):
            rates.update(kernel_rates(types, n_threads=t))
        print("  constants:     " + fmt_kernel_rates(rates), file=out)

    records: list[dict[str, Any]] = []
    with Model(path, n_ctx=ctx_len) as m:
        ids = _prompt_ids(cfg.vocab_size, prompt_tokens, m.tokenizer.bos_id if m.tokenizer.add_bos else None)
        kv_type = m.kv_type
        for t in thread_list:
            sp_run = measure_speed(m, t, ids, gen_tokens, reps, n_ctx=ctx_len)
            prefill, decode, generated = sp_run["prefill_all"], sp_run["decode_all"], sp_run["generated_tokens"]
            rss = measure_peak_rss(path, ctx_len, n_threads=t, gen_tokens=gen_tokens,
                                   prompt=DEFAULT_PROMPT)
            rec: dict[str, Any] = {
                "kind": "bench", **context, "board": board.name if board is not None else None,
                "model": path.name, "model_sha256": facts.sha256, "threads": t,
                "n_ctx": ctx_len, "kv_type": kv_type, "prompt_tokens": prompt_tokens,
                "gen_tokens": gen_tokens, "reps": reps, "load": [round(x, 2) for x in os.getloadavg()],
                "prefill_tokens_per_s": statistics.median(prefill),
                "decode_tokens_per_s": statistics.median(decode),
                "prefill_all": prefill, "decode_all": decode, "generated_tokens": generated,
                "peak_rss_bytes": rss["VmHWM"], "rss_positions": rss["positions"],
            }
            if rates:
                rec["kernel_gbs"] = rates
            if board is not None:
                mem = estimate.memory_bytes(cfg, facts.weights_bytes, ctx_len, kv_type, n_threads=t,
                                            n_tokens=rss["positions"])
                prof = _with_measured(board, rates) if rates else board
                sp = estimate.decode_estimate(cfg, facts.decode_bytes, prof, ctx_len, kv_type=kv_type,
                                              n_threads=t, position=prompt_tokens + gen_tokens / 2,
                                              rows_per_token=facts.decode_rows)
                rec["estimate"] = {"memory": mem.as_dict(), "decode_tokens_per_s": sp.tokens_per_s,
                                   "decode_basis": sp.basis, "decode_bound": sp.bound}
                rec["decode_ratio"] = rec["decode_tokens_per_s"] / sp.tokens_per_s
                rec["measured_key"] = estimate.MEASURED_DECODE_PREFIX + (facts.sha256 or "")
            records.append(rec)
            line = (f"threads {t}: prefill {rec['prefill_tokens_per_s']:.1f} tok/s, "
                    f"decode {rec['decode_tokens_per_s']:.1f} tok/s, peak RSS {_fmt_bytes(rss['VmHWM'])}")
            if "estimate" in rec:
                e = rec["estimate"]
                line += (f"  | estimate: decode {e['decode_tokens_per_s']:.1f} tok/s ({e['decode_basis']}, "
                         f"{e['decode_bound']} bound), memory {_fmt_bytes(e['memory']['total'])}")
            print(line, file=out)
    if board is not None and records:
        best = max(records, key=lambda r: r["threads"])
        print(f"to record in boards/{board.name}.toml [measured]:", file=out)
        print(f'  "{best["measured_key"]}" = {best["decode_tokens_per_s"]:.2f}', file=out)
        for k, v in rates.items():
            print(f'  "{k}" = {v:.2f}', file=out)
    return records


def _with_measured(board: Any, extra: Mapping[str, float]) -> Any:
    """A copy of a frozen board profile with more measured values."""
    import dataclasses

    return dataclasses.replace(board, measured={**dict(board.measured or {}), **extra})
