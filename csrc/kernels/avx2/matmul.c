// SPDX-License-Identifier: MIT
// AVX2 + FMA + F16C matmul kernels; each matches the el_matmul_*_generic of its name.
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernels/avx2 needs -mavx2 -mfma -mf16c"
#endif

#include <immintrin.h>

#include "../generic/generic.h"
#include "kernels.h"

// Tokens per tile: each weight row is loaded once per tile and reused for all its tokens.
#define EL_TT 4
// Independent accumulators per token, (4 / nt): 16 ymm registers hold about 4 of them.
#define EL_SLOTS(nt) ((nt) == 1 ? 4 : (nt) == 2 ? 2 : 1)
// Rows per chunk when n_tok > EL_TT: the chunk's weights stay in L2 while every token tile
// passes over them, so weights come from DRAM once per call.
#define EL_ROW_CHUNK 64
// Activation blocks prepared once per call, on the stack (about 41 KiB for Q4_0): 1024 / nt
// blocks per pass (32768 columns when decoding, 8192 for 4-token tiles); wider rows run in
// several column passes that add into y.
#define EL_PREP_BLOCKS 1024
// Bytes ahead (rounded up to whole rows) whose weights are prefetched into L2, as in the
// AVX-512 kernels (where 4 rows streamed TinyLlama's FFN at 13 GB/s and 16 KiB at 20-22 GB/s
// on Zen 4); this kernel on the same machine: neutral to +20% over 4 rows (bench_matmul, cold).
#define EL_PF_BYTES 16384

// Prefetch distance for rows of w_row_bytes: whole rows covering at least EL_PF_BYTES.
static inline size_t el_pf_dist(size_t w_row_bytes) {
    return (EL_PF_BYTES + w_row_bytes - 1) / w_row_bytes * w_row_bytes;
}

#define EL_INLINE static inline __attribute__((always_inline))

static inline float el_hsum_ps256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Prefetches [p, p + bytes) into L2.
EL_INLINE void el_prefetch_l2(const void *p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64) {
        _mm_prefetch((const char *)p + o, _MM_HINT_T1);
    }
}

// Lanes 0..3 <- lane 2j, lanes 4..7 <- lane 2j + 1: the scales of pair j of an 8-block group.
static const int32_t el_pair_idx[4][8] __attribute__((aligned(32))) = {
    {0, 0, 0, 0, 1, 1, 1, 1}, {2, 2, 2, 2, 3, 3, 3, 3},
    {4, 4, 4, 4, 5, 5, 5, 5}, {6, 6, 6, 6, 7, 7, 7, 7},
};

// Blocks per column pass for nt tokens (a multiple of 8).
static inline int el_pass_blocks(int nt) { return (EL_PREP_BLOCKS / nt) & ~7; }

// --------------------------------------------------------------------------
// Q4_0 weights x Q8_0 activations (matches el_matmul_q4_0_q8_0_generic)
//
// Layout: blocks go in pairs (A, B). The 16 nibble bytes of A and B fill one ymm: [A | B];
// "& 0x0f" gives elements 0..15 of A and B, ">> 4 & 0x0f" elements 16..31, unsigned in
// [0, 15]. The activations of the pair are prepared once per call to match:
// x1 = [A 0..15 | B 0..15], x2 = [A 16..31 | B 16..31]. maddubs(lo, x1) + maddubs(hi, x2)
// (int16 pairs, |.| <= 2 * 2 * 15 * 127, no saturation), widened by madd(1), leaves in int32
// lanes 0..3 the exact dot of A's unsigned nibbles, in lanes 4..7 B's. The
// recentring to q - 8 is folded into f32 per block: + d_w * c with c = d_x * (-8 * sum(x)).
// Scales and corrections go 8 blocks at a time; a trailing odd block goes to the generic dot.

typedef struct {
    __m256i x1, x2;  // see above
} el_q4_0_xpair;

typedef struct {
    el_q4_0_xpair pair[EL_PREP_BLOCKS / 2];  // [nt, nb / 2]
    float dx[EL_PREP_BLOCKS + 8 * EL_TT];     // [nt, nb + 8] f32 scales (+8: whole-group loads)
    float c[EL_PREP_BLOCKS + 8 * EL_TT];      // [nt, nb + 8] d_x * (-8 * sum of the block's x)
} el_q4_0_prep;

