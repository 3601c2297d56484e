# SPDX-License-Identifier: MIT
"""Random-weight Llama GGUF files of any shape, written in seconds, for memory and selection tests.

Usage (tests/ is on sys.path):

    from support.random_gguf import Shape, write_random_gguf
    shape = Shape(dim=512, hidden_dim=1408, n_layers=8, n_heads=8, n_kv_heads=4,
                  vocab_size=8000, seq_len=2048, tied=False)
    path = write_random_gguf(tmp_path / "m.gguf", shape, "q8_0", seed=1)

Quantised blocks are random bytes with an f16 scale giving each weight a standard deviation
near 0.02 (as bench/make_models.py does), so activations stay finite and a 50 MB file takes a
fraction of a second; F16 tensors are drawn as numbers. Norms are F32 ones. The vocabulary is
a SentencePiece ("llama") one: <unk> <s> </s>, the 256 byte tokens, then generated pieces.
The output row of the end-of-sequence token is zero, so its logit is 0 while thousands of others are random: a
generation runs its full length instead of stopping at a random end of sequence (a memory
measurement must reach the positions it claims). The same arguments give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.formats.gguf import RawTensor, write_gguf

QK = 32  # weights per Q8_0 / Q4_0 block
GGML_ID = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18}
# Block scale so a weight has a standard deviation near 0.02: uniform int8 has sd ~74, a
# Q4_0 value (nibble - 8) sd ~4.6.
SCALE = {"q8_0": 0.02 / 64, "q4_0": 0.02 / 4}
# llama_ftype of the file ("mostly Q8_0" = 7, "mostly Q4_0" = 2, F16 = 1, F32 = 0).
FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_0_mixed": 2}
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_BYTE = 1, 2, 3, 6  # llama_token_type
EOS = 2  # </s>


@dataclass(frozen=True)
class Shape:
    """The dimensions of a Llama model (the shared dimension vocabulary of STYLE.md)."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    tied: bool = False
    head_dim: int = 0  # 0: dim // n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads


def tensor_shapes(s: Shape) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape [rows, cols]) of every tensor, in llama.cpp's order."""
    q, kv = s.n_heads * s.hd, s.n_kv_heads * s.hd
    yield "token_embd.weight", (s.vocab_size, s.dim)
    for i in range(s.n_layers):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (s.dim,)
        yield b + "attn_q.weight", (q, s.dim)
        yield b + "attn_k.weight", (kv, s.dim)
        yield b + "attn_v.weight", (kv, s.dim)
        yield b + "attn_output.weight", (s.dim, q)
        yield b + "ffn_norm.weight", (s.dim,)
        yield b + "ffn_gate.weight", (s.hidden_dim, s.dim)
        yield b + "ffn_up.weight", (s.hidden_dim, s.dim)
        yield b + "ffn_down.weight", (s.dim, s.hidden_dim)
    yield "output_norm.weight", (s.dim,)
    if not s.tied:
        yield "output.weight", (s.vocab_size, s.dim)


def n_params(s: Shape) -> int:
    """Parameters of the model (every tensor's elements)."""
    return sum(int(np.prod(shape)) for _, shape in tensor_shapes(s))


def tensor_type(recipe: str, name: str, shape: tuple[int, ...]) -> str:
    """The type a tensor gets in recipe: f32/f16/q8_0/q4_0 uniform, or q4_0_mixed."""
    if len(shape) == 1:
        return "f32"
    t = recipe
    if recipe == "q4_0_mixed":
        t = "q8_0" if name in ("token_embd.weight", "output.weight") else "q4_0"
    if t in BLOCK_BYTES and shape[-1] % QK:
        return "f16"
    return t


def vocab(n: int) -> dict[str, Any]:
    """A SentencePiece ("llama") vocabulary of n >= 259 tokens."""
    if n < 259:
        raise ValueError(f"vocab_size {n} < 259 (3 specials + 256 bytes)")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TT_UNKNOWN, TT_CONTROL, TT_CONTROL] + [TT_BYTE] * 256
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(tokens) < n:
        k, word = i // 2 + 1, ""  # bijective base 26: "a".."z", "aa", ... (unique)
        while k:
            k, r = divmod(k - 1, 26)
            word = letters[r] + word
        tokens.append(("\u2581" if i % 2 == 0 else "") + word)
        types.append(TT_NORMAL)
        i += 1
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.asarray([0.0] * 259 + [-float(j) for j in range(1, n - 258)],
                                            dtype=np.float32),
        "tokenizer.ggml.token_type": np.asarray(types, dtype=np.int32),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": EOS,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map (bytes_to_unicode), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return [out[b] for b in range(256)]


def bpe_vocab(n: int) -> dict[str, Any]:
    """A byte-level BPE ("gpt2") vocabulary of n >= 258 tokens with n - 258 merges.

    The 256 byte symbols, then "Ġ" + letter pairs, then words (optionally "Ġ"-prefixed) built
    by merging a known token with one more letter, shortest first, then <s> and </s> last (as
    real models put their specials).
    """
    if n < 258:
        raise ValueError(f"vocab_size {n} < 258 (256 bytes + 2 specials)")
    tokens = _byte_alphabet()
    merges: list[str] = []
    known = set(tokens)
    letters = "abcdefghijklmnopqrstuvwxyz"
    frontier = list(letters)
    for c in letters:  # U+0120 "Ġ" stands for a space: first the space-letter pairs
        if len(tokens) < n - 2:
            merges.append(f"\u0120 {c}")
            tokens.append("\u0120" + c)
            known.add("\u0120" + c)
            frontier.append("\u0120" + c)
    while len(tokens) < n - 2:
        nxt = []
        for w in frontier:
            for c in "etaoinshrdlu":
                if len(tokens) >= n - 2:
                    break
                word = w + c
                if word in known:
                    continue
                merges.append(f"{w} {c}")
                tokens.append(word)
                known.add(word)
                nxt.append(word)
        frontier = nxt
    tokens += ["<s>", "</s>"]
    types = [TT_NORMAL] * (n - 2) + [TT_CONTROL] * 2
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.asarray(types, dtype=np.int32),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": n - 2,
        "tokenizer.ggml.eos_token_id": n - 1,
        "tokenizer.ggml.add_bos_token": True,
    }


