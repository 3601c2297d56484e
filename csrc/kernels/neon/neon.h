// SPDX-License-Identifier: MIT
// The NEON matmul slices that the neon_dotprod table reuses (SDOT only changes the integer ones).
#ifndef EL_NEON_H
#define EL_NEON_H

#include <stddef.h>
#include <stdint.h>

void el_matmul_f32_f32_neon(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                            float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                            int64_t n_tok);
void el_matmul_f16_f32_neon(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                            float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                            int64_t n_tok);

#endif  // EL_NEON_H
