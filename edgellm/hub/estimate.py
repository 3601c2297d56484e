# SPDX-License-Identifier: MIT
"""Memory and decode-speed estimates of a model on a board, from its config and file facts alone.

Nothing here loads a model or needs the compiled core: the hub sizes every build for every
board from a GGUF header (or a bundle manifest) and a board profile.

- ``facts = model_facts(path)`` reads a GGUF header: config, tensor bytes, bytes a decode
  step reads per weight type, sha256. ``facts_from_bundle(b)`` does the same for a bundle.
- ``memory_bytes(facts.config, facts.weights_bytes, n_ctx, kv_type)`` -> MemoryEstimate:
  weights + KV cache + the C core's scratch + the Python runtime, in bytes.
- ``decode_estimate(facts.config, facts.decode_bytes, board, n_ctx)`` -> SpeedEstimate
  (``decode_tokens_per_s`` returns its tokens/s): a roofline over the board's sustained
  memory bandwidth and its measured per-core kernel rates, or the board's measured speed of
  that very file.

docs/selection.md gives the formulas, where every constant comes from, and how close the
estimates come to measurements.

.. versionadded:: 0.1
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import InvalidArgumentError

# --------------------------------------------------------------------------------------
# Constants of the C core (csrc/core/session.c), mirrored; tests/test_estimate.py checks the
# scratch formula against what edgellm_session_new allocates.

EL_CHUNK = 64  # tokens per prefill pass: the scratch holds this many rows
EL_ALIGN = 64  # every scratch buffer starts on a cache line (rounded up to 64 bytes)
EL_KV_PAD = 32  # attention score rows are n_ctx rounded up to a multiple of 32
EL_ATT_MAX_SPLIT = 16  # position chunks per head a decode step may merge
QK = 32  # weights per Q8_0 block
Q8_0_BLOCK_BYTES = 34  # f16 scale + 32 int8
KV_ELEM_BYTES = {"f32": 4, "f16": 2}
PAGE_SIZE = 4096  # the KV cache is committed page by page (calloc'd, mmap-backed)

# --------------------------------------------------------------------------------------
# The Python runtime: measured on x86-64 Debian 12, CPython 3.11.7, numpy 2, cffi 1.17, by
# `python bench/estimate_accuracy.py --overhead`: the peak RSS (VmHWM, median of 3) of fresh
# processes that import edgellm, load a 1-layer, dim-64 model with a SentencePiece or a
# byte-level BPE vocabulary of 512 to 65536 tokens and generate 256 tokens, minus the model's
# weights, KV cache and scratch (below), fitted by least squares over (1, vocab_size, merges):
# 38.33 MB + 317.3 B/token + 80.9 B/merge, worst residual 1.2 MB (a second run: 38.27 MB,
# 317.1, 84.1). They serve every board: interpreter, numpy, cffi and the compiled core are
# code pages and heap of similar size on aarch64.
RUNTIME_BASE_BYTES = 38_300_000
"""Interpreter + numpy + cffi + edgellm (code pages touched and heap) with an empty vocabulary."""
TOKENIZER_BYTES_PER_TOKEN = 317
"""Per vocabulary entry: the GGUF token strings as Python objects, the tokenizer's tables,
the header pages they were read from and the session's logits vector (4 bytes)."""
TOKENIZER_BYTES_PER_MERGE = 81
"""Per BPE merge rule (byte-level "gpt2" tokenizers): the merge strings and the rank table."""

# A decode step's fixed cost beside the weight and KV reads, for boards that measured none
# (measured["token_overhead_us"]): the Python generate loop (sample, detokenise, one cffi
# call) and the C core's norms, RoPE, attention and thread hand-offs of a small model.
# Measured as the 1-thread decode time of stories260K (5 layers, 0.35 MB of weights, of which
# reading takes ~15 us) on the x86-64 development host: 105-111 us per token.
TOKEN_OVERHEAD_S = 100e-6

