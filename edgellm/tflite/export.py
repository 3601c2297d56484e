# SPDX-License-Identifier: MIT
"""Export a GGUF llama/qwen2 model to ``.tflite`` with litert-torch (+ int8 via ai-edge-quantizer).

The torch module here re-implements edgellm's forward (the blocks of
edgellm.runtime.reference, in f32) over the GGUF's dequantised weights. It has one
function traced twice, as two signatures of one ``.tflite`` file:

- ``prefill``: ``tokens [1, prefill_len] int32``, ``input_pos [prefill_len] int32`` and the
  KV cache in -> ``logits [1, prefill_len, vocab_size]`` and the new K/V rows out;
- ``decode``: the same with one token.

The KV cache is two inputs ``k_cache``/``v_cache`` of shape ``[n_layers, n_ctx, kv_dim]``
f32, owned by the runtime; the outputs ``k_new``/``v_new`` ``[n_layers, n, kv_dim]`` are the
rows this call adds, which the runtime writes into the cache at ``input_pos`` (in place, in
the interpreter's input buffer, so a decode step moves one row, not the cache). Inside the
graph the rows are merged into the cache with a one-hot matmul before attention, and the
causal mask is built from ``input_pos``; a slot whose ``input_pos`` is -1 is padding (it
merges nothing; its outputs are meaningless). Only static shapes and ops every TFLite
delegate knows (no scatter, no dynamic slice).

Quantisation (ai-edge-quantizer, per output channel, symmetric):

- ``"int8"``: int8 weights, f32 activations (``weight_only_wi8_afp32``): a quarter of the
  f32 weight bytes on disk; agrees with native Q8_0 on >= 97% of greedy tokens.
- ``"int8-dynamic"``: int8 weights and activations quantised at run time
  (``dynamic_wi8_afp32``, "dynamic range"): int8 arithmetic, a little further from Q8_0, and
  wrong on tflite-runtime 2.14 (edgellm.tflite.runtime refuses that pair).

Public API: ``export_tflite(gguf, out, quantize=...) -> TFLiteExport``,
``export_for_recipe(gguf, folder, recipe) -> TFLiteExport`` (what ``edgellm build`` calls),
``load_weights(gguf) -> (ModelConfig, weights)``, ``LlamaForTFLite``, ``quantize_tflite``.

Needs torch, litert-torch and ai-edge-quantizer (the ``tflite`` extra); hub side only.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._fsutil import atomic_write
from ..errors import InvalidArgumentError, MissingToolError, UnsupportedError
from ..formats.gguf import read_gguf
from ..formats.quant import dequantize
from ..runtime.config import ROPE_NEOX, ModelConfig, tensor_roles
from . import TFLITE_NAME

QUANT_MODES = ("int8", "int8-dynamic", None)  # None: f32 weights (see the module docstring)
# edgellm build's recipe -> export mode: float recipes stay f32, q8_0 becomes int8 weights.
RECIPE_MODES: dict[str, str | None] = {"f32": None, "f16": None, "q8_0": "int8"}
DEFAULT_PREFILL = 64  # tokens per prefill call: the prompt is fed in chunks of this size
# Added to the scores of masked positions. Finite (not -inf) so a padding row, which may see
# no position at all, softmaxes to a uniform row instead of NaN (0 * NaN would then leak into
# the cache through the one-hot write); exp(-1e9) is exactly 0 in f32 for real rows.
MASK_VALUE = -1e9
SIGNATURES = ("prefill", "decode")


@dataclass(frozen=True)
class TFLiteExport:
    """What export_tflite wrote: the file and its signatures, as the bundle manifest records it.

    .. versionadded:: 0.1
    """

    path: Path
    quantize: str | None  # "int8", "int8-dynamic" or None (f32)
    n_ctx: int  # KV cache positions
    prefill_len: int
    signatures: dict[str, dict[str, dict[str, list[Any]]]]  # name -> inputs/outputs -> [shape, dtype]

    def manifest(self) -> dict[str, Any]:
        """The ``backend`` object of bundle.json."""
        return {"name": "tflite", "file": self.path.name, "quantize": self.quantize or "none",
                "n_ctx": self.n_ctx, "prefill_len": self.prefill_len,
                "signatures": self.signatures, "exporter": _exporter_version()}


def _exporter_version() -> str:
    from importlib.metadata import version

    return f"litert-torch {version('litert-torch')}, ai-edge-quantizer {version('ai-edge-quantizer')}"


def load_weights(path: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """A GGUF model's config and every tensor dequantised to f32 in numpy order ([rows, cols]).

    Raises:
        ModelFormatError, UnsupportedError: from the GGUF reader and the config.
    """
    with read_gguf(path) as gf:
        embd = gf.tensors.get("token_embd.weight")
        cfg = ModelConfig.from_metadata(
            gf.metadata, vocab_from_tensor=embd.shape[1] if embd is not None and len(embd.shape) > 1 else None)
        w: dict[str, np.ndarray] = {}
        for name, _, _ in tensor_roles(list(gf.tensors), cfg.n_layers):  # refuses unknown tensors
            info = gf.tensors[name]
            shape = tuple(reversed(info.shape))
            w[name] = np.ascontiguousarray(dequantize(gf.tensor_bytes(name), info.type, shape),
                                           dtype=np.float32)
    return cfg, w


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingToolError("exporting to .tflite needs torch: pip install 'edgellm[tflite]' "
                               "(install torch first, see docs/tflite.md)") from None
    return torch


def _module_class() -> Any:
    """LlamaForTFLite, defined on first use so importing this module does not import torch."""
    torch = _torch()
    nn = torch.nn

    class LlamaForTFLite(nn.Module):  # type: ignore[misc, name-defined]
        """edgellm's llama/qwen2 forward in torch f32, with the KV cache as inputs/outputs."""

        def __init__(self, cfg: ModelConfig, w: dict[str, np.ndarray], n_ctx: int,
                     int8_embedding: bool = False) -> None:
            super().__init__()
            self.cfg, self.n_ctx = cfg, n_ctx
            self.embd: Any
            self.out: Any

            def t(a: np.ndarray) -> Any:
                return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

            embd = w["token_embd.weight"]  # [vocab, dim]
            out = w.get("output.weight")
            if int8_embedding:
                # The lookup table as int8 rows with an f32 scale each: ai-edge-quantizer
                # leaves GATHER tables in f32, and a tied table would then stay f32 once per
                # signature beside the output's int8 copy.
                scale = np.maximum(np.abs(embd).max(axis=1), 1e-30) / 127.0  # [vocab]
                q = np.clip(np.rint(embd / scale[:, None]), -127, 127).astype(np.int8)
                self.register_buffer("embd_q", torch.from_numpy(q))  # [vocab, dim] int8
                self.register_buffer("embd_scale", t(scale[:, None]))  # [vocab, 1]
                out = embd if out is None else out  # the output keeps its own (quantised) copy
                self.embd = None
            else:
                self.embd_q = None
                self.embd = nn.Parameter(t(embd), requires_grad=False)
            self.out = None if out is None else nn.Parameter(t(out), requires_grad=False)  # tied if None
            self.out_norm = nn.Parameter(t(w["output_norm.weight"]), requires_grad=False)
            self.layers = nn.ModuleList()
            for i in range(cfg.n_layers):
                blk = nn.Module()
                for key, val in w.items():
                    pre = f"blk.{i}."
                    if key.startswith(pre):
                        blk.register_parameter(key[len(pre):].replace(".", "_"),
                                               nn.Parameter(t(val), requires_grad=False))
                self.layers.append(blk)
            half = cfg.rope_dim // 2
            inv = cfg.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / cfg.rope_dim)
            ang = (np.arange(n_ctx, dtype=np.float64) / cfg.rope_scale)[:, None] * inv[None, :]
            self.register_buffer("cos", t(np.cos(ang)))  # [n_ctx, rope_dim / 2]
            self.register_buffer("sin", t(np.sin(ang)))
            self.register_buffer("slots", torch.arange(n_ctx, dtype=torch.int32))  # [n_ctx]

        def rms_norm(self, x: Any, w: Any) -> Any:  # [n, dim] -> [n, dim]
            return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.cfg.norm_eps) * w

        def rope(self, x: Any, cos: Any, sin: Any) -> Any:
            # [n, n_h, head_dim], cos/sin [n, 1, rope_dim / 2] -> [n, n_h, head_dim]
            cfg = self.cfg
            half = cfg.rope_dim // 2
            rot, rest = x[..., : 2 * half], x[..., 2 * half :]
            if cfg.rope_mode == ROPE_NEOX:  # rotate (i, i + half)
                a, b = rot[..., :half], rot[..., half:]
                y = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
            else:  # rotate adjacent pairs (2i, 2i + 1)
                pairs = rot.reshape(*rot.shape[:-1], half, 2)
                a, b = pairs[..., 0], pairs[..., 1]
                y = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(rot.shape)
            return y if rest.shape[-1] == 0 else torch.cat([y, rest], dim=-1)

        def forward(self, tokens: Any, input_pos: Any, k_cache: Any, v_cache: Any) -> Any:
            # tokens [1, n] int32, input_pos [n] int32 (-1: padding),
            # k_cache/v_cache [n_layers, n_ctx, kv_dim] -> logits [1, n, vocab_size],
            # k_new/v_new [n_layers, n, kv_dim] (this call's K and V rows, to go in the cache)
            cfg = self.cfg
            n = tokens.shape[1]
            hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
            ids = tokens[0].long()
            if self.embd_q is not None:
                x = self.embd_q[ids].float() * self.embd_scale[ids]  # [n, dim]
            else:
                x = self.embd[ids]  # [n, dim]
            pos = torch.clamp(input_pos, min=0).long()
            cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]  # [n, 1, half]
            onehot = (input_pos[:, None] == self.slots[None, :]).float()  # [n, n_ctx]: where to write
            keep = 1.0 - onehot.sum(0)[:, None]  # [n_ctx, 1]: slots not written now
            mask = torch.where(self.slots[None, :] <= input_pos[:, None], 0.0, MASK_VALUE)  # [n, n_ctx]
            new_k, new_v = [], []
            for i, blk in enumerate(self.layers):
                xn = self.rms_norm(x, blk.attn_norm_weight)
                proj = {}
                for name in ("q", "k", "v"):
                    y = xn @ getattr(blk, f"attn_{name}_weight").t()
                    bias = getattr(blk, f"attn_{name}_bias", None)
                    proj[name] = y if bias is None else y + bias
                q = self.rope(proj["q"].reshape(n, nh, hd), cos, sin)
                k = self.rope(proj["k"].reshape(n, nkv, hd), cos, sin).reshape(n, nkv * hd)
                kc = k_cache[i] * keep + onehot.t() @ k  # [n_ctx, kv_dim]
                vc = v_cache[i] * keep + onehot.t() @ proj["v"]
                new_k.append(k)  # only this call's rows leave the graph: the runtime owns the cache
                new_v.append(proj["v"])
                # GQA as batched matmuls over kv heads: head h reads kv head h // group, so the
                # query heads of one kv head are stacked as rows. (Repeating K/V per head with
                # repeat_interleave + einsum lowers to BROADCAST_TO/TRANSPOSE chains ~15x slower.)
                group, ctx = nh // nkv, self.n_ctx
                qg = q.reshape(n, nkv, group, hd).permute(1, 2, 0, 3).reshape(nkv, group * n, hd)
                kt = kc.reshape(ctx, nkv, hd).permute(1, 2, 0)  # [nkv, hd, n_ctx]
                scores = torch.bmm(qg, kt).reshape(nkv, group, n, ctx) / float(np.sqrt(hd)) + mask
                probs = torch.softmax(scores, dim=-1).reshape(nkv, group * n, ctx)
                vt = vc.reshape(ctx, nkv, hd).permute(1, 0, 2)  # [nkv, n_ctx, hd]
                att = torch.bmm(probs, vt).reshape(nkv, group, n, hd).permute(2, 0, 1, 3).reshape(n, nh * hd)
                x = x + att @ blk.attn_output_weight.t()
                xn = self.rms_norm(x, blk.ffn_norm_weight)
                gate = xn @ blk.ffn_gate_weight.t()
                up = xn @ blk.ffn_up_weight.t()
                x = x + (torch.nn.functional.silu(gate) * up) @ blk.ffn_down_weight.t()
            out = self.embd if self.out is None else self.out
            logits = self.rms_norm(x, self.out_norm) @ out.t()
            return {"logits": logits[None], "k_new": torch.stack(new_k), "v_new": torch.stack(new_v)}

    return LlamaForTFLite


