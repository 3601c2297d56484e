# SPDX-License-Identifier: MIT
"""Write random-weight GGUF files of the SmolLM-135M and TinyLlama-1.1B shapes for bench/.

Quantised blocks are drawn directly as random bytes (int8 values or nibbles, with an f16
scale chosen so each weight has a standard deviation near 0.02), so even the 1.1B files take
seconds. Every 2-D weight, token_embd and output included, has the file's one type (a fair
comparison: llama.cpp's mostly-Q8_0/Q4_0 recipes would keep a few at higher precision); the
norms are F32. The vocabulary is a "llama" (SentencePiece) one of the right size, so both
edgellm and llama.cpp load the files. The same seed gives byte-identical files.

Usage: python bench/make_models.py [--models smollm-135m,tinyllama-1.1b] [--types q8_0,q4_0]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

# ggml type ids, block sizes and bytes per block (ggml-common.h).
GGML_TYPE = {"q8_0": 8, "q4_0": 2}
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}
QK = 32
# llama_ftype of a "mostly" file (llama.h): LLAMA_FTYPE_MOSTLY_Q8_0 = 7, _Q4_0 = 2.
FILE_TYPE = {"q8_0": 7, "q4_0": 2}
# f16 block scale so a weight's standard deviation is about 0.02: uniform int8 in [-128, 127]
# has sd ~74, a Q4_0 value (nibble - 8) in [-8, 7] has sd ~4.6.
SCALE = {"q8_0": 0.02 / 64, "q4_0": 0.02 / 4}
SEED = 20240601

# llama_token_type (llama.h): what tokenizer.ggml.token_type holds.
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_BYTE = 1, 2, 3, 6


def vocab(n: int) -> dict[str, Any]:
    """A SentencePiece ("llama") vocabulary of n tokens: <unk> <s> </s>, 256 bytes, fillers."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TT_UNKNOWN, TT_CONTROL, TT_CONTROL] + [TT_BYTE] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(tokens) < n:
        # Bijective base 26 ("a".."z", "aa", ...) is unique; half the pieces start a word.
        k, word = i // 2 + 1, ""
        while k:
            k, r = divmod(k - 1, 26)
            word = letters[r] + word
        tokens.append(("\u2581" if i % 2 == 0 else "") + word)
        types.append(TT_NORMAL)
        i += 1
    scores = [0.0] * 259 + [-float(j) for j in range(1, n - 259 + 1)]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.asarray(scores, dtype=np.float32),
        "tokenizer.ggml.token_type": np.asarray(types, dtype=np.int32),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }


def metadata(model: str, qtype: str) -> dict[str, Any]:
    s = common.MODELS[model]
    return {
        "general.architecture": "llama",
        "general.name": f"{s['label']} random ({qtype.upper()}, seed {SEED})",
        "general.file_type": FILE_TYPE[qtype],
        "llama.context_length": s["seq_len"],
        "llama.embedding_length": s["dim"],
        "llama.block_count": s["n_layers"],
        "llama.feed_forward_length": s["hidden_dim"],
        "llama.attention.head_count": s["n_heads"],
        "llama.attention.head_count_kv": s["n_kv_heads"],
        "llama.attention.layer_norm_rms_epsilon": s["norm_eps"],
        "llama.rope.dimension_count": s["head_dim"],
        "llama.rope.freq_base": s["rope_base"],
        "llama.vocab_size": s["vocab_size"],
        **vocab(s["vocab_size"]),
    }


