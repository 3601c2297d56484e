// SPDX-License-Identifier: MIT
// Portable f32 ops of the transformer forward (norm, RoPE, softmax, SiLU, attention dot products).
#ifndef EL_OPS_H
#define EL_OPS_H

#include <stdint.h>

// dot(a: [n], b: [n]) in f32.
float el_dot_f32(const float *a, const float *b, int64_t n);
// dot(a: [n] f16 bits, b: [n] f32) in f32.
float el_dot_f16_f32(const uint16_t *a, const float *b, int64_t n);
// y: [n] += alpha * x: [n].
void el_axpy_f32(float *y, float alpha, const float *x, int64_t n);
// y: [n] += alpha * x: [n] f16 bits.
void el_axpy_f16(float *y, float alpha, const uint16_t *x, int64_t n);
// y: [n] += x: [n].
void el_add_f32(float *y, const float *x, int64_t n);

// out: [n] = x: [n] / sqrt(mean(x^2) + eps) * w: [n] (out may equal x).
void el_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps);
// x: [n] = softmax(x), max-subtracted for stability.
void el_softmax(float *x, int64_t n);
// g: [n] = silu(g) * u: [n], silu(g) = g * sigmoid(g).
void el_silu_mul(float *g, const float *u, int64_t n);

// Rotates one head x: [head_dim] in place over its first rope_dim dims at one position.
// cs, sn: [rope_dim / 2] cos and sin of the angles; mode is edgellm_rope_mode
// (NORM: pairs (2i, 2i+1); NEOX: pairs (i, i + rope_dim/2)).
void el_rope(float *x, const float *cs, const float *sn, int32_t rope_dim, int32_t mode);

// f16 bits -> f32, exact for every input (normals, subnormals, inf, NaN); inlinable so the
// attention loops over an F16 KV cache vectorise.
static inline float el_h2f(uint16_t h) {
    // Move the half's exponent and mantissa to the top of a float, then rescale by 2^-112
    // (the exponent bias difference); subnormal halves are built by subtracting a magic bias.
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;  // drops the sign bit
    union { uint32_t u; float f; } norm, den, out;
    norm.u = (two_w >> 4) + (0xE0u << 23);
    norm.f *= 0x1.0p-112f;
    den.u = (two_w >> 17) | (126u << 23);
    den.f -= 0.5f;
    out.u = sign | (two_w < (1u << 27) ? den.u : norm.u);
    return out.f;
}

#endif  // EL_OPS_H