def LlamaForTFLite(cfg: ModelConfig, w: dict[str, np.ndarray], n_ctx: int,
                   int8_embedding: bool = False) -> Any:
    """The torch module (eval mode) of a model's forward with an n_ctx-position KV cache."""
    return _module_class()(cfg, w, n_ctx, int8_embedding).eval()


def sample_inputs(cfg: ModelConfig, n_ctx: int, n: int) -> dict[str, Any]:
    """Tracing inputs of a signature with n tokens, by name (the signature's input names)."""
    torch = _torch()
    cache = torch.zeros(cfg.n_layers, n_ctx, cfg.kv_dim, dtype=torch.float32)
    return {"tokens": torch.zeros(1, n, dtype=torch.int32),
            "input_pos": torch.arange(n, dtype=torch.int32), "k_cache": cache,
            "v_cache": cache.clone()}


def _signature_shapes(cfg: ModelConfig, n_ctx: int, n: int) -> dict[str, dict[str, list[Any]]]:
    cache = [[cfg.n_layers, n_ctx, cfg.kv_dim], "float32"]
    return {"inputs": {"tokens": [[1, n], "int32"], "input_pos": [[n], "int32"],
                       "k_cache": cache, "v_cache": cache},
            "outputs": {"logits": [[1, n, cfg.vocab_size], "float32"],
                        "k_new": [[cfg.n_layers, n, cfg.kv_dim], "float32"],
                        "v_new": [[cfg.n_layers, n, cfg.kv_dim], "float32"]}}


