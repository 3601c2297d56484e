// SPDX-License-Identifier: MIT
// NEON helpers shared by kernels/neon and kernels/neon_dotprod, and the slices both tables use.
#ifndef EL_NEON_H
#define EL_NEON_H

#include <arm_neon.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels.h"

// Tokens per tile: each weight row is loaded once per tile and reused for all its tokens.
#define EL_NEON_TT 4
// Activation blocks prepared once per call (8 KiB of stack): 1024 / nt per pass (32768
// columns when decoding); wider rows run in several column passes that add into y.
#define EL_NEON_PREP_BLOCKS 1024

// The NEON F32/F16 slices; the neon_dotprod table uses them too (SDOT only helps int8 dots).
void el_matmul_f32_f32_neon(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                            float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                            int64_t n_tok);
void el_matmul_f16_f32_neon(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                            float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                            int64_t n_tok);

// Blocks per column pass for nt tokens (a multiple of 4).
static inline int el_neon_pass_blocks(int nt) { return (EL_NEON_PREP_BLOCKS / nt) & ~3; }

// Prefetches [p, p + bytes) for reading.
static inline __attribute__((always_inline)) void el_neon_prefetch(const void *p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64) {
        __builtin_prefetch((const char *)p + o, 0, 2);
    }
}

// Activation facts per block, prepared once per call: [nt, pass blocks + 4] each.
typedef struct {
    float dx[EL_NEON_PREP_BLOCKS + 4 * EL_NEON_TT];  // f32 scale of the Q8_0 block
    float c[EL_NEON_PREP_BLOCKS + 4 * EL_NEON_TT];   // Q4_0 only: d_x * (-8 * sum of the block's x)
} el_neon_prep;

// Prepares blocks [cb, cb + n) of nt tokens of x (rows of x_row_bytes).
static inline void el_neon_prepare(el_neon_prep *xp, const uint8_t *x, size_t x_row_bytes, int64_t cb,
                            int n, int nt, int with_c) {
    int pb = el_neon_pass_blocks(nt);
    for (int t = 0; t < nt; t++) {
        const el_block_q8_0 *xb = (const el_block_q8_0 *)(x + (size_t)t * x_row_bytes) + cb;
        float *dx = xp->dx + t * (pb + 4), *c = xp->c + t * (pb + 4);
        for (int j = 0; j < n; j++) {
            dx[j] = el_f16_to_f32(xb[j].d);
            if (with_c) {
                int32_t sum = vaddlvq_s8(vld1q_s8(xb[j].qs)) + vaddlvq_s8(vld1q_s8(xb[j].qs + 16));
                c[j] = dx[j] * (float)(-8 * sum);
            }
        }
        for (int j = n; j < pb + 4; j++) {
            dx[j] = 0.0f;
            c[j] = 0.0f;
        }
    }
}

// f32 scales of the first gs (1..4) blocks at wb (block_bytes apart), 0 past gs.
static inline __attribute__((always_inline)) float32x4_t el_neon_dw4(const uint8_t *wb, size_t block_bytes, int gs) {
    uint16x4_t h = vdup_n_u16(0);
    switch (gs) {  // falls through: scales gs-1 .. 0
        case 4: h = vld1_lane_u16((const uint16_t *)(wb + 3 * block_bytes), h, 3); __attribute__((fallthrough));
        case 3: h = vld1_lane_u16((const uint16_t *)(wb + 2 * block_bytes), h, 2); __attribute__((fallthrough));
        case 2: h = vld1_lane_u16((const uint16_t *)(wb + block_bytes), h, 1); __attribute__((fallthrough));
        default: h = vld1_lane_u16((const uint16_t *)wb, h, 0); break;
    }
    return vcvt_f32_f16(vreinterpret_f16_u16(h));
}

// acc += s[lane] * v with the lane chosen at run time among 4 (the by-element FMA wants a constant).
static inline __attribute__((always_inline)) float32x4_t el_neon_fma_lane(float32x4_t acc, float32x4_t v, float32x4_t s, int lane) {
    switch (lane) {
        case 0: return vfmaq_laneq_f32(acc, v, s, 0);
        case 1: return vfmaq_laneq_f32(acc, v, s, 1);
        case 2: return vfmaq_laneq_f32(acc, v, s, 2);
        default: return vfmaq_laneq_f32(acc, v, s, 3);
    }
}

#endif  // EL_NEON_H