def tensor_shapes(model: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor, rows first, in llama.cpp's order."""
    s = common.MODELS[model]
    dim, hid, hd = s["dim"], s["hidden_dim"], s["head_dim"]
    yield "token_embd.weight", (s["vocab_size"], dim)
    for i in range(s["n_layers"]):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (dim,)
        yield b + "attn_q.weight", (s["n_heads"] * hd, dim)
        yield b + "attn_k.weight", (s["n_kv_heads"] * hd, dim)
        yield b + "attn_v.weight", (s["n_kv_heads"] * hd, dim)
        yield b + "attn_output.weight", (dim, s["n_heads"] * hd)
        yield b + "ffn_norm.weight", (dim,)
        yield b + "ffn_gate.weight", (hid, dim)
        yield b + "ffn_up.weight", (hid, dim)
        yield b + "ffn_down.weight", (dim, hid)
    yield "output_norm.weight", (dim,)
    if not s["tied"]:
        yield "output.weight", (s["vocab_size"], dim)


def random_blocks(rng: np.random.Generator, qtype: str, rows: int, cols: int) -> np.ndarray:
    """[rows, cols / 32 * block_bytes] uint8: random quants, each block led by an f16 scale."""
    nb = rows * cols // QK
    blocks = np.frombuffer(bytearray(rng.bytes(nb * BLOCK_BYTES[qtype])), dtype=np.uint8)
    blocks = blocks.reshape(nb, BLOCK_BYTES[qtype])
    # Scales vary +-25% around the nominal one, as real blocks do.
    d = (SCALE[qtype] * rng.uniform(0.75, 1.25, nb)).astype("<f2")
    blocks[:, :2] = d.view(np.uint8).reshape(nb, 2)
    return blocks.reshape(rows, -1)


def write_model(model: str, qtype: str, out: Path, writer: str) -> Path:
    # One stream per (model, type), so adding a model never changes another's bytes.
    rng = np.random.default_rng([SEED, list(common.MODELS).index(model), GGML_TYPE[qtype]])
    meta = metadata(model, qtype)
    tensors: list[tuple[str, np.ndarray, int]] = []
    for name, shape in tensor_shapes(model):
        if len(shape) == 1:
            tensors.append((name, np.ones(shape, dtype=np.float32), 0))  # norms: F32 ones
        else:
            tensors.append((name, random_blocks(rng, qtype, *shape), GGML_TYPE[qtype]))
    if writer == "edgellm":
        from edgellm.formats.gguf import RawTensor, write_gguf

        items = [
            (
                n,
                a if t == 0 else RawTensor(a, (a.shape[1] // BLOCK_BYTES[qtype] * QK, a.shape[0])),
                t,
            )
            for n, a, t in tensors
        ]
        return write_gguf(out, meta, items)
    import gguf  # llama.cpp's own writer

    w = gguf.GGUFWriter(str(out), arch="llama")
    for key, raw in meta.items():
        if key == "general.architecture":
            continue  # GGUFWriter writes it
        value = raw.tolist() if isinstance(raw, np.ndarray) else raw
        if key == "tokenizer.ggml.token_type":
            w.add_array(key, value)  # ints: INT32, as llama.cpp reads them
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for n, a, t in tensors:
        if t == 0:
            w.add_tensor(n, a)
        else:
            w.add_tensor(n, a, raw_dtype=gguf.GGMLQuantizationType(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(common.MODELS), help="comma-separated names")
    ap.add_argument("--types", default=",".join(common.TYPES), help="q8_0,q4_0")
    ap.add_argument("--out", type=Path, default=common.MODELS_DIR)
    ap.add_argument(
        "--writer",
        choices=("auto", "edgellm", "gguf"),
        default="auto",
        help="edgellm.formats.gguf.write_gguf or the gguf package's GGUFWriter "
        "(auto: edgellm's when it imports; both write identical bytes)",
    )
    ap.add_argument("--force", action="store_true", help="rewrite files that exist")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    types = [t for t in args.types.split(",") if t]
    for m in models:
        if m not in common.MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(common.MODELS)}")
    for t in types:
        if t not in GGML_TYPE:
            ap.error(f"unknown type {t!r}; choose from {', '.join(GGML_TYPE)}")
    if args.writer == "auto":
        try:
            from edgellm.formats.gguf import write_gguf  # noqa: F401

            args.writer = "edgellm"
        except Exception:
            args.writer = "gguf"
    args.out.mkdir(parents=True, exist_ok=True)
    need = 0
    for m in models:
        params = sum(int(np.prod(sh)) for _, sh in tensor_shapes(m))
        for t in types:
            need += params // QK * BLOCK_BYTES[t]
    free = shutil.disk_usage(args.out).free
    if free < 2 * need:
        common.log(
            f"only {free / 2**30:.1f} GiB free in {args.out}; these files need "
            f"{need / 2**30:.1f} GiB (and as much again while writing)"
        )
        return 1
    for m in models:
        for t in types:
            path = args.out / f"{m}-{t}.gguf"
            if path.exists() and not args.force:
                common.log(f"{path} exists (--force rewrites it)")
                continue
            t0 = time.perf_counter()
            write_model(m, t, path, args.writer)
            common.log(
                f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, "
                f"{time.perf_counter() - t0:.1f} s, writer {args.writer})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