# Keys of a board profile's `measured` table that the speed estimate reads.
MEASURED_DECODE_PREFIX = "decode_tok_s."
"""+ the GGUF file's sha256: decode tokens/s of that exact file on this board (edgellm bench)."""
MEASURED_KERNEL_PREFIX = "kernel_gbs."
"""+ a weight type (q4_0, q8_0, f16, f32): GB/s at which one thread's decode streams weights
of that type through the matmul kernels; + "@<n>": with n threads (edgellm bench --kernels
measures both, hub.bench.kernel_rates). What the kernels can consume, beside what DRAM can
deliver."""
MEASURED_ROW_PREFIX = "kernel_row_ns."
"""+ a weight type (and "@<n>"): nanoseconds each matrix row adds to a decode matmul beside
its bytes (its reduction and store), which slows models with short rows (edgellm bench
--kernels measures it with kernel_gbs)."""
MEASURED_RATIO_KEY = "decode_ratio"
"""measured / estimated decode speed, the median over files benched on this board; scales the
estimate of files that have no measured speed."""
MEASURED_OVERHEAD_KEY = "token_overhead_us"
"""A decode step's fixed cost on this board, in microseconds ("@<n>": with n threads)."""

# Nominal bytes per weight of each type (Q8_0: 34-byte blocks of 32, Q4_0: 18-byte blocks).
_BYTES_PER_PARAM = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

# Quality order of the quant recipes (hub/quantize.py names), best first.
RECIPE_RANK = ("f32", "f16", "q8_0", "q4_0_mixed", "q4_0")


# --------------------------------------------------------------------------------------
# Model facts


class BoardLike(Protocol):
    """What the estimates read of a board profile (edgellm.boards.BoardProfile)."""

    @property
    def name(self) -> str: ...

    @property
    def cores(self) -> int: ...

    @property
    def sustained_bandwidth_bytes_per_s(self) -> float: ...

    @property
    def measured(self) -> Mapping[str, float]: ...


@dataclass(frozen=True)
class Dims:
    """The dimensions an estimate needs (the shared dimension vocabulary of STYLE.md)."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    seq_len: int
    rope_dim: int = 0  # 0: head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def of(cls, config: Any) -> Dims:
        """The dimensions of a ModelConfig, a bundle's ModelSummary, a Dims or a mapping.

        Raises:
            InvalidArgumentError: a dimension is missing, not an integer, or < 1, or the heads
                do not divide evenly.
        """
        if isinstance(config, Dims):
            return config

        def get(key: str, default: int | None = None) -> int:
            v = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
            if v is None:
                raise InvalidArgumentError(f"model config has no {key!r}")
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidArgumentError(f"model config {key!r} must be a positive integer, got {v!r}")
            return v

        d = cls(**{f.name: get(f.name, 0 if f.name == "rope_dim" else None)
                   for f in dataclasses.fields(cls)})
        if min(d.dim, d.hidden_dim, d.n_layers, d.n_heads, d.n_kv_heads, d.head_dim,
               d.vocab_size, d.seq_len) < 1:
            raise InvalidArgumentError(f"model config dimensions must be >= 1: {d}")
        if d.n_heads % d.n_kv_heads:
            raise InvalidArgumentError(f"n_heads {d.n_heads} is not a multiple of n_kv_heads {d.n_kv_heads}")
        return d


@dataclass(frozen=True)
class ModelFacts:
    """What the estimates need to know of one model file, without loading it.

    decode_bytes maps a weight type name ("q4_0", "q8_0", "f16", "f32") to the bytes of that
    type one decode step reads: every tensor except token_embd, of which one row is read
    (with tied embeddings token_embd is also the output matrix and is read in full).
    decode_rows maps a weight type to the matrix rows (output values) a decode step computes
    from weights of that type.
    """

    config: Dims
    weights_bytes: int  # every tensor's bytes (the GGUF data section without padding)
    decode_bytes: Mapping[str, int]
    sha256: str | None = None
    n_merges: int = 0  # BPE merges of the tokenizer (0 for SentencePiece, or unknown)
    decode_rows: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode step reads."""
        return sum(self.decode_bytes.values())


