# SPDX-License-Identifier: MIT
"""Release test fixtures: stories260K bundles (v1 and a fine-tuned v2) and demo-leaf bundles.

Usage (tests/ is on sys.path)::

    from support.releases import stories_bundles, restamp
    b1, b2 = stories_bundles(tmp_path, node="stories", board="rpi5")   # Bundle, Bundle
    leaf2 = restamp(DEMO_LEAF_Q8, tmp_path / "leaf-v2", version=2)     # a copy as version 2
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from edgellm.formats.bundle import Bundle, ModelSummary, SourceInfo, read_manifest, write_manifest
from edgellm.formats.convert import convert
from edgellm.formats.gguf import RawTensor, read_gguf, write_gguf
from edgellm.runtime.config import ModelConfig

__all__ = ["DEMO_BUNDLES", "STORIES", "make_bundle", "restamp", "stories_bundles"]

STORIES = Path(__file__).resolve().parent.parent / "data" / "stories260K"
DEMO_BUNDLES = Path(__file__).resolve().parents[2] / "edgellm" / "demo" / "bundles"


def _summary(path: Path) -> tuple[ModelSummary, int]:
    with read_gguf(path) as f:
        cfg = ModelConfig.from_metadata(f.metadata)
        nbytes = sum(t.nbytes for t in f.tensors.values())
        n = sum(t.n_elements for t in f.tensors.values())
    return ModelSummary(arch=cfg.arch, dim=cfg.dim, hidden_dim=cfg.hidden_dim,
                        n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                        head_dim=cfg.head_dim, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
                        n_params=n), nbytes


def make_bundle(folder: Path, gguf: Path, *, node: str, version: int,
                board: str = "rpi5") -> Bundle:
    """A bundle folder around gguf, as a hub build would make it."""
    folder.mkdir(parents=True)
    shutil.copy(gguf, folder / "model.gguf")
    summary, nbytes = _summary(gguf)
    return write_manifest(folder, board=board, isa_features=(), recipe="q8_0",
                          source=SourceInfo("gguf", gguf.name, str(gguf), ()), node=node,
                          version=version, config=summary, weights_bytes=nbytes)


def stories_bundles(root: Path, *, node: str = "stories", board: str = "rpi5",
                    versions: int = 2) -> list[Bundle]:
    """stories260K Q8_0 as version 1, then versions with two tensors 'fine-tuned' (low bits
    of 2 % of their bytes flipped: a small delta, still a working model)."""
    root.mkdir(parents=True, exist_ok=True)
    m1 = convert(STORIES / "stories260K.bin", root / "m1.gguf", type="q8_0",
                 tokenizer=STORIES / "tok512.bin", log=None)
    out = [make_bundle(root / "b1", m1, node=node, version=1, board=board)]
    rng = np.random.default_rng(0)
    for v in range(2, versions + 1):
        dst = root / f"m{v}.gguf"
        with read_gguf(m1) as f:
            tensors = []
            for t in f.tensors.values():
                raw = np.frombuffer(f.tensor_bytes(t.name), np.uint8).copy()
                if t.name in ("blk.0.attn_q.weight", "blk.1.ffn_up.weight"):
                    idx = rng.integers(0, raw.size, raw.size // 50)
                    raw[idx] ^= 1
                tensors.append((t.name, RawTensor(raw.tobytes(), t.shape), t.type))
            write_gguf(dst, dict(f.fields), tensors)
        out.append(make_bundle(root / f"b{v}", dst, node=node, version=v, board=board))
    return out


def restamp(src: Path, dst: Path, *, version: int) -> Bundle:
    """A copy of the bundle folder src with its manifest saying version (same model bytes)."""
    b = read_manifest(src)
    dst.mkdir(parents=True)
    shutil.copy(src / "model.gguf", dst / "model.gguf")
    return write_manifest(dst, board=b.board, isa_features=b.isa_features, recipe=b.recipe,
                          source=b.source, node=b.node, version=version, config=b.config,
                          weights_bytes=b.weights_bytes,
                          lineage=dataclasses.replace(b.lineage), scores=b.scores)
