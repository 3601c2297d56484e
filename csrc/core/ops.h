// SPDX-License-Identifier: MIT
// Portable f32 ops of the transformer forward (RMSNorm, RoPE, softmax, SiLU, residual adds).
#ifndef EL_OPS_H
#define EL_OPS_H

#include <stddef.h>
#include <stdint.h>

// --------------------------------------------------------------------------
// Attention

// max of x: [n], n >= 1.
float el_max(const float *x, int64_t n);
// x: [n] = exp(scale * (x - max)); returns their sum (the softmax denominator).
float el_exp_sum(float *x, int64_t n, float max, float scale);
// x: [n] *= a.
void el_scale(float *x, float a, int64_t n);
// y: [n] += a * x: [n].
void el_axpy(float *y, float a, const float *x, int64_t n);

// --------------------------------------------------------------------------
// Element-wise and normalisation

// y: [n] += x: [n].
void el_add_f32(float *y, const float *x, int64_t n);
// out: [n] = x: [n] / sqrt(mean(x^2) + eps) * w: [n] (out may equal x).
void el_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps);
// g: [n] = silu(g) * u: [n], silu(g) = g * sigmoid(g).
void el_silu_mul(float *g, const float *u, int64_t n);
// exp(x) within 2 ulp for x in [-87, 88] (clamped outside); the vectorisable form used by
// softmax and SiLU (exported for the tests).
float el_expf(float x);

// Denormal floats (below 1.2e-38) cost x86 cores ~100x per operation; attention in a model
// with peaked scores makes many (softmax weights near 0 times V). el_fp_flush_denormals sets
// flush-to-zero and denormals-are-zero for the calling thread and returns the previous
// control word for el_fp_restore; both are no-ops where the ISA has no such mode.
uint32_t el_fp_flush_denormals(void);
void el_fp_restore(uint32_t saved);

// Rotates one head x: [head_dim] in place over its first rope_dim dims at one position.
// cs, sn: [rope_dim / 2] cos and sin of the angles; mode is edgellm_rope_mode
// (NORM: pairs (2i, 2i+1); NEOX: pairs (i, i + rope_dim/2)).
void el_rope(float *x, const float *cs, const float *sn, int32_t rope_dim, int32_t mode);

#endif  // EL_OPS_H