def model_facts(path: str | os.PathLike[str], sha256: str | None = None) -> ModelFacts:
    """The facts of a GGUF file, from its header (the tensors are not read).

    Args:
        path: the GGUF file.
        sha256: its hex sha256 when known (a bundle manifest records it); None leaves it
            unset (hashing a large file takes seconds).

    Raises:
        ModelFormatError: the file is malformed.
        UnsupportedError: an architecture edgellm does not run.
    """
    from ..formats.gguf import read_gguf
    from ..runtime.config import ModelConfig

    with read_gguf(path) as gf:
        embd = gf.tensors.get("token_embd.weight")
        cfg = ModelConfig.from_metadata(
            gf.metadata, vocab_from_tensor=embd.shape[1] if embd is not None and len(embd.shape) > 1 else None)
        tied = "output.weight" not in gf.tensors
        merges = gf.metadata.get("tokenizer.ggml.merges")
        n_merges = len(merges) if isinstance(merges, (list, tuple)) else 0
        per_type: dict[str, int] = {}
        per_rows: dict[str, int] = {}
        total = 0
        for name, info in gf.tensors.items():
            total += info.nbytes
            t = info.type_name.lower()
            n = info.nbytes
            rows = info.n_elements // info.shape[0]  # GGUF shape[0] is the row length
            if name == "token_embd.weight":
                n = info.nbytes // rows + (info.nbytes if tied else 0)  # a lookup: one row
                rows = rows if tied else 0
            if len(info.shape) < 2:
                rows = 0  # norms and biases: element-wise, no matmul rows
            per_type[t] = per_type.get(t, 0) + n
            if rows:
                per_rows[t] = per_rows.get(t, 0) + rows
    dims = Dims(cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                cfg.vocab_size, cfg.seq_len, cfg.rope_dim)
    return ModelFacts(dims, total, per_type, sha256, n_merges, per_rows)


def n_params(config: Any, tied: bool) -> int:
    """Parameters of a Llama model of this config (norms included, no biases)."""
    d = Dims.of(config)
    layer = 2 * d.dim * d.q_dim + 2 * d.dim * d.kv_dim + 3 * d.dim * d.hidden_dim + 2 * d.dim
    return d.n_layers * layer + d.dim + d.vocab_size * d.dim * (1 if tied else 2)


def facts_from_bundle(bundle: Any) -> ModelFacts:
    """The facts of a bundle: from its model.gguf header when the file is there, else from
    the manifest (config, parameter count, weights_bytes and recipe).

    Without the file, tied embeddings are told by the parameter count, and the recipe says
    which matrices are at which type (hub/quantize.py: q4_0_mixed keeps the embedding and
    output at Q8_0); the bytes per type are then split in proportion to parameters.
    """
    sha = None
    for f in getattr(bundle, "files", ()):
        if f.name == "model.gguf":
            sha = f.sha256
    path = bundle.folder / "model.gguf"
    if path.is_file():
        return dataclasses.replace(model_facts(path), sha256=sha)
    d = Dims.of(bundle.config)
    total = int(bundle.weights_bytes)
    n = int(bundle.config.n_params)
    tied = abs(n - n_params(d, True)) < abs(n - n_params(d, False))
    embd = d.vocab_size * d.dim
    body = n - embd * (1 if tied else 2)
    recipe = str(bundle.recipe)
    body_type = recipe if recipe in _BYTES_PER_PARAM else "q4_0"
    embd_type = "q8_0" if recipe == "q4_0_mixed" else body_type
    # Scale the nominal bytes per parameter to the manifest's total (rows left at F16 etc.).
    nominal = embd * (1 if tied else 2) * _BYTES_PER_PARAM[embd_type] + body * _BYTES_PER_PARAM[body_type]
    k = total / nominal if nominal > 0 else 1.0
    # Tied: the embedding read in full as the output matrix, plus one row; untied: the
    # output matrix plus one embedding row. The same count either way.
    read = {body_type: int(body * _BYTES_PER_PARAM[body_type] * k)}
    read[embd_type] = read.get(embd_type, 0) + int((embd + d.dim) * _BYTES_PER_PARAM[embd_type] * k)
    rows = {body_type: d.n_layers * layer_rows(d)}
    rows[embd_type] = rows.get(embd_type, 0) + d.vocab_size
    return ModelFacts(d, total, read, sha, 0, rows)


