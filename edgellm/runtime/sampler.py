# SPDX-License-Identifier: MIT
"""Next-token choice from logits: greedy, or temperature + top-k + top-p with a seeded RNG."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentError


class Sampler:
    """Picks token ids from logits; the same seed and logits always give the same ids.

    - ``Sampler(temperature=0)`` is greedy (argmax; the lowest id wins a tie).
    - Otherwise logits are divided by the temperature, cut to the ``top_k`` best (0 = all),
      then to the smallest set whose probability reaches ``top_p`` (1.0 = all), and sampled
      with ``numpy.random.Generator(PCG64(seed))``.
    """

    def __init__(
        self,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
    ) -> None:
        if not temperature >= 0.0:  # also refuses NaN
            raise InvalidArgumentError(f"temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise InvalidArgumentError(f"top_k must be >= 0, got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def __call__(self, logits: np.ndarray) -> int:  # [vocab_size] -> id
        if self.temperature == 0.0:
            return int(logits.argmax())
        vocab = logits.shape[0]
        k = vocab if self.top_k == 0 else min(self.top_k, vocab)
        if k < vocab:
            idx = np.argpartition(-logits, k - 1)[:k]  # the k best, unordered
        else:
            idx = np.arange(vocab)
        # Sort the candidates best first; a stable sort on -logit breaks ties by lower id.
        idx = idx[np.argsort(-logits[idx], kind="stable")]
        z = logits[idx].astype(np.float64) / self.temperature
        p = np.exp(z - z[0])
        p /= p.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
            p = p[:keep] / p[:keep].sum()
            idx = idx[:keep]
        return int(idx[self._rng.choice(len(idx), p=p)])
