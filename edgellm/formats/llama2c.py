# SPDX-License-Identifier: MIT
"""llama2.c checkpoints (legacy v0 and "ak42" v1 fp32) and tok*.bin tokenizers, read into GGUF terms."""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError, ModelFormatError, UnsupportedError
from .gguf import ImportedModel, LazyTensor

V1_MAGIC = 0x616B3432  # "ak42" read as a little-endian uint32 (llama2.c export.py v1+)
V1_HEADER_BYTES = 256
V0_HEADER_BYTES = 7 * 4
MAX_DIM = 1 << 20  # no real llama2.c model comes close; keeps sizes sane before the size check
MAX_LAYERS = 4096

# llama2.c tokenizer conventions (its tokenizer.py exports these ids in this order).
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# GGUF token types (llama.cpp llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


@dataclass(frozen=True)
class Llama2cConfig:
    """The seven header numbers of a llama2.c checkpoint, plus what they imply."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # always positive here; the v0 sign trick is decoded into shared_classifier
    seq_len: int
    shared_classifier: bool  # the output matrix is the token embedding
    version: int  # 0 (legacy, no magic) or 1 ("ak42" fp32)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads


@dataclass
class Llama2cCheckpoint:
    """A mapped llama2.c checkpoint: weights are read-only views, stacked per layer."""

    path: Path
    config: Llama2cConfig
    # llama2.c name -> view: token_embedding [vocab_size, dim], rms_att [n_layers, dim],
    # wq [n_layers, dim, dim], wk/wv [n_layers, kv_dim, dim], wo [n_layers, dim, dim],
    # rms_ffn [n_layers, dim], w1/w3 [n_layers, hidden_dim, dim], w2 [n_layers, dim, hidden_dim],
    # rms_final [dim], wcls [vocab_size, dim] (only when not shared).
    weights: dict[str, np.ndarray]


@dataclass
class Llama2cTokenizer:
    """A llama2.c tok*.bin: raw pieces and their scores, ids in file order."""

    max_token_length: int
    pieces: list[bytes]  # [vocab_size], as stored (spaces for "▁", "\n<s>\n" for BOS)
    scores: np.ndarray  # [vocab_size] f32


def _layout(c: Llama2cConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Tensors in file order with their numpy shapes (all fp32)."""
    L, d, h, kv, v = c.n_layers, c.dim, c.hidden_dim, c.kv_dim, c.vocab_size
    mats = [("wq", (L, d, d)), ("wk", (L, kv, d)), ("wv", (L, kv, d)), ("wo", (L, d, d)),
            ("w1", (L, h, d)), ("w2", (L, d, h)), ("w3", (L, h, d))]
    if c.version == 0:
        half = c.head_dim // 2
        out = [("token_embedding", (v, d)), ("rms_att", (L, d)), *mats[:4], ("rms_ffn", (L, d)),
               *mats[4:], ("rms_final", (d,)), ("freq_cis_real", (c.seq_len, half)),
               ("freq_cis_imag", (c.seq_len, half))]
    else:
        out = [("rms_att", (L, d)), ("rms_ffn", (L, d)), ("rms_final", (d,)),
               ("token_embedding", (v, d)), *mats]
    if not c.shared_classifier:
        out.append(("wcls", (v, d)))
    return out


def _check_config(path: Path, c: Llama2cConfig) -> None:
    for field in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                  "seq_len"):
        value = getattr(c, field)
        if not 0 < value <= (MAX_LAYERS if field == "n_layers" else MAX_DIM):
            raise ModelFormatError(f"{path}: llama2.c header {field} = {value} is out of range "
                                   "(not a llama2.c checkpoint?)")
    if c.dim % c.n_heads or c.n_heads % c.n_kv_heads or c.head_dim % 2:
        raise ModelFormatError(
            f"{path}: llama2.c header is inconsistent: dim {c.dim}, n_heads {c.n_heads}, "
            f"n_kv_heads {c.n_kv_heads} (need dim % n_heads == 0, n_heads % n_kv_heads == 0, "
            "even head_dim)")