// Prepares blocks [cb, cb + n) (n <= el_pass_blocks(nt)) of nt tokens of x.
static void el_q4_0_prepare_avx2(el_q4_0_prep *xp, const uint8_t *x, size_t x_row_bytes,
                                 int64_t cb, int n, int nt) {
    const __m256i ones = _mm256_set1_epi8(1);
    const __m256i ones16 = _mm256_set1_epi16(1);
    int pb = el_pass_blocks(nt);
    for (int t = 0; t < nt; t++) {
        const el_block_q8_0 *xb = (const el_block_q8_0 *)(x + (size_t)t * x_row_bytes) + cb;
        el_q4_0_xpair *pair = xp->pair + t * (pb / 2);
        float *dx = xp->dx + t * (pb + 8), *c = xp->c + t * (pb + 8);
        for (int j = 0; j + 1 < n; j += 2) {
            __m256i a = _mm256_loadu_si256((const __m256i *)xb[j].qs);
            __m256i b = _mm256_loadu_si256((const __m256i *)xb[j + 1].qs);
            pair[j / 2].x1 = _mm256_permute2x128_si256(a, b, 0x20);
            pair[j / 2].x2 = _mm256_permute2x128_si256(a, b, 0x31);
        }
        for (int j = 0; j < n; j++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)xb[j].qs);
            __m256i s4 = _mm256_madd_epi16(_mm256_maddubs_epi16(ones, xv), ones16);  // sums of 4
            __m128i s2 = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
            s2 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0x4e));
            int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xb1)));
            dx[j] = _cvtsh_ss(xb[j].d);
            c[j] = dx[j] * (float)(-8 * sum);
        }
        for (int j = n; j < (n & ~7) + 8; j++) {  // the last group's loads read up to here
            dx[j] = 0.0f;
            c[j] = 0.0f;
        }
    }
}

// f32 scales of the first gs (0..8) Q4_0 blocks at wb (0 past gs).
EL_INLINE __m256 el_q4_0_dw8(const el_block_q4_0 *wb, int gs) {
    __m128i h = _mm_setzero_si128();
    switch (gs) {  // falls through: insert scales gs-1 .. 0
        case 8: h = _mm_insert_epi16(h, wb[7].d, 7); __attribute__((fallthrough));
        case 7: h = _mm_insert_epi16(h, wb[6].d, 6); __attribute__((fallthrough));
        case 6: h = _mm_insert_epi16(h, wb[5].d, 5); __attribute__((fallthrough));
        case 5: h = _mm_insert_epi16(h, wb[4].d, 4); __attribute__((fallthrough));
        case 4: h = _mm_insert_epi16(h, wb[3].d, 3); __attribute__((fallthrough));
        case 3: h = _mm_insert_epi16(h, wb[2].d, 2); __attribute__((fallthrough));
        case 2: h = _mm_insert_epi16(h, wb[1].d, 1); __attribute__((fallthrough));
        case 1: h = _mm_insert_epi16(h, wb[0].d, 0); break;
        default: break;
    }
    return _mm256_cvtph_ps(h);
}

// Pair p (blocks 2p, 2p + 1, slot k of its group) of one weight row against nt tokens;
// s[t]: the group's 8 scale products for token t.
EL_INLINE void el_q4_0_pair_avx2(__m256 acc[EL_TT], const el_block_q4_0 *wr, int p, int k,
                                 const el_q4_0_xpair *pair, int pair_stride,
                                 const __m256 s[EL_TT], int nt) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i ones16 = _mm256_set1_epi16(1);
    __m128i ra = _mm_loadu_si128((const __m128i *)wr[2 * p].qs);
    __m128i rb = _mm_loadu_si128((const __m128i *)wr[2 * p + 1].qs);
    __m256i raw = _mm256_inserti128_si256(_mm256_castsi128_si256(ra), rb, 1);
    __m256i lo = _mm256_and_si256(raw, m4);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
    __m256i idx = _mm256_load_si256((const __m256i *)el_pair_idx[k]);
    for (int t = 0; t < nt; t++) {
        const el_q4_0_xpair *x = pair + t * pair_stride + p;
        __m256i q16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x->x1), _mm256_maddubs_epi16(hi, x->x2));
        __m256i q = _mm256_madd_epi16(q16, ones16);
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_permutevar8x32_ps(s[t], idx), acc[t]);
    }
}