def _blocks(rng: np.random.Generator, t: str, rows: int, cols: int) -> np.ndarray:  # -> [rows, row_bytes]
    nb = rows * cols // QK
    raw = np.frombuffer(bytearray(rng.bytes(nb * BLOCK_BYTES[t])), dtype=np.uint8).reshape(nb, -1)
    d = (SCALE[t] * rng.uniform(0.75, 1.25, nb)).astype("<f2")  # scales vary +-25%
    raw[:, :2] = d.view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, -1)


def metadata(s: Shape, recipe: str, tokenizer: str = "spm",
             extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The GGUF metadata of a model of shape s: llama.* dimensions, a tokenizer, extra keys."""
    if tokenizer not in ("spm", "bpe"):
        raise ValueError(f"tokenizer must be 'spm' or 'bpe', not {tokenizer!r}")
    return {
        "general.architecture": "llama",
        "general.name": f"random {s.dim}x{s.n_layers} {recipe}",
        "general.file_type": FILE_TYPE[recipe],
        "llama.context_length": s.seq_len,
        "llama.embedding_length": s.dim,
        "llama.block_count": s.n_layers,
        "llama.feed_forward_length": s.hidden_dim,
        "llama.attention.head_count": s.n_heads,
        "llama.attention.head_count_kv": s.n_kv_heads,
        "llama.attention.key_length": s.hd,
        "llama.attention.value_length": s.hd,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.dimension_count": s.hd,
        "llama.rope.freq_base": 10000.0,
        "llama.vocab_size": s.vocab_size,
        **(vocab(s.vocab_size) if tokenizer == "spm" else bpe_vocab(s.vocab_size)),
        **(extra or {}),
    }


def write_random_gguf(path: str | Path, s: Shape, recipe: str, *, seed: int = 0,
                      tokenizer: str = "spm", extra: Mapping[str, Any] | None = None) -> Path:
    """Write a random-weight llama GGUF of shape s in recipe; returns the path.

    Args:
        path: the file to write.
        s: the model's dimensions.
        recipe: "f32", "f16", "q8_0", "q4_0" or "q4_0_mixed" (embedding and output Q8_0).
        seed: the random stream; the same arguments give the same bytes.
        tokenizer: "spm" (SentencePiece "llama" vocabulary) or "bpe" (byte-level "gpt2"
            vocabulary with merges).
        extra: more metadata keys (edgellm.* facts, general.name ...).
    """
    meta = metadata(s, recipe, tokenizer, extra)
    eos = int(meta["tokenizer.ggml.eos_token_id"])
    rng = np.random.default_rng([seed, s.dim, s.n_layers, s.vocab_size])
    output = "token_embd.weight" if s.tied else "output.weight"
    items: list[tuple[str, Any, int]] = []
    for name, shape in tensor_shapes(s):
        t = tensor_type(recipe, name, shape)
        if t == "f32":
            items.append((name, np.ones(shape, dtype=np.float32), GGML_ID[t]))
            continue
        if t == "f16":
            w = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
        else:
            w = _blocks(rng, t, *shape)
        if name == output:
            w[eos] = 0  # a zero row (zero scales): the end token's logit is 0, greedy never picks it
        items.append((name, RawTensor(w, shape[::-1]), GGML_ID[t]))
    return write_gguf(path, meta, items)


def _nbytes(t: str, shape: tuple[int, ...]) -> int:
    n = int(np.prod(shape))
    if t in BLOCK_BYTES:
        return n // QK * BLOCK_BYTES[t]
    return n * (2 if t == "f16" else 4)


def write_sparse_gguf(path: str | Path, s: Shape, recipe: str, *, tokenizer: str = "spm",
                      extra: Mapping[str, Any] | None = None) -> Path:
    """Write a full-size GGUF of shape s whose tensor data is zeros, as a sparse file.

    The header (metadata, tokenizer, tensor infos) is real and the file has its true size, so
    readers and estimates see exactly what a real build of that shape holds; the data section
    is a hole, so a 1 GB model costs no disk and no time (hashing it still reads the zeros).
    Written by the gguf package's GGUFWriter, an implementation independent of edgellm's.
    """
    import gguf

    out = Path(path)
    w = gguf.GGUFWriter(str(out), arch="llama")
    for key, raw in metadata(s, recipe, tokenizer, extra).items():
        if key == "general.architecture":
            continue  # GGUFWriter writes it
        value = raw.tolist() if isinstance(raw, np.ndarray) else raw
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    align = 32  # GGUF's default alignment: each tensor's data starts on a multiple of it
    data = 0
    for name, shape in tensor_shapes(s):
        t = tensor_type(recipe, name, shape)
        n = _nbytes(t, shape)
        w.add_tensor_info(name, shape, np.dtype(np.float32), n,
                          raw_dtype=gguf.GGMLQuantizationType(GGML_ID[t]))
        data += -(-n // align) * align
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    f.flush()
    start = -(-f.tell() // align) * align
    f.truncate(start + data)
    w.close()
    return out
