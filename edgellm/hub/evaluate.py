# SPDX-License-Identifier: MIT
"""Perplexity of a model on a text under one fixed, documented protocol ("edgellm-ppl-v1").

The protocol (docs/evaluation.md says the same in prose):

1. Tokenise the whole text once, without BOS; keep the first ``max_tokens`` tokens if given.
2. Cut the tokens into windows of ``window`` text tokens (default ``min(n_ctx - 1, 512)``
   for a model that adds BOS, ``min(n_ctx, 512)`` otherwise); window k starts at token
   ``k * stride`` (default ``stride = window // 2``), and the last window is the first one
   that reaches the end of the text (it may be shorter).
3. Evaluate each window from an empty KV cache, with BOS prepended when the model's tokenizer
   adds one (``tokenizer.add_bos`` and a BOS id), so a window occupies ``window + 1`` positions.
4. Score every token exactly once, in the first window where it has the most left context:
   the first window scores all its tokens, each later window only the tokens past the end of
   the window before it (its last ``stride`` tokens, or fewer for a short last window).
   Without BOS a window's first token has no prediction, so it is scored only where an
   earlier window covers it; with ``stride == window`` and no BOS it is not scored at all.
5. NLL of a token = ``logsumexp(logits) - logits[token]`` in float64 from the logits of the
   position before it; perplexity = ``exp(mean NLL)`` over the scored tokens.

Usage:

    with edgellm.Model("model.gguf") as m:
        r = perplexity(m, text)             # PerplexityResult(ppl=..., n_scored=..., ...)
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    from ..runtime.model import Model

PROTOCOL = "edgellm-ppl-v1"
DEFAULT_MAX_WINDOW = 512  # the protocol's cap on the default window: the context most edge models run at
# Project Gutenberg texts wrap the book between these marker lines (header and licence outside).
_GUTENBERG_START = "*** START OF"
_GUTENBERG_END = "*** END OF"


@dataclass(frozen=True)
class Window:
    """One window of the protocol, in token indices of the whole text (BOS not counted)."""

    start: int  # first text token the window holds
    end: int  # one past the last text token it holds
    score_start: int  # the window scores tokens [score_start, end)


@dataclass(frozen=True)
class PerplexityResult:
    """What one perplexity run measured, with the protocol that makes it comparable.

    .. versionadded:: 0.1
    """

    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token, in nats
    n_scored: int  # tokens that got an NLL
    n_tokens: int  # text tokens evaluated (after max_tokens)
    n_windows: int
    window: int  # text tokens per window (BOS not counted)
    stride: int
    bos: bool  # whether each window started with BOS
    protocol: str  # PROTOCOL
    seconds: float  # wall time of the evaluation (not part of the result's identity)

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


def window_plan(n_tokens: int, window: int, stride: int, bos: bool) -> list[Window]:
    """The windows the protocol evaluates for a text of n_tokens tokens.

    Args:
        n_tokens: text tokens (BOS not counted), at least 1.
        window: text tokens per window, at least 1.
        stride: tokens between window starts, 1 <= stride <= window.
        bos: whether each window starts with BOS (then every token can be scored).

    Returns:
        The windows in order; their score ranges are disjoint and cover [0, n_tokens), less
        the tokens that have no prediction without BOS.

    Raises:
        InvalidArgumentError: out-of-range arguments.
    """
    if n_tokens < 1:
        raise InvalidArgumentError(f"n_tokens must be >= 1, got {n_tokens}")
    if window < 1:
        raise InvalidArgumentError(f"window must be >= 1, got {window}")
    if not 1 <= stride <= window:
        raise InvalidArgumentError(f"stride must be in [1, window={window}], got {stride}")
    plan: list[Window] = []
    scored_to = 0  # tokens [0, scored_to) already have an NLL (or never can)
    start = 0
    while True:
        end = min(start + window, n_tokens)
        # Without BOS the window's first token has no logits before it.
        first = max(scored_to, start if bos else start + 1)
        plan.append(Window(start, end, min(first, end)))
        scored_to = end
        if end == n_tokens:
            return plan
        start += stride


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:  # [n, vocab], [n] -> [n]
    """Negative log-likelihood of each target under its row of logits (stable, float64)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)  # subtract the max: exp never overflows
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1))
    picked = x[np.arange(len(targets)), np.asarray(targets, dtype=np.int64)]
    nll: np.ndarray = lse - picked
    return nll