// Rows [r0, r1) x nt tokens over blocks [cb, cb + n); y gets (accumulate: += ) the dots.
// Each row runs in groups of 8 blocks, then whole pairs of a last partial group.
EL_INLINE void el_q4_0_rows_avx2(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
                                 size_t x_row_bytes, const el_q4_0_prep *xp, float *y,
                                 int64_t y_stride, int64_t cb, int n, int64_t r0, int64_t r1,
                                 int accumulate, const int nt) {
    const int pb = el_pass_blocks(nt);
    const int n8 = n & ~7;
    const size_t pf_dist = el_pf_dist(w_row_bytes);
    for (int64_t r = r0; r < r1; r++) {
        const el_block_q4_0 *wr = (const el_block_q4_0 *)(w + (size_t)r * w_row_bytes) + cb;
        const uint8_t *pf = (const uint8_t *)wr + pf_dist;
        __m256 acc[4][EL_TT];  // [pair slot, token]: independent FMA chains
        __m256 corr[EL_TT];    // [token]: sum of d_w * c
        for (int t = 0; t < EL_TT; t++) {
            for (int k = 0; k < 4; k++) {
                acc[k][t] = _mm256_setzero_ps();
            }
            corr[t] = _mm256_setzero_ps();
        }
        __m256 s[EL_TT];
        for (int g = 0; g < n8; g += 8) {
            const uint8_t *pg = pf + (size_t)g * sizeof(el_block_q4_0);  // 144 bytes
            _mm_prefetch((const char *)pg, _MM_HINT_T1);
            _mm_prefetch((const char *)pg + 64, _MM_HINT_T1);
            _mm_prefetch((const char *)pg + 128, _MM_HINT_T1);
            __m256 dw = el_q4_0_dw8(wr + g, 8);
            for (int t = 0; t < nt; t++) {
                s[t] = _mm256_mul_ps(dw, _mm256_loadu_ps(xp->dx + t * (pb + 8) + g));
                corr[t] = _mm256_fmadd_ps(dw, _mm256_loadu_ps(xp->c + t * (pb + 8) + g), corr[t]);
            }
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                el_q4_0_pair_avx2(acc[k % EL_SLOTS(nt)], wr, g / 2 + k, k, xp->pair, pb / 2, s, nt);
            }
        }
        if (n8 + 1 < n) {  // the last 2..7 blocks: whole pairs here, an odd block below
            el_prefetch_l2(pf + (size_t)n8 * sizeof(el_block_q4_0), (size_t)(n - n8) * sizeof(el_block_q4_0));
            __m256 dw = el_q4_0_dw8(wr + n8, (n - n8) & ~1);
            for (int t = 0; t < nt; t++) {
                s[t] = _mm256_mul_ps(dw, _mm256_loadu_ps(xp->dx + t * (pb + 8) + n8));
                corr[t] = _mm256_fmadd_ps(dw, _mm256_loadu_ps(xp->c + t * (pb + 8) + n8), corr[t]);
            }
            for (int k = 0; k < (n - n8) / 2; k++) {
                el_q4_0_pair_avx2(acc[0], wr, n8 / 2 + k, k, xp->pair, pb / 2, s, nt);
            }
        }
        for (int t = 0; t < nt; t++) {
            __m256 a = _mm256_add_ps(_mm256_add_ps(acc[0][t], acc[1][t]),
                                     _mm256_add_ps(acc[2][t], acc[3][t]));
            float v = el_hsum_ps256(_mm256_add_ps(a, corr[t]));
            if (n & 1) {
                const el_block_q8_0 *xt = (const el_block_q8_0 *)(x + (size_t)t * x_row_bytes) + cb;
                v += el_vec_dot_q4_0_q8_0_generic(wr + n - 1, xt + n - 1, 1);
            }
            float *yo = y + t * y_stride + r;
            *yo = accumulate ? *yo + v : v;
        }
    }
}

// --------------------------------------------------------------------------
// Q8_0 weights x Q8_0 activations (matches el_matmul_q8_0_q8_0_generic)
//
// Layout: both blocks are 32 signed bytes in element order. maddubs takes |w| (unsigned) and x
// with w's sign; its int16 pairs stay within 2 * 128 * 127 because the activation quantizer
// never makes -128; madd(1) widens them to exact int32 partial dots. Scales per block in f32,
// gathered 8 blocks at a time.

typedef struct {
    float dx[EL_PREP_BLOCKS + 8 * EL_TT];  // [nt, nb + 8] f32 scales (+8: whole-group loads)
} el_q8_0_prep;

