// SPDX-License-Identifier: MIT
// Armv8-A Advanced SIMD (NEON) matmul kernels; each matches the el_matmul_*_generic of its name.
#if !defined(__ARM_NEON) || !defined(__aarch64__)
#error "kernels/neon is for AArch64 (Advanced SIMD is part of its baseline)"
#endif

#include <arm_neon.h>

#include "../generic/generic.h"
#include "kernels.h"
#include "neon.h"

// Tile and buffer sizes are shared with the other NEON table (neon.h).
#define EL_TT EL_NEON_TT
// Independent accumulators per token (4 / nt), enough to cover the FMA latency.
#define EL_SLOTS(nt) ((nt) == 1 ? 4 : (nt) == 2 ? 2 : 1)
// Rows per chunk when n_tok > EL_TT: the chunk's weights stay in L2 while every token tile
// passes over them, so weights come from DRAM once per call.
#define EL_ROW_CHUNK 64
#define EL_PREP_BLOCKS EL_NEON_PREP_BLOCKS
// Rows ahead whose weights are prefetched (DRAM latency x bandwidth is a few KiB).
#define EL_PF_ROWS 4

#define EL_INLINE static inline __attribute__((always_inline))

// --------------------------------------------------------------------------
// Q4_0 weights x Q8_0 activations (matches el_matmul_q4_0_q8_0_generic)
//
// Layout: a block's 16 nibble bytes give elements 0..15 (& 0x0f) and 16..31 (>> 4), unsigned
// in [0, 15], against the Q8_0 block's two 16-byte halves. vmull/vmlal_s8 build int16 lanes
// of 4 products each (|.| <= 4 * 15 * 127), vpaddlq widens to exact int32 partial dots. The
// recentring to q - 8 is folded into f32 per block: + d_w * c with c = d_x * (-8 * sum(x)).
// Blocks go 4 at a time, so one f16 -> f32 conversion covers 4 scales.

EL_INLINE void el_q4_0_block_neon(float32x4_t acc[EL_TT], const el_block_q4_0 *wb,
                                  const uint8_t *x, size_t x_row_bytes, int64_t j,
                                  const float32x4_t s[EL_TT], int lane, int nt) {
    uint8x16_t raw = vld1q_u8(wb->qs);
    int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0f)));
    int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
    for (int t = 0; t < nt; t++) {
        const el_block_q8_0 *xb = (const el_block_q8_0 *)(x + (size_t)t * x_row_bytes) + j;
        int8x16_t x0 = vld1q_s8(xb->qs), x1 = vld1q_s8(xb->qs + 16);
        int16x8_t p = vmull_s8(vget_low_s8(lo), vget_low_s8(x0));
        p = vmlal_s8(p, vget_high_s8(lo), vget_high_s8(x0));
        p = vmlal_s8(p, vget_low_s8(hi), vget_low_s8(x1));
        p = vmlal_s8(p, vget_high_s8(hi), vget_high_s8(x1));
        acc[t] = el_neon_fma_lane(acc[t], vcvtq_f32_s32(vpaddlq_s16(p)), s[t], lane);
    }
}

// --------------------------------------------------------------------------
// Q8_0 weights x Q8_0 activations (matches el_matmul_q8_0_q8_0_generic)
//
// Layout: both blocks are 32 signed bytes in element order; int16 lanes take 2 products each
// (|.| <= 2 * 128 * 127: the activation quantizer never makes -128) before vpadalq widens them.

EL_INLINE void el_q8_0_block_neon(float32x4_t acc[EL_TT], const el_block_q8_0 *wb,
                                  const uint8_t *x, size_t x_row_bytes, int64_t j,
                                  const float32x4_t s[EL_TT], int lane, int nt) {
    int8x16_t w0 = vld1q_s8(wb->qs), w1 = vld1q_s8(wb->qs + 16);
    for (int t = 0; t < nt; t++) {
        const el_block_q8_0 *xb = (const el_block_q8_0 *)(x + (size_t)t * x_row_bytes) + j;
        int8x16_t x0 = vld1q_s8(xb->qs), x1 = vld1q_s8(xb->qs + 16);
        int16x8_t p0 = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
        p0 = vmlal_s8(p0, vget_high_s8(w0), vget_high_s8(x0));
        int16x8_t p1 = vmull_s8(vget_low_s8(w1), vget_low_s8(x1));
        p1 = vmlal_s8(p1, vget_high_s8(w1), vget_high_s8(x1));
        int32x4_t q = vpadalq_s16(vpaddlq_s16(p0), p1);
        acc[t] = el_neon_fma_lane(acc[t], vcvtq_f32_s32(q), s[t], lane);
    }
}

// --------------------------------------------------------------------------
// Rows [r0, r1) x nt tokens over blocks [cb, cb + n) of a Q4_0 (q4 = 1) or Q8_0 matrix; y gets
// (accumulate: += ) the dots. Each row runs in groups of 4 blocks, the last one partial.

