# SPDX-License-Identifier: MIT
"""Model hyper-parameters read from GGUF metadata, and GGUF tensor names mapped to C roles."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import ModelFormatError, UnsupportedError

SUPPORTED_ARCHS = ("llama", "qwen2")

# RoPE layouts (values of edgellm_rope_mode in edgellm.h, checked by tests/test_runtime.py).
ROPE_NORM = 0  # adjacent pairs: what llama.cpp's "llama" arch uses
ROPE_NEOX = 1  # halves: what llama.cpp's "qwen2" arch uses

# GGUF tensor name -> (edgellm_tensor_role name, per-layer?)
_GLOBAL_TENSORS = {
    "token_embd.weight": "TOKEN_EMBD",
    "output_norm.weight": "OUTPUT_NORM",
    "output.weight": "OUTPUT",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "ATTN_NORM",
    "attn_q.weight": "ATTN_Q",
    "attn_k.weight": "ATTN_K",
    "attn_v.weight": "ATTN_V",
    "attn_output.weight": "ATTN_OUT",
    "attn_q.bias": "ATTN_Q_BIAS",
    "attn_k.bias": "ATTN_K_BIAS",
    "attn_v.bias": "ATTN_V_BIAS",
    "ffn_norm.weight": "FFN_NORM",
    "ffn_gate.weight": "FFN_GATE",
    "ffn_up.weight": "FFN_UP",
    "ffn_down.weight": "FFN_DOWN",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The dimensions and constants of one Llama-family model (shared vocabulary with C)."""

    arch: str
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    seq_len: int
    rope_mode: int
    rope_dim: int
    rope_base: float
    rope_scale: float
    norm_eps: float

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_metadata(
        cls, meta: Mapping[str, Any], vocab_from_tensor: int | None = None
    ) -> ModelConfig:
        """Read the config of a GGUF file's model.

        Args:
            meta: the GGUF metadata.
            vocab_from_tensor: rows of token_embd, used when the vocab size key is absent.

        Raises:
            UnsupportedError: an architecture or RoPE scaling edgellm does not run.
            ModelFormatError: a required key is missing or has a nonsensical value.
        """
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedError(
                f"architecture {arch!r} is not supported (edgellm runs: {', '.join(SUPPORTED_ARCHS)})"
            )

        def req(key: str) -> int:
            value = meta.get(f"{arch}.{key}")
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelFormatError(f"GGUF key {arch}.{key} is missing or not a positive integer")
            return value

        dim = req("embedding_length")
        n_heads = req("attention.head_count")
        n_kv_heads = meta.get(f"{arch}.attention.head_count_kv", n_heads)
        head_dim = meta.get(f"{arch}.attention.key_length", dim // n_heads)
        vocab = meta.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens else vocab_from_tensor
        if not isinstance(vocab, int) or vocab <= 0:
            raise ModelFormatError("cannot tell the vocabulary size (no vocab_size, tokens or embedding)")

        scale = 1.0
        scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
        if scaling_type == "linear":
            scale = float(meta.get(f"{arch}.rope.scaling.factor", 1.0))
        elif scaling_type not in ("none", None):
            raise UnsupportedError(f"RoPE scaling {scaling_type!r} is not supported (only linear)")
        scale = float(meta.get(f"{arch}.rope.scale_linear", scale))  # older GGUF files
        default_eps = 1e-6 if arch == "qwen2" else 1e-5
        return cls(
            arch=arch,
            dim=dim,
            hidden_dim=req("feed_forward_length"),
            n_layers=req("block_count"),
            n_heads=n_heads,
            n_kv_heads=int(n_kv_heads),
            head_dim=int(head_dim),
            vocab_size=vocab,
            seq_len=req("context_length"),
            rope_mode=ROPE_NEOX if arch == "qwen2" else ROPE_NORM,
            rope_dim=int(meta.get(f"{arch}.rope.dimension_count", head_dim)),
            rope_base=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scale=scale,
            norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", default_eps)),
        )


def tensor_roles(names: Iterator[str] | list[str], n_layers: int) -> Iterator[tuple[str, str, int]]:
    """Map GGUF tensor names to (name, role, layer); layer is -1 for global tensors.

    Raises:
        UnsupportedError: a tensor edgellm would have to ignore, which would give wrong results
            (e.g. llama3's rope_freqs.weight).
        ModelFormatError: a layer index outside the block count.
    """
    for name in names:
        if name in _GLOBAL_TENSORS:
            yield name, _GLOBAL_TENSORS[name], -1
            continue
        m = _LAYER_RE.match(name)
        if m and m.group(2) in _LAYER_TENSORS:
            layer = int(m.group(1))
            if layer >= n_layers:
                raise ModelFormatError(f"tensor {name} is for layer {layer}, but block_count is {n_layers}")
            yield name, _LAYER_TENSORS[m.group(2)], layer
            continue
        raise UnsupportedError(f"tensor {name!r} is not used by edgellm's llama/qwen2 forward")
