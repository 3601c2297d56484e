# SPDX-License-Identifier: MIT
"""Release test fixtures: stories260K bundles (v1 and a fine-tuned v2) and demo-leaf bundles
(DEMO_LEAF_Q4 and DEMO_LEAF_Q8: edgellm/demo's en/medical/cardiology for rpi5, two recipes).

Usage (tests/ is on sys.path)::

    from support.releases import DEMO_LEAF_Q8, restamp, stories_bundles
    b1, b2 = stories_bundles(tmp_path, node="stories", board="rpi5")   # Bundle, Bundle
    leaf2 = restamp(DEMO_LEAF_Q8, tmp_path / "leaf-v2", version=2)     # a copy as version 2
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from edgellm.formats.bundle import Bundle, read_manifest, write_manifest
from edgellm.formats.convert import convert

from .bundles import make_bundle, tweak_gguf

__all__ = ["DEMO_BUNDLES", "DEMO_LEAF_Q4", "DEMO_LEAF_Q8", "STORIES", "restamp",
           "stories_bundles"]

STORIES = Path(__file__).resolve().parent.parent / "data" / "stories260K"
DEMO_BUNDLES = Path(__file__).resolve().parents[2] / "edgellm" / "demo" / "bundles"
DEMO_LEAF_Q4 = DEMO_BUNDLES / "en-medical-cardiology-rpi5-q4_0_mixed"
DEMO_LEAF_Q8 = DEMO_BUNDLES / "en-medical-cardiology-rpi5-q8_0"


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
        dst = tweak_gguf(m1, root / f"m{v}.gguf", ("blk.0.attn_q.weight", "blk.1.ffn_up.weight"),
                         rng)
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