def export_tflite(gguf: str | os.PathLike[str], out: str | os.PathLike[str], *,
                  quantize: str | None = "int8", n_ctx: int | None = None,
                  prefill_len: int = DEFAULT_PREFILL) -> TFLiteExport:
    """Export a GGUF model to a .tflite file with prefill and decode signatures.

    Args:
        gguf: the model (any tensor type edgellm reads; quantised weights are dequantised).
        out: the .tflite file to write (atomically).
        quantize: "int8", "int8-dynamic" or None (f32 weights); see the module docstring.
        n_ctx: KV cache positions (default: the trained length, at most 2048).
        prefill_len: tokens per prefill call.

    Returns:
        What was written, with its signatures' shapes.

    Raises:
        InvalidArgumentError: an unknown quantize mode, a bad n_ctx or prefill_len.
        MissingToolError: torch, litert-torch or ai-edge-quantizer is not installed.
    """
    if quantize not in QUANT_MODES:
        raise InvalidArgumentError(f"quantize must be 'int8', 'int8-dynamic' or None, got {quantize!r}")
    cfg, w = load_weights(gguf)
    ctx = min(cfg.seq_len, 2048) if n_ctx is None else int(n_ctx)
    if not 1 <= ctx <= cfg.seq_len:
        raise InvalidArgumentError(f"n_ctx must be in [1, {cfg.seq_len}], got {ctx}")
    if not 1 <= prefill_len <= ctx:
        raise InvalidArgumentError(f"prefill_len must be in [1, {ctx}], got {prefill_len}")
    try:
        import litert_torch
    except ImportError:
        raise MissingToolError("exporting to .tflite needs litert-torch: pip install "
                               "'edgellm[tflite]' (see docs/tflite.md)") from None
    torch = _torch()
    module = LlamaForTFLite(cfg, w, ctx, int8_embedding=quantize is not None)
    w.clear()
    # litert-torch reports progress on stdout (rich); stdout belongs to the CLI's result.
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        edge = (litert_torch.signature("prefill", module, sample_kwargs=sample_inputs(cfg, ctx, prefill_len))
                .signature("decode", module, sample_kwargs=sample_inputs(cfg, ctx, 1)).convert())
        flat = bytes(edge.model_content())
        if quantize is not None:
            flat = quantize_tflite(flat, quantize)
    dest = Path(out)
    atomic_write(dest, flat)  # temp file, fsync, rename, fsync of the folder
    dest.chmod(0o644)
    sigs = {"prefill": _signature_shapes(cfg, ctx, prefill_len), "decode": _signature_shapes(cfg, ctx, 1)}
    return TFLiteExport(dest, quantize, ctx, prefill_len, sigs)