def layer_rows(config: Any) -> int:
    """Matrix rows one layer computes per token: q, k, v, output, gate, up, down."""
    d = Dims.of(config)
    return d.q_dim + 2 * d.kv_dim + d.dim + 2 * d.hidden_dim + d.dim


# --------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Resident bytes of a model running one session.

    weights: the GGUF tensors, mapped; a forward touches every page, so all count.
    kv_cache: the session's K and V (committed page by page as positions fill).
    scratch: the C core's session buffers (activations, RoPE tables, attention scores).
    runtime_overhead: the Python process (interpreter, numpy, cffi, edgellm, tokenizer).
    """

    weights: int
    kv_cache: int
    scratch: int
    runtime_overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.scratch + self.runtime_overhead

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


def _check_ctx(d: Dims, n_ctx: int, kv_type: str) -> None:
    if kv_type not in KV_ELEM_BYTES:
        raise InvalidArgumentError(f"kv_type must be one of {sorted(KV_ELEM_BYTES)}, got {kv_type!r}")
    if not 1 <= n_ctx <= d.seq_len:
        raise InvalidArgumentError(f"n_ctx {n_ctx} is outside [1, seq_len = {d.seq_len}]")


def kv_cache_bytes(config: Any, n_ctx: int, kv_type: str) -> int:
    """Bytes of a session's KV cache, as edgellm_kv_cache_bytes sizes it:
    2 * n_layers * n_ctx * kv_dim * element size."""
    d = Dims.of(config)
    _check_ctx(d, n_ctx, kv_type)
    return 2 * d.n_layers * n_ctx * d.kv_dim * KV_ELEM_BYTES[kv_type]


def kv_resident_bytes(config: Any, n_ctx: int, kv_type: str, n_tokens: int,
                      page_size: int = PAGE_SIZE) -> int:
    """Bytes of the KV cache committed once n_tokens positions were written.

    The C core callocs the cache (fresh zero pages, committed on first write). Per layer and
    kv head, K is (n_ctx, head_dim): position p writes one row, so K fills front to back; V is
    stored transposed, (head_dim, n_ctx): each position writes one element of every row, so a
    row shorter than a page commits its page at the first position. This counts the pages
    those writes touch (the allocation starts 16 bytes into a page, glibc's mmap chunk header).
    """
    d = Dims.of(config)
    _check_ctx(d, n_ctx, kv_type)
    if not 0 <= n_tokens <= n_ctx:
        raise InvalidArgumentError(f"n_tokens {n_tokens} is outside [0, n_ctx = {n_ctx}]")
    if n_tokens == 0:
        return 0
    elt = KV_ELEM_BYTES[kv_type]
    block = n_ctx * d.head_dim * elt  # one (layer, K|V, kv head) block
    # Written byte ranges [start, end), in order: K block prefix, V row prefixes.
    starts: list[int] = []
    lens: list[int] = []
    base = 16
    for _ in range(d.n_layers):
        for _h in range(d.n_kv_heads):  # K of every head, then V of every head
            starts.append(base)
            lens.append(n_tokens * d.head_dim * elt)
            base += block
        for _h in range(d.n_kv_heads):
            for r in range(d.head_dim):
                starts.append(base + r * n_ctx * elt)
                lens.append(n_tokens * elt)
            base += block
    pages = 0
    last = -1  # the last page counted
    for s, n in zip(starts, lens):
        first, end = s // page_size, (s + n - 1) // page_size
        if first <= last:
            first = last + 1
        if end >= first:
            pages += end - first + 1
            last = end
    return pages * page_size


def scratch_bytes(config: Any, n_ctx: int, n_threads: int) -> int:
    """Bytes of the C core's session scratch (el_layout in csrc/core/session.c)."""
    d = Dims.of(config)
    if n_ctx < 1 or n_threads < 1:
        raise InvalidArgumentError(f"n_ctx ({n_ctx}) and n_threads ({n_threads}) must be >= 1")

    def carve(n: int) -> int:  # el_carve: rounded up to a cache line
        return -(-n // EL_ALIGN) * EL_ALIGN

    f = 4  # float
    ch = min(n_ctx, EL_CHUNK)
    half = (d.rope_dim or d.head_dim) // 2
    max_cols = max(d.dim, d.hidden_dim, d.q_dim)
    q8_row = -(-max_cols // QK) * Q8_0_BLOCK_BYTES
    n_rep = d.n_heads // d.n_kv_heads
    ctx_pad = -(-n_ctx // EL_KV_PAD) * EL_KV_PAD
    sizes = [
        n_ctx * half * f, n_ctx * half * f,  # rope cos, sin
        ch * d.dim * f, ch * d.dim * f, ch * d.dim * f,  # x, xn, tmp
        ch * d.q_dim * f, ch * d.q_dim * f,  # q, att
        ch * d.kv_dim * f, ch * d.kv_dim * f,  # k, v
        ch * d.hidden_dim * f, ch * d.hidden_dim * f,  # hb, hb2
        ch * q8_row, ch * q8_row,  # xq_in, xq_mid
        n_threads * n_rep * ctx_pad * f,  # scores
        n_threads * d.head_dim * EL_KV_PAD * f,  # vtail
        n_threads * n_rep * d.head_dim * f,  # otail
        n_threads * 2 * n_rep * f,  # att_ml
        d.n_heads * EL_ATT_MAX_SPLIT * d.head_dim * f,  # part_o
        d.n_heads * EL_ATT_MAX_SPLIT * f, d.n_heads * EL_ATT_MAX_SPLIT * f,  # part_m, part_l
    ]
    return sum(carve(n) for n in sizes)


def runtime_overhead_bytes(config: Any, n_merges: int = 0) -> int:
    """The Python process around the model: RUNTIME_BASE_BYTES + the tokenizer's share."""
    return (RUNTIME_BASE_BYTES + TOKENIZER_BYTES_PER_TOKEN * Dims.of(config).vocab_size
            + TOKENIZER_BYTES_PER_MERGE * n_merges)


def memory_bytes(config: Any, weights_bytes: int, n_ctx: int, kv_type: str, *,
                 n_threads: int = 4, n_tokens: int | None = None,
                 n_merges: int = 0) -> MemoryEstimate:
    """Resident memory of a process running this model with one session of n_ctx positions.

    Args:
        config: the model's dimensions (ModelConfig, a bundle's ModelSummary, a mapping).
        weights_bytes: bytes of the GGUF file's tensors.
        n_ctx: the session's context length (<= the model's seq_len).
        kv_type: "f16" (edgellm's default for quantised models) or "f32".
        n_threads: the session's threads (the attention scratch is per thread).
        n_tokens: positions the session has filled at its peak; None = n_ctx, a full
            context, which is what a board must be able to hold.
        n_merges: BPE merges of the tokenizer (ModelFacts.n_merges; 0 for SentencePiece).

    Returns:
        The estimate; ``.total`` is what to compare with a board's RAM budget.

    Raises:
        InvalidArgumentError: n_ctx outside [1, seq_len], an unknown kv_type, bad counts.
    """
    d = Dims.of(config)
    _check_ctx(d, n_ctx, kv_type)
    if weights_bytes < 0:
        raise InvalidArgumentError(f"weights_bytes must be >= 0, got {weights_bytes}")
    full = n_tokens is None or n_tokens == n_ctx
    kv = (kv_cache_bytes(d, n_ctx, kv_type) if full
          else kv_resident_bytes(d, n_ctx, kv_type, int(n_tokens or 0)))
    return MemoryEstimate(int(weights_bytes), kv, scratch_bytes(d, n_ctx, n_threads),
                          runtime_overhead_bytes(d, n_merges))


# --------------------------------------------------------------------------------------
# Speed


@dataclass(frozen=True)
class SpeedEstimate:
    """A decode speed estimate and what it rests on.

    basis: "measured" (the board measured this file), "roofline" (bandwidth and kernel
    rates), "roofline x ratio" (scaled by the board's measured/estimated ratio) or
    "bandwidth" (no kernel rate known for the board: an upper bound).
    """

    tokens_per_s: float
    basis: str
    seconds_weights: float  # per token
    seconds_kv: float
    seconds_fixed: float
    bound: str  # what limits the weight reads: "memory" (bandwidth), "compute" (n x the
    # one-core kernel rate), "kernels" (the kernel rate measured at this thread count) or
    # "measured" (the whole speed was measured)


def kv_read_bytes(config: Any, position: float, kv_type: str) -> float:
    """KV bytes a decode step at this position reads: K and V of every earlier position."""
    d = Dims.of(config)
    return 2.0 * d.n_layers * position * d.kv_dim * KV_ELEM_BYTES[kv_type]


def decode_estimate(config: Any, decode_bytes: Mapping[str, int] | int, board: BoardLike,
                    n_ctx: int, *, kv_type: str = "f16", n_threads: int | None = None,
                    position: float | None = None, sha256: str | None = None,
                    rows_per_token: Mapping[str, int] | None = None) -> SpeedEstimate:
    """Decode tokens/s of a model on a board.

    seconds per token = fixed cost + sum over weight types t of time_t + KV time, where
        time_t = bytes_t / kernel_rate_t + rows_t * row_cost_t    (what the kernels take),
                 at least bytes_t / bandwidth                      (what DRAM can deliver),
    bandwidth is the board's sustained bandwidth (mem_bandwidth_gbs * sustained_factor), and
    the kernel rate and per-row cost come from the board's measured table (kernel_rate(),
    row_cost()): "kernel_gbs.<t>@<n>" / "kernel_row_ns.<t>@<n>" measured with n threads
    streaming from DRAM hold the memory limit themselves and are used as they are; the one-
    thread "kernel_gbs.<t>" / "kernel_row_ns.<t>" are scaled to n threads and the result kept
    at least at the bandwidth time. A type with no kernel rate takes the bandwidth time alone
    (an upper bound on speed). KV reads count the same way (K rows are positions, V rows are
    head_dim wide). The fixed cost is measured["token_overhead_us"] or TOKEN_OVERHEAD_S.
    A board that measured this very file (measured["decode_tok_s.<sha256>"]) gives that
    number; one with measured["decode_ratio"] scales the estimate by it.

    Args:
        config: the model's dimensions.
        decode_bytes: weight bytes a decode step reads, per type name (ModelFacts.decode_bytes),
            or one total.
        board: the board profile.
        n_ctx: the context the generation fills.
        kv_type: the KV cache's type.
        n_threads: decode threads (default: the board's cores).
        position: the mean position of the generated tokens (default n_ctx / 2: a
            generation that fills the context).
        sha256: the GGUF file's sha256, to look up a measured speed.
        rows_per_token: matrix rows per type (ModelFacts.decode_rows); default: the config's
            rows, shared among the types in proportion to their bytes.

    Raises:
        InvalidArgumentError: bad counts, or a board with no bandwidth.
    """
    d = Dims.of(config)
    _check_ctx(d, n_ctx, kv_type)
    measured: Mapping[str, float] = board.measured or {}
    if sha256 and (MEASURED_DECODE_PREFIX + sha256) in measured:
        tps = float(measured[MEASURED_DECODE_PREFIX + sha256])
        return SpeedEstimate(tps, "measured", 0.0, 0.0, 1.0 / tps if tps > 0 else math.inf, "measured")
    threads = board.cores if n_threads is None else n_threads
    if threads < 1:
        raise InvalidArgumentError(f"n_threads must be >= 1, got {threads}")
    bw = float(board.sustained_bandwidth_bytes_per_s)
    if not bw > 0:
        raise InvalidArgumentError(f"board {board.name} has no memory bandwidth")
    per_type = {"?": int(decode_bytes)} if isinstance(decode_bytes, int) else dict(decode_bytes)
    if rows_per_token is None:
        total_rows = d.n_layers * layer_rows(d) + d.vocab_size
        all_bytes = sum(per_type.values()) or 1
        rows_per_token = {t: round(total_rows * n / all_bytes) for t, n in per_type.items()}
    unrated = 0.0  # weight bytes of types the board measured no kernel rate for

    def seconds(t: str, nbytes: float, rows: float) -> tuple[float, str]:
        """Seconds to stream nbytes of type t computing `rows` rows, and what limits it."""
        mem = nbytes / bw
        k = kernel_rate(measured, t, threads)
        if k is None:
            return mem, "memory"
        kern = nbytes / k[0] + rows * row_cost(measured, t, threads)
        if k[1]:
            return kern, "kernels"  # measured at this thread count: memory limit included
        return (kern, "compute") if kern > mem else (mem, "memory")

    t_w = 0.0
    by: dict[str, float] = {}
    for t, n in per_type.items():
        if n > 0:
            sec, what = seconds(t, n, rows_per_token.get(t, 0))
            t_w += sec
            by[what] = by.get(what, 0.0) + sec
            if kernel_rate(measured, t, threads) is None:
                unrated += n
    bound = max(by, key=lambda k: by[k]) if by else "memory"
    pos = n_ctx / 2 if position is None else float(position)
    if not 0 <= pos <= n_ctx:
        raise InvalidArgumentError(f"position {pos} is outside [0, n_ctx = {n_ctx}]")
    kv_rows = d.n_layers * d.n_kv_heads * (pos + d.head_dim)  # K: a row per position; V: per dim
    t_kv = seconds(kv_type, kv_read_bytes(d, pos, kv_type), kv_rows)[0]
    t_fixed = float(measured.get(f"{MEASURED_OVERHEAD_KEY}@{threads}" if threads > 1 else MEASURED_OVERHEAD_KEY,
                                 measured.get(MEASURED_OVERHEAD_KEY, TOKEN_OVERHEAD_S * 1e6))) * 1e-6
    tps = 1.0 / (t_w + t_kv + t_fixed)
    # Norms (f32, a few KB) without a rate do not make an estimate bandwidth-only.
    basis = "roofline" if unrated <= 0.05 * max(sum(per_type.values()), 1) else "bandwidth"
    ratio = measured.get(MEASURED_RATIO_KEY)
    if ratio is not None and ratio > 0:
        tps *= float(ratio)
        basis += " x ratio"
    return SpeedEstimate(tps, basis, t_w, t_kv, t_fixed, bound)


def row_cost(measured: Mapping[str, float], weight_type: str, n_threads: int) -> float:
    """Seconds each matrix row adds with n_threads: measured["kernel_row_ns.<t>@<n>"], else
    the one-thread "kernel_row_ns.<t>" shared by the threads, else 0."""
    key = MEASURED_ROW_PREFIX + weight_type
    at_n = measured.get(key if n_threads == 1 else f"{key}@{n_threads}")
    if at_n is not None:
        return float(at_n) * 1e-9
    one = measured.get(key)
    return float(one) * 1e-9 / n_threads if one is not None else 0.0


def kernel_rate(measured: Mapping[str, float], weight_type: str,
                n_threads: int) -> tuple[float, bool] | None:
    """Bytes/s the decode kernels stream weights of a type at with n_threads, from a board's
    measured table, and whether it was measured at that thread count.

    "kernel_gbs.<type>@<n>" is a measurement at n threads: streamed from DRAM, it already
    holds the memory limit. Without it, n times the one-thread "kernel_gbs.<type>" is a
    compute limit only (the caller caps it by the bandwidth). None when neither was measured.
    """
    key = MEASURED_KERNEL_PREFIX + weight_type
    at_n = measured.get(f"{key}@{n_threads}")
    if n_threads == 1:
        at_n = measured.get(key, at_n)
    if at_n is not None and at_n > 0:
        return float(at_n) * 1e9, True
    one = measured.get(key)
    if one is not None and one > 0:
        return float(one) * 1e9 * n_threads, False
    return None


def decode_tokens_per_s(config: Any, bytes_per_token: Mapping[str, int] | int, board: BoardLike,
                        n_ctx: int, **kwargs: Any) -> float:
    """Estimated decode tokens/s; decode_estimate's number (same arguments)."""
    return decode_estimate(config, bytes_per_token, board, n_ctx, **kwargs).tokens_per_s