static void el_q8_0_prepare_avx2(el_q8_0_prep *xp, const uint8_t *x, size_t x_row_bytes,
                                 int64_t cb, int n, int nt) {
    int pb = el_pass_blocks(nt);
    for (int t = 0; t < nt; t++) {
        const el_block_q8_0 *xb = (const el_block_q8_0 *)(x + (size_t)t * x_row_bytes) + cb;
        float *dx = xp->dx + t * (pb + 8);
        for (int j = 0; j < n; j++) {
            dx[j] = _cvtsh_ss(xb[j].d);
        }
        for (int j = n; j < (n & ~7) + 8; j++) {  // the last group's loads read up to here
            dx[j] = 0.0f;
        }
    }
}

// f32 scales of the first gs (1..8) Q8_0 blocks at wb.
EL_INLINE __m256 el_q8_0_dw8(const el_block_q8_0 *wb, int gs) {
    __m128i h = _mm_setzero_si128();
    switch (gs) {  // falls through: insert scales gs-1 .. 0
        case 8: h = _mm_insert_epi16(h, wb[7].d, 7); __attribute__((fallthrough));
        case 7: h = _mm_insert_epi16(h, wb[6].d, 6); __attribute__((fallthrough));
        case 6: h = _mm_insert_epi16(h, wb[5].d, 5); __attribute__((fallthrough));
        case 5: h = _mm_insert_epi16(h, wb[4].d, 4); __attribute__((fallthrough));
        case 4: h = _mm_insert_epi16(h, wb[3].d, 3); __attribute__((fallthrough));
        case 3: h = _mm_insert_epi16(h, wb[2].d, 2); __attribute__((fallthrough));
        case 2: h = _mm_insert_epi16(h, wb[1].d, 1); __attribute__((fallthrough));
        default: h = _mm_insert_epi16(h, wb[0].d, 0); break;
    }
    return _mm256_cvtph_ps(h);
}

// Block j (slot k of its group) of one weight row against nt tokens.
EL_INLINE void el_q8_0_block_avx2(__m256 acc[EL_TT], const el_block_q8_0 *wr, int j, int k,
                                  const uint8_t *x, size_t x_row_bytes, int64_t cb,
                                  const __m256 s[EL_TT], int nt) {
    const __m256i ones16 = _mm256_set1_epi16(1);
    __m256i wv = _mm256_loadu_si256((const __m256i *)wr[j].qs);
    __m256i aw = _mm256_sign_epi8(wv, wv);
    __m256i idx = _mm256_set1_epi32(k);
    for (int t = 0; t < nt; t++) {
        const el_block_q8_0 *xb = (const el_block_q8_0 *)(x + (size_t)t * x_row_bytes) + cb + j;
        __m256i sx = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xb->qs), wv);
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones16);
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permutevar8x32_ps(s[t], idx), acc[t]);
    }
}

EL_INLINE void el_q8_0_rows_avx2(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
                                 size_t x_row_bytes, const el_q8_0_prep *xp, float *y,
                                 int64_t y_stride, int64_t cb, int n, int64_t r0, int64_t r1,
                                 int accumulate, const int nt) {
    const int pb = el_pass_blocks(nt);
    const int n8 = n & ~7;
    const size_t pf_dist = el_pf_dist(w_row_bytes);
    for (int64_t r = r0; r < r1; r++) {
        const el_block_q8_0 *wr = (const el_block_q8_0 *)(w + (size_t)r * w_row_bytes) + cb;
        const uint8_t *pf = (const uint8_t *)wr + pf_dist;
        __m256 acc[4][EL_TT];  // [slot, token]: independent FMA chains
        for (int k = 0; k < 4; k++) {
            for (int t = 0; t < EL_TT; t++) {
                acc[k][t] = _mm256_setzero_ps();
            }
        }
        __m256 s[EL_TT];
        for (int g = 0; g < n8; g += 8) {
            el_prefetch_l2(pf + (size_t)g * sizeof(el_block_q8_0), 8 * sizeof(el_block_q8_0));
            __m256 dw = el_q8_0_dw8(wr + g, 8);
            for (int t = 0; t < nt; t++) {
                s[t] = _mm256_mul_ps(dw, _mm256_loadu_ps(xp->dx + t * (pb + 8) + g));
            }
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++) {
                el_q8_0_block_avx2(acc[k % EL_SLOTS(nt)], wr, g + k, k, x, x_row_bytes, cb, s, nt);
            }
        }
        if (n8 < n) {  // a last group of 1..7 blocks
            el_prefetch_l2(pf + (size_t)n8 * sizeof(el_block_q8_0), (size_t)(n - n8) * sizeof(el_block_q8_0));
            __m256 dw = el_q8_0_dw8(wr + n8, n - n8);
            for (int t = 0; t < nt; t++) {
                s[t] = _mm256_mul_ps(dw, _mm256_loadu_ps(xp->dx + t * (pb + 8) + n8));
            }
            for (int k = 0; k < n - n8; k++) {
                el_q8_0_block_avx2(acc[0], wr, n8 + k, k, x, x_row_bytes, cb, s, nt);
            }
        }
        for (int t = 0; t < nt; t++) {
            __m256 a = _mm256_add_ps(_mm256_add_ps(acc[0][t], acc[1][t]),
                                     _mm256_add_ps(acc[2][t], acc[3][t]));
            float *yo = y + t * y_stride + r;
            *yo = accumulate ? *yo + el_hsum_ps256(a) : el_hsum_ps256(a);
        }
    }
}

