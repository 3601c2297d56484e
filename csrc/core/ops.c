// SPDX-License-Identifier: MIT
// Portable f32 ops of the transformer forward, written so the baseline compiler can vectorise them.
#include "ops.h"

#include <math.h>

#include "edgellm.h"

// Independent partial sums per dot product: breaks the add dependency chain and gives the
// compiler lanes to vectorise without -ffast-math (16 = four 4-wide or two 8-wide vectors).
#define EL_DOT_LANES 16

// --------------------------------------------------------------------------
// Dot products and axpy (attention scores and the weighted sum of values)

static inline float el_sum_lanes(const float acc[EL_DOT_LANES]) {
    // Pairwise reduction keeps the rounding error at O(log lanes).
    float a[EL_DOT_LANES];
    for (int j = 0; j < EL_DOT_LANES; j++) a[j] = acc[j];
    for (int w = EL_DOT_LANES / 2; w > 0; w /= 2)
        for (int j = 0; j < w; j++) a[j] += a[j + w];
    return a[0];
}

float el_dot_f32(const float *a, const float *b, int64_t n) {
    float acc[EL_DOT_LANES] = {0};
    int64_t i = 0;
    for (; i + EL_DOT_LANES <= n; i += EL_DOT_LANES)
        for (int j = 0; j < EL_DOT_LANES; j++) acc[j] += a[i + j] * b[i + j];
    for (int j = 0; i < n; i++, j++) acc[j] += a[i] * b[i];  // tail: < EL_DOT_LANES left
    return el_sum_lanes(acc);
}

float el_dot_f16_f32(const uint16_t *a, const float *b, int64_t n) {
    float acc[EL_DOT_LANES] = {0};
    int64_t i = 0;
    for (; i + EL_DOT_LANES <= n; i += EL_DOT_LANES)
        for (int j = 0; j < EL_DOT_LANES; j++) acc[j] += el_h2f(a[i + j]) * b[i + j];
    for (int j = 0; i < n; i++, j++) acc[j] += el_h2f(a[i]) * b[i];
    return el_sum_lanes(acc);
}

void el_axpy_f32(float *y, float alpha, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += alpha * x[i];
}

void el_axpy_f16(float *y, float alpha, const uint16_t *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += alpha * el_h2f(x[i]);
}

void el_add_f32(float *y, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
}

// --------------------------------------------------------------------------
// Normalisation, softmax, activation

void el_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps) {
    // Sum of squares in double: the mean stays exact to f32 for any width (parity with
    // transformers, whose f32 reduction is pairwise).
    double acc[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int j = 0; j < 4; j++) acc[j] += (double)x[i + j] * x[i + j];
    for (; i < n; i++) acc[0] += (double)x[i] * x[i];
    const double mean = (acc[0] + acc[1] + acc[2] + acc[3]) / (double)n;
    const float scale = (float)(1.0 / sqrt(mean + (double)eps));
    for (i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

void el_softmax(float *x, int64_t n) {
    float max = x[0];
    for (int64_t i = 1; i < n; i++) max = x[i] > max ? x[i] : max;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    const float inv = (float)(1.0 / sum);  // sum >= 1: the max term is exp(0)
    for (int64_t i = 0; i < n; i++) x[i] *= inv;
}

void el_silu_mul(float *g, const float *u, int64_t n) {
    for (int64_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

// --------------------------------------------------------------------------
// Rotary position embedding

void el_rope(float *x, const float *cs, const float *sn, int32_t rope_dim, int32_t mode) {
    const int32_t half = rope_dim / 2;
    if (mode == EDGELLM_ROPE_NEOX) {
        // Pairs (i, i + half): the "rotate_half" layout of transformers and llama.cpp neox.
        for (int32_t i = 0; i < half; i++) {
            const float x0 = x[i], x1 = x[i + half];
            x[i] = x0 * cs[i] - x1 * sn[i];
            x[i + half] = x0 * sn[i] + x1 * cs[i];
        }
    } else {
        // Adjacent pairs (2i, 2i+1): llama.cpp's normal mode (GGUF llama weights are permuted).
        for (int32_t i = 0; i < half; i++) {
            const float x0 = x[2 * i], x1 = x[2 * i + 1];
            x[2 * i] = x0 * cs[i] - x1 * sn[i];
            x[2 * i + 1] = x0 * sn[i] + x1 * cs[i];
        }
    }
}
