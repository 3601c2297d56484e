# SPDX-License-Identifier: MIT
"""Every numeric tolerance the tests use, each with the reason for its size."""

from __future__ import annotations

import numpy as np

# Model logits, measured as max|got - want| / max|want| (see rel_err).
# F32 weights: C accumulates in f32 in another order than float64 NumPy; 1e-4 is the bar.
LOGITS_REL_F32 = 1e-4
# Against transformers' f32 forward (its own f32 rounding plus ours): the issue's 1e-4 bar.
LOGITS_REL_TRANSFORMERS = 1e-4
# Q8_0/Q4_0 weights vs the reference on the same dequantised weights: the runtime also quantises
# activations to Q8_0 (as ggml does), which moves logits by up to ~1% of their range.
LOGITS_REL_Q8_0 = 2e-2

# Kernels (tests/test_kernels.py), measured as |got - generic| / sum_i |w_i x_i| per output.
# F32/F16: SIMD sums in f32 lanes in another order than generic's double sum; the error stays
# below ~(cols / lanes + log2 lanes) f32 ulps of sum |w x|, under 2e-5 for 4096 columns.
KERNEL_DOT_REL = 2e-5
# Q4_0/Q8_0 with arbitrary scales: integer dots are exact, but the f32 products of block scales
# and their sum are rounded in another order; same bound as above.
KERNEL_QDOT_REL = 2e-5
# Q8_0 round trip: |x - q d| <= d / 2, plus |q| * |d - f16(d)| <= 127 * 2^-11 d for the f16 scale.
QUANT_Q8_0_ERR_D = 0.5 + 127 * 2.0**-11
# Q4_0 round trip: the clip of x = -max to q = 7 costs up to d, plus 8 * 2^-11 d for f16(d).
QUANT_Q4_0_ERR_D = 1.0 + 8 * 2.0**-11
# Absolute floor for the round trips: an f16 scale below 2^-14 is subnormal, off by <= 2^-25.
QUANT_ERR_ABS = 128 * 2.0**-25


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: error relative to the scale of the logits."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))

# A Q8_0 greedy token may differ from the F32 one only where the F32 model's top two logits lie
# closer than this fraction of the logit range: Q8_0 rounding moves logits by about 1% of it.
GREEDY_TIE_Q8_0 = 1e-2

# The bar for edgellm vs an independent perplexity. C sums in f32 while the oracles
# use float64 (NumPy) or f32 in another order (torch); per-token NLL errors of ~1e-5 average
# out over hundreds of tokens, so 1e-4 relative has a wide margin but still catches a token
# scored in the wrong window (that moves the mean NLL by ~1e-3 or more).
PPL_REL = 1e-4