// --------------------------------------------------------------------------
// F32 / F16 weights x F32 activations (match el_matmul_f32_f32_generic / _f16_f32_generic)
//
// Layout: rows of cols floats (or f16 bits, widened with vcvtph2ps), 8 columns per ymm, four
// independent accumulators per token; the last cols % 8 columns go to the generic dot.

EL_INLINE __m256 el_load_w8(const uint8_t *wr, int64_t c, int is_f16) {
    if (is_f16) {
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)wr + c)));
    }
    return _mm256_loadu_ps((const float *)wr + c);
}

EL_INLINE void el_f32_rows_avx2(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
                                size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                                int64_t r0, int64_t r1, const int is_f16, const int nt) {
    const int64_t c4 = cols & ~(int64_t)31, c1 = cols & ~(int64_t)7;
    const size_t esize = is_f16 ? sizeof(uint16_t) : sizeof(float);
    const size_t pf_dist = el_pf_dist(w_row_bytes);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + (size_t)r * w_row_bytes;
        __m256 acc[4][EL_TT];  // [slot, token]: independent FMA chains
        for (int k = 0; k < 4; k++) {
            for (int t = 0; t < EL_TT; t++) {
                acc[k][t] = _mm256_setzero_ps();
            }
        }
        for (int64_t c = 0; c < c4; c += 32) {
            el_prefetch_l2(wr + pf_dist + (size_t)c * esize, 32 * esize);
            __m256 wv[4];
            for (int k = 0; k < 4; k++) {
                wv[k] = el_load_w8(wr, c + 8 * k, is_f16);
            }
            for (int t = 0; t < nt; t++) {
                const float *xt = (const float *)(x + (size_t)t * x_row_bytes) + c;
                for (int k = 0; k < 4; k++) {
                    acc[k][t] = _mm256_fmadd_ps(wv[k], _mm256_loadu_ps(xt + 8 * k), acc[k][t]);
                }
            }
        }
        for (int64_t c = c4; c < c1; c += 8) {  // up to 3 more whole vectors
            __m256 wv = el_load_w8(wr, c, is_f16);
            for (int t = 0; t < nt; t++) {
                acc[0][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps((const float *)(x + (size_t)t * x_row_bytes) + c), acc[0][t]);
            }
        }
        for (int t = 0; t < nt; t++) {
            const float *xt = (const float *)(x + (size_t)t * x_row_bytes);
            float tail = 0.0f;
            if (c1 < cols) {  // no call for rows of whole vectors (attention's head_dim rows)
                tail = is_f16 ? el_vec_dot_f16_f32_generic((const uint16_t *)wr + c1, xt + c1, cols - c1)
                              : el_vec_dot_f32_f32_generic((const float *)wr + c1, xt + c1, cols - c1);
            }
            __m256 a = _mm256_add_ps(_mm256_add_ps(acc[0][t], acc[1][t]), _mm256_add_ps(acc[2][t], acc[3][t]));
            y[t * y_stride + r] = el_hsum_ps256(a) + tail;
        }
    }
}

// --------------------------------------------------------------------------
// Drivers: token tiles of constant size (so tile bodies unroll and keep accumulators in
// registers), row chunks for batched calls, column chunks for the prepared activations.