EL_INLINE void el_quant_rows_neon(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
                                  size_t x_row_bytes, const el_neon_prep *xp, float *y,
                                  int64_t y_stride, int64_t cb, int n, int64_t r0, int64_t r1,
                                  int accumulate, const int q4, const int nt) {
    const size_t bb = q4 ? sizeof(el_block_q4_0) : sizeof(el_block_q8_0);
    const int pb = el_neon_pass_blocks(nt);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + (size_t)r * w_row_bytes + (size_t)cb * bb;
        const uint8_t *xc = x + (size_t)cb * sizeof(el_block_q8_0);
        el_neon_prefetch(wr + EL_PF_ROWS * w_row_bytes, (size_t)n * bb);
        float32x4_t acc[4][EL_TT];  // [slot, token]: independent FMA chains
        float32x4_t corr[EL_TT];    // Q4_0: sum of d_w * c
        for (int t = 0; t < EL_TT; t++) {
            for (int k = 0; k < 4; k++) {
                acc[k][t] = vdupq_n_f32(0.0f);
            }
            corr[t] = vdupq_n_f32(0.0f);
        }
        for (int g = 0; g < n; g += 4) {
            int gs = n - g < 4 ? n - g : 4;
            float32x4_t dw = el_neon_dw4(wr + (size_t)g * bb, bb, gs);
            float32x4_t s[EL_TT];
            for (int t = 0; t < nt; t++) {
                s[t] = vmulq_f32(dw, vld1q_f32(xp->dx + t * (pb + 4) + g));
                if (q4) {
                    corr[t] = vfmaq_f32(corr[t], dw, vld1q_f32(xp->c + t * (pb + 4) + g));
                }
            }
            if (gs == 4) {
#pragma GCC unroll 4
                for (int k = 0; k < 4; k++) {
                    const uint8_t *wb = wr + (size_t)(g + k) * bb;
                    if (q4) {
                        el_q4_0_block_neon(acc[k % EL_SLOTS(nt)], (const el_block_q4_0 *)wb, xc, x_row_bytes, g + k, s, k, nt);
                    } else {
                        el_q8_0_block_neon(acc[k % EL_SLOTS(nt)], (const el_block_q8_0 *)wb, xc, x_row_bytes, g + k, s, k, nt);
                    }
                }
            } else {
                for (int k = 0; k < gs; k++) {
                    const uint8_t *wb = wr + (size_t)(g + k) * bb;
                    if (q4) {
                        el_q4_0_block_neon(acc[0], (const el_block_q4_0 *)wb, xc, x_row_bytes, g + k, s, k, nt);
                    } else {
                        el_q8_0_block_neon(acc[0], (const el_block_q8_0 *)wb, xc, x_row_bytes, g + k, s, k, nt);
                    }
                }
            }
        }
        for (int t = 0; t < nt; t++) {
            float32x4_t a = vaddq_f32(vaddq_f32(acc[0][t], acc[1][t]), vaddq_f32(acc[2][t], acc[3][t]));
            float v = vaddvq_f32(vaddq_f32(a, corr[t]));
            float *yo = y + t * y_stride + r;
            *yo = accumulate ? *yo + v : v;
        }
    }
}

static void el_quant_part_neon(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
                               size_t x_row_bytes, float *y, int64_t y_stride, int64_t nb,
                               int64_t r0, int64_t r1, int q4, int nt) {
    el_neon_prep xp;
    int pb = el_neon_pass_blocks(nt);
    for (int64_t cb = 0; cb < nb; cb += pb) {
        int n = nb - cb < pb ? (int)(nb - cb) : pb;
        el_neon_prepare(&xp, x, x_row_bytes, cb, n, nt, q4);
        int acc = cb > 0;
        switch (nt * 2 + q4) {
            case 2: el_quant_rows_neon(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 0, 1); break;
            case 3: el_quant_rows_neon(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 1, 1); break;
            case 4: el_quant_rows_neon(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 0, 2); break;
            case 5: el_quant_rows_neon(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 1, 2); break;
            case 6: el_quant_rows_neon(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 0, 3); break;
            case 7: el_quant_rows_neon(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 1, 3); break;
            case 8: el_quant_rows_neon(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 0, 4); break;
            default: el_quant_rows_neon(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 1, 4); break;
        }
    }
}

// --------------------------------------------------------------------------
// F32 / F16 weights x F32 activations (match el_matmul_f32_f32_generic / _f16_f32_generic)
//
// Layout: rows of cols floats (or f16 bits, widened with fcvtl), 4 columns per vector, four
// independent accumulators per token; the last cols % 16 columns go to the generic dot.

EL_INLINE float32x4_t el_load_w4(const uint8_t *wr, int64_t c, int is_f16) {
    if (is_f16) {
        return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)wr + c)));
    }
    return vld1q_f32((const float *)wr + c);
}

