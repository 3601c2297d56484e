// SPDX-License-Identifier: MIT
// Portable matmul kernels (F32, F16, Q4_0, Q8_0 weights): the oracle every SIMD table must match.
#include "generic.h"
#include "kernels.h"

// --------------------------------------------------------------------------
// Dot products (also the tails of the SIMD kernels)

float el_vec_dot_f32_f32_generic(const float *w, const float *x, int64_t n) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        sum += (double)(w[i] * x[i]);
    }
    return (float)sum;
}

float el_vec_dot_f16_f32_generic(const uint16_t *w, const float *x, int64_t n) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        sum += (double)(el_f16_to_f32(w[i]) * x[i]);
    }
    return (float)sum;
}

float el_vec_dot_q4_0_q8_0_generic(const el_block_q4_0 *w, const el_block_q8_0 *x, int64_t nb) {
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int32_t sumi = 0;
        for (int j = 0; j < EL_QK / 2; j++) {
            // nibbles hold q + 8: low = element j, high = element j + 16
            int32_t v0 = (w[b].qs[j] & 0x0f) - 8;
            int32_t v1 = (w[b].qs[j] >> 4) - 8;
            sumi += v0 * x[b].qs[j] + v1 * x[b].qs[j + EL_QK / 2];
        }
        sum += (float)sumi * (el_f16_to_f32(w[b].d) * el_f16_to_f32(x[b].d));
    }
    return sum;
}

float el_vec_dot_q8_0_q8_0_generic(const el_block_q8_0 *w, const el_block_q8_0 *x, int64_t nb) {
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int32_t sumi = 0;
        for (int j = 0; j < EL_QK; j++) {
            sumi += w[b].qs[j] * x[b].qs[j];
        }
        sum += (float)sumi * (el_f16_to_f32(w[b].d) * el_f16_to_f32(x[b].d));
    }
    return sum;
}

// --------------------------------------------------------------------------
// Matmul slices (el_matmul_fn): y[t * y_stride + r] = dot(w row r, x row t), r in [r0, r1)

void el_matmul_f32_f32_generic(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                               float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                               int64_t n_tok) {
    for (int64_t r = r0; r < r1; r++) {
        const float *wr = (const float *)((const char *)w + (size_t)r * w_row_bytes);  // [cols]
        for (int64_t t = 0; t < n_tok; t++) {
            const float *xt = (const float *)((const char *)x + (size_t)t * x_row_bytes);  // [cols]
            y[t * y_stride + r] = el_vec_dot_f32_f32_generic(wr, xt, cols);
        }
    }
}

void el_matmul_f16_f32_generic(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                               float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                               int64_t n_tok) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *wr = (const uint16_t *)((const char *)w + (size_t)r * w_row_bytes);  // [cols]
        for (int64_t t = 0; t < n_tok; t++) {
            const float *xt = (const float *)((const char *)x + (size_t)t * x_row_bytes);  // [cols]
            y[t * y_stride + r] = el_vec_dot_f16_f32_generic(wr, xt, cols);
        }
    }
}

void el_matmul_q4_0_q8_0_generic(const void *w, size_t w_row_bytes, const void *x,
                                 size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                                 int64_t r0, int64_t r1, int64_t n_tok) {
    int64_t nb = cols / EL_QK;
    for (int64_t r = r0; r < r1; r++) {
        const el_block_q4_0 *wr = (const el_block_q4_0 *)((const char *)w + (size_t)r * w_row_bytes);
        for (int64_t t = 0; t < n_tok; t++) {
            const el_block_q8_0 *xt = (const el_block_q8_0 *)((const char *)x + (size_t)t * x_row_bytes);
            y[t * y_stride + r] = el_vec_dot_q4_0_q8_0_generic(wr, xt, nb);
        }
    }
}

void el_matmul_q8_0_q8_0_generic(const void *w, size_t w_row_bytes, const void *x,
                                 size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                                 int64_t r0, int64_t r1, int64_t n_tok) {
    int64_t nb = cols / EL_QK;
    for (int64_t r = r0; r < r1; r++) {
        const el_block_q8_0 *wr = (const el_block_q8_0 *)((const char *)w + (size_t)r * w_row_bytes);
        for (int64_t t = 0; t < n_tok; t++) {
            const el_block_q8_0 *xt = (const el_block_q8_0 *)((const char *)x + (size_t)t * x_row_bytes);
            y[t * y_stride + r] = el_vec_dot_q8_0_q8_0_generic(wr, xt, nb);
        }
    }
}

const el_kernel_table el_kernels_generic = {
    .isa = EDGELLM_ISA_GENERIC,
    .name = "generic",
    .matmul = {
        [EL_WK_F32] = el_matmul_f32_f32_generic,
        [EL_WK_F16] = el_matmul_f16_f32_generic,
        [EL_WK_Q4_0] = el_matmul_q4_0_q8_0_generic,
        [EL_WK_Q8_0] = el_matmul_q8_0_q8_0_generic,
    },
    .quantize_q8_0 = el_quantize_row_q8_0,
};
