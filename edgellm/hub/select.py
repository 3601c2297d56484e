# SPDX-License-Identifier: MIT
"""Choosing a model for a device: the deepest node on the need's path whose build fits the board.

- ``sel = select(load_board("rpi5"), "en/medical/cardiology", list_bundles("bundles"))``
- ``sel.choice`` is the Bundle to install (None when nothing fits); ``sel.fallback`` says when it
  belongs to an ancestor of the need; ``sel.candidates`` holds every build considered, with its
  memory and speed estimates and the reasons it was rejected.
- ``print(sel.explain())`` gives the choice and a table of the rejected builds with numbers.
- ``sel.require()`` returns the choice or raises SelectionError with the smallest shortfall;
  ``check_runs_on(bundle, board)`` refuses a build the board's CPU cannot run (flash calls it
  before any transfer).

The rules (docs/selection.md):

1. Candidates are the bundles of the need's node and of its ancestors ("en/medical/cardiology",
   "en/medical", "en", "master").
2. A build runs on a board when the board has every ISA feature the build requires (so an
   rpi5 build that needs dotprod is refused on an rpi4, while a build needing only neon runs on
   both), the board's backend is the build's (native GGUF, or a tflite bundle), and the board
   allows the build's quant recipe. Builds made for another board are offered when they run.
3. It fits when the context asked for is within the model's seq_len and the estimated memory
   at that context (weights + full KV cache + scratch + runtime) is within the board's RAM
   budget; it is fast enough when its estimated (or measured) decode speed meets the floor.
4. The deepest node with a passing build wins; within a node, the best recipe (f32 > f16 >
   q8_0 > q4_0_mixed > q4_0), then the newest version, then a build made for this board.

.. versionadded:: 0.1
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import EdgeLLMError, InvalidArgumentError, IsaError
from . import estimate
from .estimate import MemoryEstimate

ROOT_NODE = "master"  # the tree's root: every path ends there
NATIVE_BACKEND = "native"  # bundles hold GGUF files for edgellm's own runtime


class SelectionError(EdgeLLMError, LookupError):
    """No build of the need's node or its ancestors fits the board."""


def node_path(need: str) -> list[str]:
    """The need and its ancestors, deepest first: "en/medical" -> ["en/medical", "en", "master"].

    Raises:
        InvalidArgumentError: an empty path or an empty segment.
    """
    if not isinstance(need, str) or not need.strip("/"):
        raise InvalidArgumentError("a need is a node path like 'en/medical/cardiology'")
    segs = need.strip("/").split("/")
    if any(not s for s in segs):
        raise InvalidArgumentError(f"bad node path {need!r}: empty segment")
    if segs[0] == ROOT_NODE:
        segs = segs[1:]
    out = ["/".join(segs[:i]) for i in range(len(segs), 0, -1)]
    return out + [ROOT_NODE]


def recipe_rank(recipe: str) -> int:
    """Position of a recipe in the quality order (0 = best); unknown recipes rank last."""
    try:
        return estimate.RECIPE_RANK.index(recipe)
    except ValueError:
        return len(estimate.RECIPE_RANK)


def fmt_bytes(n: float) -> str:
    """Bytes as people read them on a board's spec sheet: "612 MB", "3.2 GB" (powers of 10)."""
    if abs(n) >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.0f} MB"


def _label(b: Any) -> str:
    return f"{b.node} {b.recipe} v{b.version} ({b.board})"


def run_reasons(bundle: Any, board: Any, host_features: Iterable[str] | None = None) -> list[str]:
    """Why a build cannot run on a board at all (empty when it can): ISA, backend, recipe."""
    reasons = []
    backend = getattr(board, "backend", NATIVE_BACKEND)
    built = (getattr(bundle, "backend", None) or {}).get("name", NATIVE_BACKEND)  # tflite bundles
    if backend != built:
        reasons.append(f"{board.name} runs the {backend} backend; this build is "
                       f"{'GGUF' if built == NATIVE_BACKEND else built} for the {built} runtime")
    have = set(board.isa_features)
    missing = [f for f in bundle.isa_features if f not in have]
    if missing:
        reasons.append(f"built for {bundle.board}: requires {', '.join(missing)}, "
                       f"{board.name} lacks {'it' if len(missing) == 1 else 'them'}")
    if host_features is not None:
        host = set(host_features)
        lack = [f for f in bundle.isa_features if f not in host and f not in missing]
        if lack:
            reasons.append(f"requires {', '.join(lack)}, this CPU lacks "
                           f"{'it' if len(lack) == 1 else 'them'}")
    allowed = tuple(getattr(board, "quant_types", ()) or ())
    if allowed and bundle.recipe not in allowed:
        reasons.append(f"recipe {bundle.recipe} is not allowed on {board.name} "
                       f"(allowed: {', '.join(allowed)})")
    return reasons


def check_runs_on(bundle: Any, board: Any, host_features: Iterable[str] | None = None) -> None:
    """Refuse a build that the board (or the CPU reporting host_features) cannot run.

    Raises:
        IsaError: the board lacks an ISA feature the build requires, runs another backend,
            or does not allow the recipe; the message gives every reason.
    """
    reasons = run_reasons(bundle, board, host_features)
    if reasons:
        raise IsaError(f"{_label(bundle)} cannot run on {board.name}: " + "; ".join(reasons))