def read_llama2c(path: str | os.PathLike[str]) -> Llama2cCheckpoint:
    """Map a llama2.c fp32 checkpoint (legacy v0, or v1 "ak42") and check its size exactly.

    Raises:
        ModelFormatError: a header out of range, or a file whose size is not exactly what
            the header implies.
        UnsupportedError: an "ak42" file of another version (v2 is int8-quantised).
        InvalidArgumentError: no such file.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"no such file: {p}")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    if len(head) < V0_HEADER_BYTES:
        raise ModelFormatError(f"{p}: {size} bytes is too short for a llama2.c header")
    (magic,) = struct.unpack_from("<I", head, 0)
    if magic == V1_MAGIC:
        if len(head) < V1_HEADER_BYTES:
            raise ModelFormatError(f"{p}: truncated llama2.c v1 header ({size} bytes)")
        (version,) = struct.unpack_from("<i", head, 4)
        if version != 1:
            raise UnsupportedError(f"{p}: llama2.c checkpoint version {version} is not "
                                   "supported (edgellm reads the fp32 v0 and v1 formats)")
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", head, 8)
        shared = head[36]
        if shared > 1:
            raise ModelFormatError(f"{p}: llama2.c v1 shared_classifier flag is {shared}")
        cfg = Llama2cConfig(dim, hidden, layers, heads, kv_heads, vocab, seq_len, bool(shared), 1)
        header_bytes = V1_HEADER_BYTES
    else:
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", head, 0)
        # The legacy format marks an untied output matrix with a negative vocab_size.
        cfg = Llama2cConfig(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len,
                            vocab > 0, 0)
        header_bytes = V0_HEADER_BYTES
    _check_config(p, cfg)
    layout = _layout(cfg)
    expected = header_bytes + 4 * sum(int(np.prod(s)) for _, s in layout)
    if size != expected:
        raise ModelFormatError(
            f"{p}: llama2.c v{cfg.version} header (dim {cfg.dim}, hidden_dim {cfg.hidden_dim}, "
            f"n_layers {cfg.n_layers}, n_heads {cfg.n_heads}, n_kv_heads {cfg.n_kv_heads}, "
            f"vocab_size {cfg.vocab_size}, seq_len {cfg.seq_len}, "
            f"{'shared' if cfg.shared_classifier else 'separate'} classifier) implies "
            f"{expected} bytes, the file has {size}")
    with open(p, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    weights: dict[str, np.ndarray] = {}
    off = header_bytes
    for name, shape in layout:
        n = int(np.prod(shape))
        weights[name] = np.frombuffer(mm, dtype="<f4", count=n, offset=off).reshape(shape)
        off += 4 * n
    return Llama2cCheckpoint(p, cfg, weights)


def read_llama2c_tokenizer(path: str | os.PathLike[str],
                           vocab_size: int | None = None) -> Llama2cTokenizer:
    """Read a llama2.c tok*.bin: int32 max_token_length, then (f32 score, i32 len, bytes)*.

    Args:
        path: the tokenizer file.
        vocab_size: entries expected (the model's); the file must hold exactly that many.
            None reads entries until the end of the file.

    Raises:
        ModelFormatError: truncated, a bad length, or a count that does not match vocab_size.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"no such file: {p}")
    data = p.read_bytes()
    size = len(data)
    if size < 4:
        raise ModelFormatError(f"{p}: too short for a llama2.c tokenizer")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if max_len <= 0:
        raise ModelFormatError(f"{p}: max_token_length {max_len} must be positive")
    if vocab_size is not None and (vocab_size <= 0 or vocab_size * 8 > size - 4):
        raise ModelFormatError(
            f"{p}: {size} bytes cannot hold {vocab_size} tokens (wrong tokenizer for this model?)")
    pieces: list[bytes] = []
    scores: list[float] = []
    pos = 4
    while (len(pieces) < vocab_size) if vocab_size is not None else (pos < size):
        i = len(pieces)
        if size - pos < 8:
            raise ModelFormatError(f"{p}: truncated at token {i} (offset {pos})")
        score, n = struct.unpack_from("<fi", data, pos)
        pos += 8
        if n < 0 or n > size - pos:
            raise ModelFormatError(f"{p}: token {i} at offset {pos - 4} has length {n}, "
                                   f"{size - pos} bytes left")
        pieces.append(data[pos : pos + n])
        scores.append(score)
        pos += n
    if pos != size:
        raise ModelFormatError(
            f"{p}: {size - pos} bytes left after {len(pieces)} tokens (the tokenizer is for a "
            "model with a bigger vocabulary?)")
    return Llama2cTokenizer(max_len, pieces, np.asarray(scores, dtype=np.float32))


