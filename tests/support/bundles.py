# SPDX-License-Identifier: MIT
"""Bundle test fixtures: wrap a GGUF into a bundle folder, edit a GGUF's tensor bytes, and
write a small LoRA adapter for a model.

Usage (tests/ is on sys.path)::

    from support.bundles import make_bundle, rewrite_gguf, tweak_gguf, write_bundle_manifest
    b = make_bundle(tmp / "b1", m1, node="en", version=1)    # copies m1 in, writes bundle.json
    b = write_bundle_manifest(folder, folder / "model.gguf", node="en", version=2)  # in place
    m2 = tweak_gguf(m1, tmp / "m2.gguf", ("blk.0.attn_q.weight",), np.random.default_rng(1))
    m3 = rewrite_gguf(m1, tmp / "m3.gguf", lambda name, raw: None)  # a byte-for-byte copy
    lora = small_adapter(m1, tmp / "lora.gguf", np.random.default_rng(0))
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Callable

import numpy as np

from edgellm.formats.adapter import write_adapter
from edgellm.formats.bundle import Bundle, ModelSummary, SourceInfo, write_manifest
from edgellm.formats.gguf import RawTensor, read_gguf, write_gguf
from edgellm.runtime.config import ModelConfig

__all__ = ["make_bundle", "rewrite_gguf", "small_adapter", "summarize_gguf", "tweak_gguf",
           "write_bundle_manifest"]


def summarize_gguf(path: Path) -> tuple[ModelSummary, int]:
    """A GGUF's ModelSummary (its config and parameter count) and its tensor bytes."""
    with read_gguf(path) as f:
        cfg = ModelConfig.from_metadata(f.metadata)
        nbytes = sum(t.nbytes for t in f.tensors.values())
        n = sum(t.n_elements for t in f.tensors.values())
    return ModelSummary.from_config(cfg, n), nbytes


def write_bundle_manifest(folder: Path, gguf: Path, *, node: str, version: int,
                          board: str = "rpi5", recipe: str = "q8_0",
                          summary_from: Path | None = None) -> Bundle:
    """bundle.json for folder, which holds model.gguf already, built from the source gguf
    (the config is read from summary_from, default gguf: give it for a model that won't parse)."""
    summary, nbytes = summarize_gguf(summary_from or gguf)
    return write_manifest(folder, board=board, isa_features=(), recipe=recipe,
                          source=SourceInfo("gguf", gguf.name, str(gguf), ()), node=node,
                          version=version, config=summary, weights_bytes=nbytes)


def make_bundle(folder: Path, gguf: Path, *, node: str, version: int, board: str = "rpi5",
                recipe: str = "q8_0", summary_from: Path | None = None) -> Bundle:
    """A new bundle folder around a copy of gguf, as a hub build would make it."""
    folder.mkdir(parents=True)
    shutil.copy(gguf, folder / "model.gguf")
    return write_bundle_manifest(folder, gguf, node=node, version=version, board=board,
                                 recipe=recipe, summary_from=summary_from)


def rewrite_gguf(src: Path, dst: Path,
                 change: Callable[[str, np.ndarray], np.ndarray | None]) -> Path:
    """Copy a GGUF, replacing the raw bytes of tensors for which change() returns an array
    (change gets each tensor's name and a writable uint8 copy of its bytes, in file order)."""
    with read_gguf(src) as f:
        tensors = []
        for t in f.tensors.values():
            raw = np.frombuffer(f.tensor_bytes(t.name), np.uint8)
            new = change(t.name, raw.copy())
            data = bytes(raw) if new is None else new.tobytes()
            tensors.append((t.name, RawTensor(data, t.shape), t.type))
        write_gguf(dst, dict(f.fields), tensors)
    return dst


def tweak_gguf(src: Path, dst: Path, names: Iterable[str], rng: np.random.Generator) -> Path:
    """A fine-tuned-looking copy of src: the low bit of 2 % of the bytes of each named tensor
    flipped (drawn from rng, tensors in file order): a small delta, still a working model."""
    chosen = frozenset(names)

    def flip(name: str, raw: np.ndarray) -> np.ndarray | None:
        if name not in chosen:
            return None
        raw[rng.integers(0, raw.size, raw.size // 50)] ^= 1
        return raw

    return rewrite_gguf(src, dst, flip)


def small_adapter(base: Path, dst: Path, rng: np.random.Generator) -> Path:
    """A LoRA adapter GGUF for base: rank 4 on blk.0.attn_q.weight, A and B drawn from rng
    (standard normal times 0.01, A first), alpha 8."""
    with read_gguf(base) as f:
        meta = f.metadata
    dim = int(meta["llama.embedding_length"])
    a = rng.standard_normal((4, dim)).astype(np.float32) * 0.01
    b = rng.standard_normal((dim, 4)).astype(np.float32) * 0.01
    return write_adapter(dst, meta, {"blk.0.attn_q.weight": (a, b)}, 8.0)