@dataclass
class Candidate:
    """One build considered for the need, with its estimates and why it was refused."""

    bundle: Any  # edgellm.formats.bundle.Bundle
    ok: bool
    reasons: list[str]
    memory: MemoryEstimate
    tokens_per_s: float
    speed_basis: str = ""
    memory_short: int = 0  # bytes over the RAM budget (0 when it fits)
    speed_short: float = 0.0  # tokens/s under the floor (0 when fast enough)
    runs: bool = True  # the board can run it at all (ISA, backend, recipe)


@dataclass
class Selection:
    """The outcome of select(): the choice, every candidate, and why."""

    board: Any
    need: str
    context: int
    min_tokens_per_s: float | None
    choice: Any  # Bundle | None
    candidates: list[Candidate] = field(default_factory=list)
    fallback: str | None = None
    shortfall: str | None = None  # when nothing fits: the smallest gap, in words
    path: list[str] = field(default_factory=list)

    @property
    def chosen(self) -> Candidate | None:
        """The chosen build's candidate entry."""
        for c in self.candidates:
            if c.bundle is self.choice:
                return c
        return None

    def require(self) -> Any:
        """The choice, or SelectionError with the smallest shortfall."""
        if self.choice is None:
            raise SelectionError(self.shortfall or f"no build for {self.need} fits {self.board.name}")
        return self.choice

    def explain(self) -> str:
        """The choice and a table of every other build considered, with reasons and numbers."""
        b = self.board
        floor = f", at least {self.min_tokens_per_s:g} tok/s" if self.min_tokens_per_s else ""
        lines = [f"need {self.need} on {b.name} (RAM budget {fmt_bytes(b.ram_budget_bytes)}), "
                 f"context {self.context}{floor}"]
        c = self.chosen
        if c is not None:
            m = c.memory
            lines.append(f"choice: {_label(c.bundle)}  {c.bundle.folder}")
            lines.append(f"  needs {fmt_bytes(m.total)} (weights {fmt_bytes(m.weights)}, KV cache "
                         f"{fmt_bytes(m.kv_cache)}, scratch {fmt_bytes(m.scratch)}, runtime "
                         f"{fmt_bytes(m.runtime_overhead)}); est. {c.tokens_per_s:.1f} tok/s "
                         f"({c.speed_basis})")
        else:
            lines.append(f"no choice: {self.shortfall}")
        if self.fallback:
            lines.append(self.fallback)
        others = [x for x in self.candidates if x is not c]
        if others:
            lines.append("other builds considered:")
            rows = [("build", "board", "memory", "tok/s", "verdict")]
            for x in others:
                verdict = "; ".join(x.reasons)
                if x.ok and c is not None:
                    verdict = ("passes; the choice ranks higher" if x.bundle.node == c.bundle.node
                               else f"passes; a deeper node ({c.bundle.node}) was chosen")
                rows.append((f"{x.bundle.node} {x.bundle.recipe} v{x.bundle.version}", x.bundle.board,
                             fmt_bytes(x.memory.total) if x.runs else "-",
                             f"{x.tokens_per_s:.1f}" if x.runs else "-", verdict))
            widths = [max(len(r[i]) for r in rows) for i in range(4)]
            for r in rows:
                lines.append("  " + "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
        elif not self.candidates:
            lines.append(f"no bundles for {', '.join(self.path)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (the CLI's --json)."""

        def cand(x: Candidate) -> dict[str, Any]:
            bd = x.bundle
            return {"node": bd.node, "recipe": bd.recipe, "version": bd.version, "board": bd.board,
                    "folder": str(bd.folder), "ok": x.ok, "reasons": x.reasons,
                    "memory": x.memory.as_dict(), "tokens_per_s": x.tokens_per_s,
                    "speed_basis": x.speed_basis, "memory_short": x.memory_short,
                    "speed_short": x.speed_short}

        c = self.chosen
        return {"need": self.need, "board": self.board.name, "context": self.context,
                "min_tokens_per_s": self.min_tokens_per_s,
                "ram_budget_bytes": self.board.ram_budget_bytes,
                "choice": cand(c) if c is not None else None, "fallback": self.fallback,
                "shortfall": self.shortfall, "path": self.path,
                "candidates": [cand(x) for x in self.candidates]}


def _kv_type(recipe: str) -> str:
    """The runtime's default KV type for a build: f32 for float models, f16 when quantised."""
    return "f32" if recipe in ("f32", "f16") else "f16"


def _assess(bundle: Any, board: Any, context: int, min_tps: float | None,
            host_features: Iterable[str] | None) -> Candidate:
    reasons = run_reasons(bundle, board, host_features)
    runs = not reasons
    facts = estimate.facts_from_bundle(bundle)
    cfg = facts.config
    ctx = context
    if context > cfg.seq_len:
        reasons.append(f"context {context} > the model's seq_len {cfg.seq_len}")
        ctx = cfg.seq_len  # estimates below are at the longest context it has
    kv = _kv_type(bundle.recipe)
    mem = estimate.memory_bytes(cfg, facts.weights_bytes, ctx, kv, n_threads=max(int(board.cores), 1),
                                n_merges=facts.n_merges)
    budget = int(board.ram_budget_bytes)
    short = max(mem.total - budget, 0)
    if short:
        reasons.append(f"needs {fmt_bytes(mem.total)}, board budget {fmt_bytes(budget)}")
    sp = estimate.decode_estimate(cfg, facts.decode_bytes, board, ctx, kv_type=kv,
                                  sha256=facts.sha256, rows_per_token=facts.decode_rows)
    speed_short = 0.0
    if min_tps is not None and sp.tokens_per_s < min_tps:
        speed_short = min_tps - sp.tokens_per_s
        reasons.append(f"est. {sp.tokens_per_s:.1f} tok/s < {min_tps:g} required")
    return Candidate(bundle, not reasons, reasons, mem, sp.tokens_per_s, sp.basis, short,
                     speed_short, runs)


def select(board: Any, need: str, bundles: Sequence[Any], *, context: int = 2048,
           min_tokens_per_s: float | None = None,
           host_features: Iterable[str] | None = None) -> Selection:
    """Choose the build to install for a need on a board.

    Args:
        board: the board profile (edgellm.boards.BoardProfile).
        need: a node path ("en/medical/cardiology").
        bundles: the builds available (edgellm.formats.bundle.list_bundles).
        context: the context length the device must hold (estimates use a full KV cache).
        min_tokens_per_s: the slowest acceptable decode speed, or None.
        host_features: ISA features of the actual CPU, when known (a device's report); a
            build must then run on it too.

    Returns:
        The Selection; ``.choice`` is None when nothing fits (``.shortfall`` says by how much).

    Raises:
        InvalidArgumentError: a bad need, context or speed floor.
    """
    path = node_path(need)
    if context < 1:
        raise InvalidArgumentError(f"context must be >= 1, got {context}")
    if min_tokens_per_s is not None and not min_tokens_per_s > 0:
        raise InvalidArgumentError(f"min_tokens_per_s must be > 0, got {min_tokens_per_s}")
    host = list(host_features) if host_features is not None else None
    depth = {n: i for i, n in enumerate(path)}
    on_path = [b for b in bundles if b.node in depth]
    # Deepest node first; then the order of preference within a node.
    on_path.sort(key=lambda b: (depth[b.node], recipe_rank(b.recipe), -int(b.version),
                                b.board != board.name, str(b.folder)))
    cands = [_assess(b, board, context, min_tokens_per_s, host) for b in on_path]
    sel = Selection(board, need, context, min_tokens_per_s, None, cands, path=path)
    chosen = next((c for c in cands if c.ok), None)
    if chosen is not None:
        sel.choice = chosen.bundle
        if chosen.bundle.node != path[0]:
            had = any(c.bundle.node == path[0] for c in cands)
            why = (f"no build of {path[0]} fits {board.name}" if had else f"no build for {path[0]}")
            sel.fallback = f"{why}; using its nearest ancestor {chosen.bundle.node}"
        return sel
    sel.shortfall = _shortfall(sel)
    return sel


def _shortfall(sel: Selection) -> str:
    """The smallest gap between a build and the board, in words."""
    where = f"{sel.need} or its ancestors" if len(sel.path) > 1 else sel.need
    if not sel.candidates:
        return f"no bundles for {where} ({', '.join(sel.path)})"
    runnable = [c for c in sel.candidates if c.runs]
    if not runnable:
        first = sel.candidates[0]
        return f"no build of {where} runs on {sel.board.name} (e.g. {_label(first.bundle)}: {first.reasons[0]})"
    fits_ctx = [c for c in runnable if not any(r.startswith("context ") for r in c.reasons)]
    if not fits_ctx:
        longest = max(runnable, key=lambda c: c.bundle.config.seq_len)
        return (f"no build of {where} holds context {sel.context}; closest: {_label(longest.bundle)} "
                f"with seq_len {longest.bundle.config.seq_len}")
    mem = [c for c in fits_ctx if c.memory_short > 0]
    in_ram = [c for c in fits_ctx if c.memory_short == 0]
    if in_ram:  # runs, holds the context, fits RAM: so it is too slow
        c = min(in_ram, key=lambda c: c.speed_short)
        return (f"closest: {_label(c.bundle)} fits in RAM but reaches est. {c.tokens_per_s:.1f} "
                f"tok/s, {c.speed_short:.1f} short of {sel.min_tokens_per_s:g}")
    c = min(mem, key=lambda c: c.memory_short)
    extra = f" (and est. {c.tokens_per_s:.1f} tok/s < {sel.min_tokens_per_s:g})" if c.speed_short else ""
    return (f"closest: {_label(c.bundle)} needs {fmt_bytes(c.memory_short)} more RAM "
            f"({fmt_bytes(c.memory.total)} at context {sel.context}, budget "
            f"{fmt_bytes(sel.board.ram_budget_bytes)}){extra}")
