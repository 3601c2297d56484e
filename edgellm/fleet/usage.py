# SPDX-License-Identifier: MIT
"""Usage counting on a device: what one ``usage`` report says, in constant memory.

Public API:

- ``UsageRecorder()``; attach it to a model with ``model.usage_hook = recorder.record``
  (the runtime calls it with a ``GenerationStats`` after every generate()).
- ``recorder.rate(up: bool)`` counts a clinician's thumbs up/down; ``recorder.error()``
  counts a failed request.
- ``recorder.take(hour) -> dict``: the counts of one usage message (requests, prompt_tokens,
  gen_tokens, errors, ratings_up, ratings_down, latency_ms and tokens_per_s percentiles,
  peak_rss_mb, hour, periods=1) and a reset to zero.

Latency and tokens/s go into fixed log-spaced histograms (5 % wide buckets, 0.01 to 1e8), so
memory does not grow with traffic and a percentile is within 2.5 % of the true value.
No text is seen here: GenerationStats carries counts and timings only. Thread-safe.

.. versionadded:: 0.1
"""

from __future__ import annotations

import math
import threading
from typing import Any, Protocol

__all__ = ["LogHistogram", "UsageRecorder", "peak_rss_mb"]


class _Stats(Protocol):
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_s: float


class LogHistogram:
    """Counts of positive values in buckets growing by ``ratio``; percentiles from them."""

    def __init__(self, lo: float = 0.01, hi: float = 1e8, ratio: float = 1.05) -> None:
        self.lo, self.ratio = lo, ratio
        self._log_ratio = math.log(ratio)
        self.n_buckets = math.ceil(math.log(hi / lo) / self._log_ratio) + 2
        self.counts = [0] * self.n_buckets  # [0]: below lo; [-1]: at or above hi
        self.total = 0

    def add(self, x: float) -> None:
        if not math.isfinite(x) or x < 0:
            return
        i = 0 if x < self.lo else min(self.n_buckets - 1,
                                      1 + int(math.log(x / self.lo) / self._log_ratio))
        self.counts[i] += 1
        self.total += 1

    def quantile(self, q: float) -> float:
        """The q-quantile (0..1), as its bucket's geometric midpoint; 0.0 when empty."""
        if self.total == 0:
            return 0.0
        rank = max(1, math.ceil(q * self.total))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                if i == 0:
                    return 0.0
                return float(self.lo * self.ratio ** (i - 0.5))
        return float(self.lo * self.ratio ** (self.n_buckets - 1.5))  # pragma: no cover

    def percentiles(self) -> dict[str, float]:
        return {f"p{int(q * 100)}": round(self.quantile(q), 3) for q in (0.5, 0.9, 0.99)}

    def clear(self) -> None:
        self.counts = [0] * self.n_buckets
        self.total = 0


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (0.0 where the OS does not say)."""
    try:
        import resource
        import sys
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(kb / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)
    except (ImportError, OSError):  # pragma: no cover - Windows
        return 0.0


class UsageRecorder:
    """Counts requests, tokens, errors, ratings and latency between two ``take`` calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latency = LogHistogram()
        self._tps = LogHistogram()
        self._counts = self._zero()

    @staticmethod
    def _zero() -> dict[str, int]:
        return dict.fromkeys(("requests", "prompt_tokens", "gen_tokens", "errors",
                              "ratings_up", "ratings_down"), 0)

    def record(self, stats: _Stats) -> None:
        """The model's usage hook: one finished generate() call."""
        latency_ms = (float(stats.prefill_s) + float(stats.decode_s)) * 1000.0
        n = int(stats.generated_tokens)
        tps = n / float(stats.decode_s) if stats.decode_s > 0 else 0.0
        with self._lock:
            c = self._counts
            c["requests"] += 1
            c["prompt_tokens"] += max(0, int(stats.prompt_tokens))
            c["gen_tokens"] += max(0, n)
            self._latency.add(latency_ms)
            if n > 0 and tps > 0:
                self._tps.add(tps)

    def rate(self, up: bool) -> None:
        """A thumbs-up (True) or thumbs-down (False) from the user."""
        with self._lock:
            self._counts["ratings_up" if up else "ratings_down"] += 1

    def error(self) -> None:
        """A request that failed."""
        with self._lock:
            self._counts["errors"] += 1

    def take(self, hour: int) -> dict[str, Any]:
        """The usage fields of one report since the last take, then reset."""
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            out["latency_ms"] = self._latency.percentiles()
            out["tokens_per_s"] = self._tps.percentiles()
            self._counts = self._zero()
            self._latency.clear()
            self._tps.clear()
        out.update(hour=int(hour), periods=1, peak_rss_mb=peak_rss_mb())
        return out