EL_INLINE void el_f32_rows_neon(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
                                size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                                int64_t r0, int64_t r1, const int is_f16, const int nt) {
    int64_t cmain = cols & ~(int64_t)15;
    size_t esize = is_f16 ? sizeof(uint16_t) : sizeof(float);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + (size_t)r * w_row_bytes;
        el_neon_prefetch(wr + EL_PF_ROWS * w_row_bytes, (size_t)cols * esize);
        float32x4_t acc[4][EL_TT];
        for (int k = 0; k < 4; k++) {
            for (int t = 0; t < EL_TT; t++) {
                acc[k][t] = vdupq_n_f32(0.0f);
            }
        }
        for (int64_t c = 0; c < cmain; c += 16) {
            float32x4_t wv[4];
            for (int k = 0; k < 4; k++) {
                wv[k] = el_load_w4(wr, c + 4 * k, is_f16);
            }
            for (int t = 0; t < nt; t++) {
                const float *xt = (const float *)(x + (size_t)t * x_row_bytes) + c;
                for (int k = 0; k < 4; k++) {
                    acc[k][t] = vfmaq_f32(acc[k][t], wv[k], vld1q_f32(xt + 4 * k));
                }
            }
        }
        for (int t = 0; t < nt; t++) {
            const float *xt = (const float *)(x + (size_t)t * x_row_bytes);
            float tail = is_f16 ? el_vec_dot_f16_f32_generic((const uint16_t *)wr + cmain, xt + cmain, cols - cmain)
                                : el_vec_dot_f32_f32_generic((const float *)wr + cmain, xt + cmain, cols - cmain);
            float32x4_t a = vaddq_f32(vaddq_f32(acc[0][t], acc[1][t]), vaddq_f32(acc[2][t], acc[3][t]));
            y[t * y_stride + r] = vaddvq_f32(a) + tail;
        }
    }
}

static void el_f32_part_neon(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
                             size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                             int64_t r0, int64_t r1, int is_f16, int nt) {
    switch (nt * 2 + is_f16) {
        case 2: el_f32_rows_neon(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 0, 1); break;
        case 3: el_f32_rows_neon(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 1, 1); break;
        case 4: el_f32_rows_neon(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 0, 2); break;
        case 5: el_f32_rows_neon(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 1, 2); break;
        case 6: el_f32_rows_neon(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 0, 3); break;
        case 7: el_f32_rows_neon(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 1, 3); break;
        case 8: el_f32_rows_neon(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 0, 4); break;
        default: el_f32_rows_neon(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 1, 4); break;
    }
}

// --------------------------------------------------------------------------
// Drivers: token tiles of constant size, row chunks for batched calls.

enum { EL_K_F32, EL_K_F16, EL_K_Q4_0, EL_K_Q8_0 };

static void el_matmul_neon(int kind, const void *w, size_t w_row_bytes, const void *x,
                           size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                           int64_t r0, int64_t r1, int64_t n_tok) {
    const uint8_t *wb = (const uint8_t *)w;
    const uint8_t *xb = (const uint8_t *)x;
    int64_t chunk = n_tok > EL_TT ? EL_ROW_CHUNK : r1 - r0;
    for (int64_t rc = r0; rc < r1; rc += chunk) {
        int64_t rc_end = rc + chunk < r1 ? rc + chunk : r1;
        for (int64_t t = 0; t < n_tok; t += EL_TT) {
            int nt = n_tok - t < EL_TT ? (int)(n_tok - t) : EL_TT;
            const uint8_t *xt = xb + (size_t)t * x_row_bytes;
            float *yt = y + t * y_stride;
            if (kind == EL_K_Q4_0 || kind == EL_K_Q8_0) {
                el_quant_part_neon(wb, w_row_bytes, xt, x_row_bytes, yt, y_stride, cols / EL_QK, rc, rc_end, kind == EL_K_Q4_0, nt);
            } else {
                el_f32_part_neon(wb, w_row_bytes, xt, x_row_bytes, yt, y_stride, cols, rc, rc_end, kind == EL_K_F16, nt);
            }
        }
    }
}

void el_matmul_f32_f32_neon(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                            float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                            int64_t n_tok) {
    el_matmul_neon(EL_K_F32, w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, n_tok);
}

void el_matmul_f16_f32_neon(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                            float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                            int64_t n_tok) {
    el_matmul_neon(EL_K_F16, w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, n_tok);
}

void el_matmul_q4_0_q8_0_neon(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                              float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                              int64_t n_tok) {
    el_matmul_neon(EL_K_Q4_0, w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, n_tok);
}

void el_matmul_q8_0_q8_0_neon(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                              float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                              int64_t n_tok) {
    el_matmul_neon(EL_K_Q8_0, w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, n_tok);
}

const el_kernel_table el_kernels_neon = {
    .isa = EDGELLM_ISA_NEON,
    .name = "neon",
    .matmul = {
        [EL_WK_F32] = el_matmul_f32_f32_neon,
        [EL_WK_F16] = el_matmul_f16_f32_neon,
        [EL_WK_Q4_0] = el_matmul_q4_0_q8_0_neon,
        [EL_WK_Q8_0] = el_matmul_q8_0_q8_0_neon,
    },
    .quantize_q8_0 = el_quantize_row_q8_0,  // the generic one: no SIMD quantizer for this ISA yet
};
