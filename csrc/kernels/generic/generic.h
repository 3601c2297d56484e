// SPDX-License-Identifier: MIT
// Portable dot products over block ranges: the oracle kernels, and the tails SIMD loops hand back.
#ifndef EL_GENERIC_H
#define EL_GENERIC_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

// dot(w: [n] f32, x: [n] f32); products in f32, sum in double (like ggml_vec_dot_f32).
float el_vec_dot_f32_f32_generic(const float *w, const float *x, int64_t n);
// dot(w: [n] f16 bits, x: [n] f32); same summation as the f32 one.
float el_vec_dot_f16_f32_generic(const uint16_t *w, const float *x, int64_t n);
// sum over nb blocks of d_w * d_x * (integer dot of the 32 quants); w: [nb], x: [nb] blocks.
float el_vec_dot_q4_0_q8_0_generic(const el_block_q4_0 *w, const el_block_q8_0 *x, int64_t nb);
float el_vec_dot_q8_0_q8_0_generic(const el_block_q8_0 *w, const el_block_q8_0 *x, int64_t nb);

// The generic el_matmul_fn slices (see kernels.h), the entries of el_kernels_generic.
void el_matmul_f32_f32_generic(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                               float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                               int64_t n_tok);
void el_matmul_f16_f32_generic(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                               float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                               int64_t n_tok);
void el_matmul_q4_0_q8_0_generic(const void *w, size_t w_row_bytes, const void *x,
                                 size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                                 int64_t r0, int64_t r1, int64_t n_tok);
void el_matmul_q8_0_q8_0_generic(const void *w, size_t w_row_bytes, const void *x,
                                 size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                                 int64_t r0, int64_t r1, int64_t n_tok);

#endif  // EL_GENERIC_H
