# SPDX-License-Identifier: MIT
"""NumPy reference forward of the llama family: the readable oracle the C core must match.

Everything is float64 so it sits closer to exact arithmetic than either C (f32) or torch (f32);
blocks are named after the paper's (rms_norm, rope, attention, ffn, transformer_block).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .config import ROPE_NEOX, ModelConfig


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:  # [n, dim] -> [n, dim]
    y: np.ndarray = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w
    return y


def rope(x: np.ndarray, pos: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    # [n, n_h, head_dim], [n] -> [n, n_h, head_dim]
    half = cfg.rope_dim // 2
    inv = cfg.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / cfg.rope_dim)  # [half]
    ang = (pos.astype(np.float64) / cfg.rope_scale)[:, None] * inv[None, :]  # [n, half]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]  # [n, 1, half]
    out = x.copy()
    if cfg.rope_mode == ROPE_NEOX:  # rotate (i, i + half)
        a, b = x[..., :half], x[..., half : 2 * half]
        out[..., :half] = a * cos - b * sin
        out[..., half : 2 * half] = a * sin + b * cos
    else:  # rotate adjacent pairs (2i, 2i + 1)
        a, b = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
        out[..., 0 : 2 * half : 2] = a * cos - b * sin
        out[..., 1 : 2 * half : 2] = a * sin + b * cos
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    # q: [n, n_heads, hd], k/v: [n, n_kv_heads, hd] (all positions so far) -> [n, n_heads * hd]
    n = q.shape[0]
    group = cfg.n_heads // cfg.n_kv_heads
    k = np.repeat(k, group, axis=1)  # [n, n_heads, hd]: head h reads kv head h // group
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(cfg.head_dim)  # [n_heads, n, n]
    scores = scores + np.triu(np.full((n, n), -np.inf), 1)  # causal mask
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
    out: np.ndarray = np.einsum("hqk,khd->qhd", scores, v).reshape(n, -1)
    return out


def ffn(x: np.ndarray, w: Mapping[str, np.ndarray], i: int) -> np.ndarray:  # [n, dim] -> [n, dim]
    gate = x @ w[f"blk.{i}.ffn_gate.weight"].T
    up = x @ w[f"blk.{i}.ffn_up.weight"].T
    y: np.ndarray = (gate / (1.0 + np.exp(-gate)) * up) @ w[f"blk.{i}.ffn_down.weight"].T
    return y


def transformer_block(
    x: np.ndarray, w: Mapping[str, np.ndarray], i: int, cfg: ModelConfig
) -> np.ndarray:  # [n, dim] -> [n, dim]
    n = x.shape[0]
    pos = np.arange(n)
    xn = rms_norm(x, w[f"blk.{i}.attn_norm.weight"], cfg.norm_eps)
    proj: dict[str, np.ndarray] = {}
    for name in ("q", "k", "v"):
        y = xn @ w[f"blk.{i}.attn_{name}.weight"].T
        bias = w.get(f"blk.{i}.attn_{name}.bias")
        proj[name] = y if bias is None else y + bias
    q = rope(proj["q"].reshape(n, cfg.n_heads, cfg.head_dim), pos, cfg)
    k = rope(proj["k"].reshape(n, cfg.n_kv_heads, cfg.head_dim), pos, cfg)
    v = proj["v"].reshape(n, cfg.n_kv_heads, cfg.head_dim)
    x = x + attention(q, k, v, cfg) @ w[f"blk.{i}.attn_output.weight"].T
    out: np.ndarray = x + ffn(rms_norm(x, w[f"blk.{i}.ffn_norm.weight"], cfg.norm_eps), w, i)
    return out


def forward(tokens: list[int], w: Mapping[str, np.ndarray], cfg: ModelConfig) -> np.ndarray:
    """Logits for every position of one sequence: [n] -> [n, vocab_size].

    Args:
        tokens: token ids, starting at position 0.
        w: GGUF tensor name -> dequantised float64 array in numpy order ([rows, cols]).
        cfg: the model's config.
    """
    x = w["token_embd.weight"][np.asarray(tokens)]  # [n, dim]
    for i in range(cfg.n_layers):
        x = transformer_block(x, w, i, cfg)
    out = w.get("output.weight", w["token_embd.weight"])  # tied when absent
    logits: np.ndarray = rms_norm(x, w["output_norm.weight"], cfg.norm_eps) @ out.T
    return logits