static void el_q4_0_part_avx2(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
                              size_t x_row_bytes, float *y, int64_t y_stride, int64_t nb,
                              int64_t r0, int64_t r1, int nt) {
    el_q4_0_prep xp;
    int pb = el_pass_blocks(nt);
    for (int64_t cb = 0; cb < nb; cb += pb) {
        int n = nb - cb < pb ? (int)(nb - cb) : pb;
        el_q4_0_prepare_avx2(&xp, x, x_row_bytes, cb, n, nt);
        int acc = cb > 0;
        switch (nt) {
            case 1: el_q4_0_rows_avx2(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 1); break;
            case 2: el_q4_0_rows_avx2(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 2); break;
            case 3: el_q4_0_rows_avx2(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 3); break;
            default: el_q4_0_rows_avx2(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 4); break;
        }
    }
}

static void el_q8_0_part_avx2(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
                              size_t x_row_bytes, float *y, int64_t y_stride, int64_t nb,
                              int64_t r0, int64_t r1, int nt) {
    el_q8_0_prep xp;
    int pb = el_pass_blocks(nt);
    for (int64_t cb = 0; cb < nb; cb += pb) {
        int n = nb - cb < pb ? (int)(nb - cb) : pb;
        el_q8_0_prepare_avx2(&xp, x, x_row_bytes, cb, n, nt);
        int acc = cb > 0;
        switch (nt) {
            case 1: el_q8_0_rows_avx2(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 1); break;
            case 2: el_q8_0_rows_avx2(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 2); break;
            case 3: el_q8_0_rows_avx2(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 3); break;
            default: el_q8_0_rows_avx2(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 4); break;
        }
    }
}

static void el_f32_part_avx2(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
                             size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                             int64_t r0, int64_t r1, int is_f16, int nt) {
    switch (nt * 2 + is_f16) {
        case 2: el_f32_rows_avx2(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 0, 1); break;
        case 3: el_f32_rows_avx2(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 1, 1); break;
        case 4: el_f32_rows_avx2(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 0, 2); break;
        case 5: el_f32_rows_avx2(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 1, 2); break;
        case 6: el_f32_rows_avx2(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 0, 3); break;
        case 7: el_f32_rows_avx2(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 1, 3); break;
        case 8: el_f32_rows_avx2(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 0, 4); break;
        default: el_f32_rows_avx2(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 1, 4); break;
    }
}

enum { EL_K_F32, EL_K_F16, EL_K_Q4_0, EL_K_Q8_0 };

static void el_matmul_avx2(int kind, const void *w, size_t w_row_bytes, const void *x,
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
            if (kind == EL_K_Q4_0) {
                el_q4_0_part_avx2(wb, w_row_bytes, xt, x_row_bytes, yt, y_stride, cols / EL_QK, rc, rc_end, nt);
            } else if (kind == EL_K_Q8_0) {
                el_q8_0_part_avx2(wb, w_row_bytes, xt, x_row_bytes, yt, y_stride, cols / EL_QK, rc, rc_end, nt);
            } else {
                el_f32_part_avx2(wb, w_row_bytes, xt, x_row_bytes, yt, y_stride, cols, rc, rc_end, kind == EL_K_F16, nt);
            }
        }
    }
}

void el_matmul_f32_f32_avx2(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                            float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                            int64_t n_tok) {
    el_matmul_avx2(EL_K_F32, w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, n_tok);
}

void el_matmul_f16_f32_avx2(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                            float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                            int64_t n_tok) {
    el_matmul_avx2(EL_K_F16, w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, n_tok);
}

void el_matmul_q4_0_q8_0_avx2(const void *w, size_t w_row_bytes, const void *x,
                              size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                              int64_t r0, int64_t r1, int64_t n_tok) {
    el_matmul_avx2(EL_K_Q4_0, w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, n_tok);
}

void el_matmul_q8_0_q8_0_avx2(const void *w, size_t w_row_bytes, const void *x,
                              size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                              int64_t r0, int64_t r1, int64_t n_tok) {
    el_matmul_avx2(EL_K_Q8_0, w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, n_tok);
}

const el_kernel_table el_kernels_avx2 = {
    .isa = EDGELLM_ISA_AVX2,
    .name = "avx2",
    .matmul = {
        [EL_WK_F32] = el_matmul_f32_f32_avx2,
        [EL_WK_F16] = el_matmul_f16_f32_avx2,
        [EL_WK_Q4_0] = el_matmul_q4_0_q8_0_avx2,
        [EL_WK_Q8_0] = el_matmul_q8_0_q8_0_avx2,
    },
    .quantize_q8_0 = el_quantize_row_q8_0,  // the generic one: no SIMD quantizer for this ISA yet
};