def find_tokenizer(model_path: Path, vocab_size: int) -> Path:
    """The tok*.bin beside a checkpoint: tok{vocab_size}.bin, else the only tok*.bin there."""
    folder = model_path.parent
    exact = folder / f"tok{vocab_size}.bin"
    if exact.is_file():
        return exact
    found = sorted(q for q in folder.glob("tok*.bin") if q.is_file() and q != model_path)
    if len(found) == 1:
        return found[0]
    if not found:
        raise InvalidArgumentError(
            f"no llama2.c tokenizer (tok*.bin) beside {model_path}; pass tokenizer=PATH")
    raise InvalidArgumentError(
        f"several tokenizers beside {model_path} ({', '.join(q.name for q in found)}); "
        "pass tokenizer=PATH")


def tokenizer_metadata(tok: Llama2cTokenizer, path: Path) -> dict[str, object]:
    """llama.cpp "llama" (sentencepiece) tokenizer keys for a llama2.c tokenizer."""
    tokens: list[str] = []
    types = np.empty(len(tok.pieces), dtype=np.int32)
    for i, raw in enumerate(tok.pieces):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(f"{path}: token {i} ({raw!r}) is not valid UTF-8") from None
        if i in (BOS_ID, EOS_ID):
            text = text.strip("\n")  # llama2.c exports BOS/EOS as "\n<s>\n" / "\n</s>\n"
            types[i] = TOKEN_CONTROL
        elif i == UNK_ID:
            types[i] = TOKEN_UNKNOWN
        elif _BYTE_PIECE.fullmatch(text):
            types[i] = TOKEN_BYTE
        else:
            text = text.replace(" ", "\u2581")  # undo export's "▁" -> " " (sentencepiece form)
            types[i] = TOKEN_NORMAL
        tokens.append(text)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": tok.scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": BOS_ID,
        "tokenizer.ggml.eos_token_id": EOS_ID,
        "tokenizer.ggml.unknown_token_id": UNK_ID,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }


def _view(arr: np.ndarray) -> LazyTensor:
    return LazyTensor(tuple(arr.shape), lambda: arr)


def import_llama2c(path: str | os.PathLike[str],
                   tokenizer: str | os.PathLike[str] | None = None) -> ImportedModel:
    """Read a llama2.c checkpoint and its tokenizer as a GGUF "llama" model.

    The weights keep their layout: llama2.c already rotates adjacent pairs in RoPE, as
    llama.cpp's "llama" architecture does, so q/k need no permutation.

    Args:
        path: the checkpoint (.bin).
        tokenizer: its tok*.bin; by default tok{vocab_size}.bin or the only tok*.bin beside it.
    """
    ckpt = read_llama2c(path)
    c = ckpt.config
    tok_path = Path(tokenizer) if tokenizer is not None else find_tokenizer(ckpt.path,
                                                                           c.vocab_size)
    tok = read_llama2c_tokenizer(tok_path, c.vocab_size)
    meta: dict[str, object] = {
        "llama.context_length": c.seq_len,
        "llama.embedding_length": c.dim,
        "llama.block_count": c.n_layers,
        "llama.feed_forward_length": c.hidden_dim,
        "llama.attention.head_count": c.n_heads,
        "llama.attention.head_count_kv": c.n_kv_heads,
        "llama.rope.freq_base": 10000.0,  # llama2.c's precompute_freqs_cis theta
        "llama.attention.layer_norm_rms_epsilon": 1e-5,  # llama2.c ModelArgs.norm_eps
        "llama.rope.dimension_count": c.head_dim,
        "llama.vocab_size": c.vocab_size,
        **tokenizer_metadata(tok, tok_path),
    }
    w = ckpt.weights
    tensors: list[tuple[str, LazyTensor]] = [
        ("token_embd.weight", _view(w["token_embedding"])),
        ("output_norm.weight", _view(w["rms_final"])),
    ]
    if not c.shared_classifier:
        tensors.append(("output.weight", _view(w["wcls"])))
    per_layer = [("attn_norm", "rms_att"), ("attn_q", "wq"), ("attn_k", "wk"), ("attn_v", "wv"),
                 ("attn_output", "wo"), ("ffn_norm", "rms_ffn"), ("ffn_gate", "w1"),
                 ("ffn_down", "w2"), ("ffn_up", "w3")]
    for layer in range(c.n_layers):
        for gguf_name, l2c_name in per_layer:
            tensors.append((f"blk.{layer}.{gguf_name}.weight", _view(w[l2c_name][layer])))
    return ImportedModel("llama", ckpt.path.stem, meta, tensors, f"llama2c:{ckpt.path.name}")
