# SPDX-License-Identifier: MIT
"""Named quantisation recipes (which ggml type each tensor gets) and the quality-table generator.

A recipe is a function (GGUF tensor name, numpy shape) -> GGMLType, passed to
``edgellm.formats.convert.convert(recipe=...)``. The named recipes:

- ``f32``, ``f16``, ``q8_0``, ``q4_0``: every matrix in that type (quantised types fall back
  to F16 for rows that are not a multiple of 32); 1-D tensors (norms, biases) stay F32.
- ``q4_0_mixed``: the embedding and output matrices at Q8_0 (F16 where rows are not a
  multiple of 32), the blocks' matrices at Q4_0 (same fallback), norms F32.
  ``general.file_type`` is 2, llama.cpp's "mostly Q4_0". docs/quantization.md has the
  measurements behind it.

Usage:

    from edgellm.formats.convert import convert
    r = get_recipe("q4_0_mixed")
    convert("stories260K.bin", "s.gguf", type=r.base_type, recipe=r)
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import InvalidArgumentError
from ..formats.convert import Recipe, convert, tensor_type
from ..formats.quant import F16, F32, Q4_0, Q8_0, GGMLType, ggml_nbytes

_QUANTISED = (Q8_0, Q4_0)
_GLOBAL_MATRICES = ("token_embd.weight", "output.weight")


def _fit(t: GGMLType, shape: tuple[int, ...]) -> GGMLType:
    """t, or F16 when t is a 32-block type and the rows are not a multiple of 32."""
    if t in _QUANTISED and shape[-1] % 32:
        return F16
    return t


@dataclass(frozen=True)
class QuantRecipe:
    """A named rule giving each tensor its ggml type; call it as convert()'s ``recipe``.

    - ``r = get_recipe("q4_0_mixed")``; ``r("blk.0.attn_q.weight", (64, 64))`` -> Q4_0.
    - ``convert(src, out, type=r.base_type, recipe=r)``: base_type sets general.file_type.
    - ``r.weights_bytes(tensors)`` sizes a model in this recipe without converting it.

    .. versionadded:: 0.1
    """

    name: str
    base_type: str  # convert()'s type: decides general.file_type
    description: str
    rule: Recipe  # (GGUF tensor name, numpy shape) -> ggml type

    def __call__(self, name: str, shape: tuple[int, ...]) -> GGMLType:
        return self.rule(name, tuple(int(d) for d in shape))

    def tensor_types(self, tensors: Iterable[tuple[str, tuple[int, ...]]]) -> dict[str, GGMLType]:
        """name -> type for (name, numpy shape) pairs."""
        return {name: self(name, shape) for name, shape in tensors}

    def weights_bytes(self, tensors: Iterable[tuple[str, tuple[int, ...]]]) -> int:
        """Tensor bytes of a model in this recipe (the GGUF data section, without padding)."""
        return sum(ggml_nbytes(self(name, shape), tuple(shape)[::-1]) for name, shape in tensors)


def _uniform(target: GGMLType) -> Recipe:
    def rule(name: str, shape: tuple[int, ...]) -> GGMLType:
        return tensor_type(name, shape, target)

    return rule


def _mixed(name: str, shape: tuple[int, ...]) -> GGMLType:
    if len(shape) < 2:
        return F32  # norms and biases
    if name in _GLOBAL_MATRICES:
        return _fit(Q8_0, shape)  # the embedding (and a tied output) is the most sensitive matrix
    return _fit(Q4_0, shape)


RECIPES: dict[str, QuantRecipe] = {
    "f32": QuantRecipe("f32", "f32", "every matrix F32 (the unquantised reference)",
                       _uniform(F32)),
    "f16": QuantRecipe("f16", "f16", "every matrix F16", _uniform(F16)),
    "q8_0": QuantRecipe("q8_0", "q8_0", "every matrix Q8_0 (F16 for rows not a multiple of 32)",
                        _uniform(Q8_0)),
    "q4_0": QuantRecipe("q4_0", "q4_0", "every matrix Q4_0 (F16 for rows not a multiple of 32)",
                        _uniform(Q4_0)),
    "q4_0_mixed": QuantRecipe(
        "q4_0_mixed", "q4_0",
        "blocks' matrices Q4_0; token_embd and output Q8_0 (F16 for rows not a multiple of 32)",
        _mixed),
}
# Highest quality first; what `--type auto` tries in turn (f32 only when asked for by name).
AUTO_ORDER = ("f16", "q8_0", "q4_0_mixed", "q4_0")


def get_recipe(name: str) -> QuantRecipe:
    """The named recipe.

    Raises:
        InvalidArgumentError: an unknown name (the message lists the known ones).
    """
    try:
        return RECIPES[name]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown quant recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


def _table_row(name: str, path: Path, text: str, max_tokens: int | None,
               window: int | None, stride: int | None) -> dict[str, object]:
    from ..formats.gguf import read_gguf
    from ..runtime.model import Model
    from .evaluate import perplexity

    with read_gguf(path) as gf:
        counts: dict[str, int] = {}
        for t in gf.tensors.values():
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
        wbytes = sum(t.nbytes for t in gf.tensors.values())
    with Model(path, n_threads=1) as m:
        r = perplexity(m, text, max_tokens=max_tokens, window=window, stride=stride)
    return {"recipe": name, "ppl": r.ppl, "nll": r.nll, "n_scored": r.n_scored,
            "window": r.window, "stride": r.stride, "protocol": r.protocol,
            "weights_bytes": wbytes, "file_bytes": path.stat().st_size, "tensor_types": counts}


def quality_table(src: str | Path, text: str, recipes: Sequence[str] = ("f32", "q8_0", "q4_0",
                                                                     "q4_0_mixed"),
                  *, max_tokens: int | None = 2000, window: int | None = None,
                  stride: int | None = None,
                  log: IO[str] | None = sys.stderr) -> list[dict[str, object]]:
    """Perplexity of a source model converted with each recipe (one row per recipe).

    Args:
        src: a llama2.c checkpoint, HF folder or GGUF (anything convert() takes).
        text: the held-out text.
        recipes: recipe names, in row order.
        max_tokens, window, stride: passed to perplexity().
        log: a progress line per recipe goes here (None for silence).

    Returns:
        Rows with recipe, ppl, nll, n_scored, window, stride, protocol, weights_bytes,
        file_bytes, tensor_types (type name -> count).
    """
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgellm-qt-") as tmp:
        for name in recipes:
            recipe = get_recipe(name)
            if log is not None:
                log.write(f"quality: {name} ...\n")
                log.flush()
            path = Path(tmp) / f"{name}.gguf"
            convert(src, path, type=recipe.base_type, recipe=recipe, log=None)
            rows.append(_table_row(name, path, text, max_tokens, window, stride))
    return rows


def markdown_table(rows: Sequence[dict[str, object]], reference: str = "f32") -> str:
    """The rows as a Markdown table, with each perplexity's change against the reference row."""
    ref = next((r for r in rows if r["recipe"] == reference), rows[0])
    ref_ppl = float(str(ref["ppl"]))
    lines = ["| recipe | perplexity | vs " + str(ref["recipe"]) + " | weights (bytes) | "
             "tensor types |", "|---|---:|---:|---:|---|"]
    for r in rows:
        ppl = float(str(r["ppl"]))
        types = r["tensor_types"]
        tt = ", ".join(f"{k} x{v}" for k, v in sorted(types.items())) if isinstance(
            types, dict) else str(types)
        lines.append(f"| {r['recipe']} | {ppl:.4f} | {100 * (ppl / ref_ppl - 1):+.2f}% | "
                     f"{r['weights_bytes']:,} | {tt} |")
    return "\n".join(lines)
