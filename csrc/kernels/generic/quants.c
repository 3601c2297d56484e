// SPDX-License-Identifier: MIT
// Portable f16 conversion and the Q8_0 / Q4_0 (de)quantizers, byte-identical to ggml's reference.
#include <math.h>
#include <string.h>

#include "kernels.h"

// --------------------------------------------------------------------------
// f16 <-> f32 by bit manipulation (IEEE binary16, round to nearest even)

static uint32_t el_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float el_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float el_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) {
        return el_bits_f32(sign | 0x7f800000u | (man << 13));  // inf / NaN keep their payload
    }
    if (exp != 0) {
        return el_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));  // rebias 15 -> 127
    }
    // zero or subnormal: man * 2^-24, exact in f32
    float mag = (float)man * 0x1p-24f;
    return sign ? -mag : mag;
}

uint16_t el_f32_to_f16(float f) {
    uint32_t x = el_f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) {
        return (uint16_t)(sign | 0x7e00u);  // NaN -> quiet NaN
    }
    if (ax >= 0x477ff000u) {
        return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to inf (65504 is the largest f16)
    }
    if (ax >= 0x38800000u) {
        // normal f16 (>= 2^-14): round the 13 dropped mantissa bits to nearest even, rebias 127 -> 15
        uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);
        return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
    }
    // subnormal f16: adding 0.5 leaves an ulp of 2^-24, so the FPU rounds to the f16 grid (RNE)
    float t = el_bits_f32(ax) + 0.5f;
    return (uint16_t)(sign | (el_f32_bits(t) - 0x3f000000u));
}

// --------------------------------------------------------------------------
// Q8_0: d = amax / 127, q = roundf(x / d) (half away from zero), like quantize_row_q8_0_ref

// roundf without a libm call: truncate, then compare the exact remainder with one half
// (v + 0.5 would round in f32 and turn 0.49999997 into 1). Only |v| <= 127.5 occurs for
// finite scales; inf/NaN (a subnormal d makes 1 / d overflow) give 0, as ggml and NumPy do
// on x86, instead of an undefined conversion.
static inline int32_t el_round_half_away(float v) {
    float a = fabsf(v);
    if (!(a < 256.0f)) {
        return 0;
    }
    int32_t i = (int32_t)a;               // trunc
    i += (a - (float)i) >= 0.5f;          // a - i is exact for a < 2^23
    return v < 0.0f ? -i : i;
}

void el_quantize_row_q8_0(const float *x, el_block_q8_0 *y, int64_t n) {
    int64_t nb = n / EL_QK;
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * EL_QK;  // [32]
        float amax = 0.0f;
        for (int j = 0; j < EL_QK; j++) {
            float a = fabsf(xb[j]);
            amax = amax > a ? amax : a;  // ggml's MAX
        }
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = el_f32_to_f16(d);
        for (int j = 0; j < EL_QK; j++) {
            y[b].qs[j] = (int8_t)el_round_half_away(xb[j] * id);
        }
    }
}

void el_dequantize_row_q8_0(const el_block_q8_0 *x, float *y, int64_t n) {
    int64_t nb = n / EL_QK;
    for (int64_t b = 0; b < nb; b++) {
        float d = el_f16_to_f32(x[b].d);
        for (int j = 0; j < EL_QK; j++) {
            y[b * EL_QK + j] = (float)x[b].qs[j] * d;
        }
    }
}

// --------------------------------------------------------------------------
// Q4_0: d = (signed value of largest magnitude) / -8, q = min(15, trunc(x / d + 8.5)),
// like quantize_row_q4_0_ref; byte j packs elements j (low nibble) and j + 16 (high nibble).

// min(15, trunc(v)) for v = x / d + 8.5 in [0.5, 16.5]; inf/NaN (from a subnormal d) give 0,
// as ggml and NumPy do on x86, instead of an undefined conversion.
static inline int el_q4_nibble(float v) {
    if (!(v >= 0.0f && v < 256.0f)) {
        return 0;
    }
    int q = (int)v;
    return q < 15 ? q : 15;
}

void el_quantize_row_q4_0(const float *x, el_block_q4_0 *y, int64_t n) {
    int64_t nb = n / EL_QK;
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * EL_QK;  // [32]
        // the first element of largest magnitude, with its sign (NumPy's argmax; ggml starts
        // from +0 instead, which differs only in the sign of d for a block of -0s)
        float max = xb[0];
        float amax = fabsf(xb[0]);
        for (int j = 1; j < EL_QK; j++) {
            if (amax < fabsf(xb[j])) {
                amax = fabsf(xb[j]);
                max = xb[j];
            }
        }
        float d = max / -8.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = el_f32_to_f16(d);
        for (int j = 0; j < EL_QK / 2; j++) {
            // volatile keeps x * id rounded before the + 8.5 (no FMA contraction), as in NumPy
            volatile float s0 = xb[j] * id;
            volatile float s1 = xb[j + EL_QK / 2] * id;
            y[b].qs[j] = (uint8_t)(el_q4_nibble(s0 + 8.5f) | (el_q4_nibble(s1 + 8.5f) << 4));
        }
    }
}

void el_dequantize_row_q4_0(const el_block_q4_0 *x, float *y, int64_t n) {
    int64_t nb = n / EL_QK;
    for (int64_t b = 0; b < nb; b++) {
        float d = el_f16_to_f32(x[b].d);
        for (int j = 0; j < EL_QK / 2; j++) {
            y[b * EL_QK + j] = (float)((x[b].qs[j] & 0x0f) - 8) * d;
            y[b * EL_QK + j + EL_QK / 2] = (float)((x[b].qs[j] >> 4) - 8) * d;
        }
    }
}

void el_dequantize_row_f16(const uint16_t *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        y[i] = el_f16_to_f32(x[i]);
    }
}