def resolve_window(n_ctx: int, bos: bool, window: int | None, stride: int | None) -> tuple[int, int]:
    """The protocol's window and stride for a model context of n_ctx positions.

    Raises:
        InvalidArgumentError: window (plus BOS) larger than n_ctx, stride > window, values < 1.
    """
    n_bos = 1 if bos else 0
    if window is None:
        window = min(n_ctx - n_bos, DEFAULT_MAX_WINDOW)
    if window < 1:
        raise InvalidArgumentError(f"window must be >= 1, got {window}")
    if window + n_bos > n_ctx:
        need = f"{window} + 1 (BOS)" if bos else str(window)
        raise InvalidArgumentError(
            f"window of {need} positions does not fit the model context n_ctx={n_ctx}; "
            f"use --window {n_ctx - n_bos} or less")
    if stride is None:
        stride = max(window // 2, 1)
    if stride < 1:
        raise InvalidArgumentError(f"stride must be >= 1, got {stride}")
    if stride > window:
        raise InvalidArgumentError(
            f"stride {stride} is larger than the window {window}: tokens between windows "
            "would never be scored")
    return window, stride


def perplexity(model: Model | str | os.PathLike[str], text: str, *, window: int | None = None,
               stride: int | None = None, max_tokens: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity of model on text under the edgellm-ppl-v1 protocol (see the module doc).

    Args:
        model: an open Model, or a GGUF path (opened and closed here).
        text: the held-out text.
        window: text tokens per window (default min(n_ctx - 1, 512) with BOS, else
            min(n_ctx, 512)); with BOS, window + 1 must fit the model's n_ctx.
        stride: tokens between window starts (default window // 2); at most window.
        max_tokens: evaluate only the first max_tokens tokens of the text.
        progress: called as progress(windows_done, n_windows) after each window.

    Returns:
        The PerplexityResult.

    Raises:
        InvalidArgumentError: an empty text (or one with no scorable token), a window that
            does not fit n_ctx, stride > window, max_tokens < 1.

    .. versionadded:: 0.1
    """
    if isinstance(model, (str, os.PathLike)):
        from ..runtime.model import Model as _Model

        with _Model(Path(model)) as m:
            return perplexity(m, text, window=window, stride=stride, max_tokens=max_tokens,
                              progress=progress)
    t0 = time.perf_counter()
    tok = model.tokenizer
    bos_id = tok.bos_id
    bos = bool(tok.add_bos and bos_id is not None)
    win, strd = resolve_window(model.n_ctx, bos, window, stride)
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgumentError(f"max_tokens must be >= 1, got {max_tokens}")
    if not text:
        raise InvalidArgumentError("the text is empty: nothing to score")
    ids = model.tokenize(text, add_bos=False)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if not ids or (not bos and len(ids) < 2):
        raise InvalidArgumentError(
            f"the text gives {len(ids)} token(s): too few to score (need 1 with BOS, 2 without)")
    plan = window_plan(len(ids), win, strd, bos)
    tokens = np.asarray(ids, dtype=np.int64)
    total = 0.0
    n_scored = 0
    with model.session(n_ctx=win + (1 if bos else 0)) as s:
        for i, w in enumerate(plan):
            s.truncate(0)  # every window starts from an empty KV cache
            chunk = tokens[w.start : w.end]
            inputs = np.concatenate([[bos_id], chunk]) if bos else chunk
            logits = s.eval(inputs.tolist(), logits="all")  # [len(inputs), vocab_size]
            # Row r predicts inputs[r + 1]; with BOS that is chunk[r], without it chunk[r + 1].
            lo = w.score_start - w.start  # chunk index of the first scored token
            n = w.end - w.score_start
            if n > 0:
                rows = logits[lo : lo + n] if bos else logits[lo - 1 : lo - 1 + n]
                total += float(token_nll(rows, chunk[lo : lo + n]).sum())
                n_scored += n
            if progress is not None:
                progress(i + 1, len(plan))
    if n_scored == 0:
        raise InvalidArgumentError("no token could be scored (no BOS and stride == window == 1)")
    nll = total / n_scored
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_scored=n_scored, n_tokens=len(ids),
                            n_windows=len(plan), window=win, stride=strd, bos=bos,
                            protocol=PROTOCOL, seconds=time.perf_counter() - t0)


def gutenberg_body(text: str) -> str:
    """A Project Gutenberg text without its header (up to the "*** START OF" line) and its
    licence (from the "*** END OF" line); text without the markers comes back unchanged."""
    i = text.find(_GUTENBERG_START)
    if i >= 0:
        nl = text.find("\n", i)
        text = text[nl + 1 :] if nl >= 0 else ""
    j = text.find(_GUTENBERG_END)
    return text[:j] if j >= 0 else text

