// SPDX-License-Identifier: MIT
// Armv8.2-A SDOT matmul kernels for Q4_0/Q8_0; each matches the el_matmul_*_generic of its name.
#if !defined(__ARM_FEATURE_DOTPROD) || !defined(__aarch64__)
#error "kernels/neon_dotprod needs -march=armv8.2-a+dotprod"
#endif

#include <arm_neon.h>

#include "../generic/generic.h"
#include "kernels.h"
#include "../neon/neon.h"

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
// Layout: a block's 16 nibble bytes give elements 0..15 (& 0x0f) and 16..31 (>> 4), in
// [0, 15], against the Q8_0 block's two 16-byte halves; two SDOTs leave exact int32 partial
// dots in 4 lanes. The recentring to q - 8 is folded into f32 per block: + d_w * c with
// c = d_x * (-8 * sum(x)). Blocks go 4 at a time, so one f16 -> f32 conversion covers 4 scales.

EL_INLINE void el_q4_0_block_neon_dotprod(float32x4_t acc[EL_TT], const el_block_q4_0 *wb,
                                          const uint8_t *x, size_t x_row_bytes, int64_t j,
                                          const float32x4_t s[EL_TT], int lane, int nt) {
    uint8x16_t raw = vld1q_u8(wb->qs);
    int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(0x0f)));
    int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
    for (int t = 0; t < nt; t++) {
        const el_block_q8_0 *xb = (const el_block_q8_0 *)(x + (size_t)t * x_row_bytes) + j;
        int32x4_t q = vdotq_s32(vdupq_n_s32(0), lo, vld1q_s8(xb->qs));
        q = vdotq_s32(q, hi, vld1q_s8(xb->qs + 16));
        acc[t] = el_neon_fma_lane(acc[t], vcvtq_f32_s32(q), s[t], lane);
    }
}

// --------------------------------------------------------------------------
// Q8_0 weights x Q8_0 activations (matches el_matmul_q8_0_q8_0_generic)
//
// Layout: both blocks are 32 signed bytes in element order; two SDOTs give exact int32
// partial dots in 4 lanes.

EL_INLINE void el_q8_0_block_neon_dotprod(float32x4_t acc[EL_TT], const el_block_q8_0 *wb,
                                          const uint8_t *x, size_t x_row_bytes, int64_t j,
                                          const float32x4_t s[EL_TT], int lane, int nt) {
    int8x16_t w0 = vld1q_s8(wb->qs), w1 = vld1q_s8(wb->qs + 16);
    for (int t = 0; t < nt; t++) {
        const el_block_q8_0 *xb = (const el_block_q8_0 *)(x + (size_t)t * x_row_bytes) + j;
        int32x4_t q = vdotq_s32(vdupq_n_s32(0), w0, vld1q_s8(xb->qs));
        q = vdotq_s32(q, w1, vld1q_s8(xb->qs + 16));
        acc[t] = el_neon_fma_lane(acc[t], vcvtq_f32_s32(q), s[t], lane);
    }
}

// --------------------------------------------------------------------------
// Rows [r0, r1) x nt tokens over blocks [cb, cb + n) of a Q4_0 (q4 = 1) or Q8_0 matrix; y gets
// (accumulate: += ) the dots. Each row runs in groups of 4 blocks, the last one partial.

EL_INLINE void el_quant_rows_neon_dotprod(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
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
                        el_q4_0_block_neon_dotprod(acc[k % EL_SLOTS(nt)], (const el_block_q4_0 *)wb, xc, x_row_bytes, g + k, s, k, nt);
                    } else {
                        el_q8_0_block_neon_dotprod(acc[k % EL_SLOTS(nt)], (const el_block_q8_0 *)wb, xc, x_row_bytes, g + k, s, k, nt);
                    }
                }
            } else {
                for (int k = 0; k < gs; k++) {
                    const uint8_t *wb = wr + (size_t)(g + k) * bb;
                    if (q4) {
                        el_q4_0_block_neon_dotprod(acc[0], (const el_block_q4_0 *)wb, xc, x_row_bytes, g + k, s, k, nt);
                    } else {
                        el_q8_0_block_neon_dotprod(acc[0], (const el_block_q8_0 *)wb, xc, x_row_bytes, g + k, s, k, nt);
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

static void el_quant_part_neon_dotprod(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
                                       size_t x_row_bytes, float *y, int64_t y_stride, int64_t nb,
                                       int64_t r0, int64_t r1, int q4, int nt) {
    el_neon_prep xp;
    int pb = el_neon_pass_blocks(nt);
    for (int64_t cb = 0; cb < nb; cb += pb) {
        int n = nb - cb < pb ? (int)(nb - cb) : pb;
        el_neon_prepare(&xp, x, x_row_bytes, cb, n, nt, q4);
        int acc = cb > 0;
        switch (nt * 2 + q4) {
            case 2: el_quant_rows_neon_dotprod(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 0, 1); break;
            case 3: el_quant_rows_neon_dotprod(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 1, 1); break;
            case 4: el_quant_rows_neon_dotprod(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 0, 2); break;
            case 5: el_quant_rows_neon_dotprod(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 1, 2); break;
            case 6: el_quant_rows_neon_dotprod(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 0, 3); break;
            case 7: el_quant_rows_neon_dotprod(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 1, 3); break;
            case 8: el_quant_rows_neon_dotprod(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 0, 4); break;
            default: el_quant_rows_neon_dotprod(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 1, 4); break;
        }
    }
}

// --------------------------------------------------------------------------
// Drivers: token tiles of constant size, row chunks for batched calls. F32/F16 weights use
// the NEON kernels (SDOT does not help them).

enum { EL_K_Q4_0, EL_K_Q8_0 };

static void el_matmul_neon_dotprod(int kind, const void *w, size_t w_row_bytes, const void *x,
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
            el_quant_part_neon_dotprod(wb, w_row_bytes, xt, x_row_bytes, yt, y_stride, cols / EL_QK, rc, rc_end, kind == EL_K_Q4_0, nt);
        }
    }
}

void el_matmul_q4_0_q8_0_neon_dotprod(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                                      float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                                      int64_t n_tok) {
    el_matmul_neon_dotprod(EL_K_Q4_0, w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, n_tok);
}

void el_matmul_q8_0_q8_0_neon_dotprod(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                                      float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                                      int64_t n_tok) {
    el_matmul_neon_dotprod(EL_K_Q8_0, w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, n_tok);
}

const el_kernel_table el_kernels_neon_dotprod = {
    .isa = EDGELLM_ISA_NEON_DOTPROD,
    .name = "neon_dotprod",
    .matmul = {
        [EL_WK_F32] = el_matmul_f32_f32_neon,
        [EL_WK_F16] = el_matmul_f16_f32_neon,
        [EL_WK_Q4_0] = el_matmul_q4_0_q8_0_neon_dotprod,
        [EL_WK_Q8_0] = el_matmul_q8_0_q8_0_neon_dotprod,
    },
    .quantize_q8_0 = el_quantize_row_q8_0,  // the generic one: no SIMD quantizer for this ISA yet
};