def export_for_recipe(gguf: str | os.PathLike[str], folder: str | os.PathLike[str],
                      recipe: str) -> TFLiteExport:
    """Export a bundle's model.gguf to folder/model.tflite in the mode its recipe maps to.

    Raises:
        UnsupportedError: a recipe with no TFLite counterpart (q4_0, q4_0_mixed).
    """
    if recipe not in RECIPE_MODES:
        raise UnsupportedError(f"recipe {recipe!r} has no TFLite export; use one of "
                               f"{', '.join(RECIPE_MODES)}")
    return export_tflite(gguf, Path(folder) / TFLITE_NAME, quantize=RECIPE_MODES[recipe])


def quantize_tflite(flat: bytes, mode: str) -> bytes:
    """An f32 .tflite model with int8 per-channel weights ("int8" or "int8-dynamic")."""
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError:
        raise MissingToolError("int8 export needs ai-edge-quantizer: pip install "
                               "'edgellm[tflite]' (see docs/tflite.md)") from None
    if mode not in ("int8", "int8-dynamic"):
        raise InvalidArgumentError(f"mode must be 'int8' or 'int8-dynamic', got {mode!r}")
    qt = quantizer.Quantizer(bytearray(flat))
    qt.load_quantization_recipe(recipe.weight_only_wi8_afp32() if mode == "int8"
                                else recipe.dynamic_wi8_afp32())
    result = qt.quantize(enable_progress_report=False)
    if result.quantized_model is None:  # pragma: no cover - the quantizer raises first
        raise InvalidArgumentError("ai-edge-quantizer returned no model")
    return bytes(result.quantized_model)
