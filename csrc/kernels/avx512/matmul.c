// SPDX-License-Identifier: MIT
// AVX-512 (F/BW/VL/DQ + VNNI) matmul kernels; each matches the el_matmul_*_generic of its name.
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512VNNI__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernels/avx512 needs -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mfma -mf16c"
#endif

#include <immintrin.h>

#include "../generic/generic.h"
#include "kernels.h"

// Tokens per tile: each weight row is loaded once per tile and reused for all its tokens.
#define EL_TT 4
// Row chunks when n_tok > EL_TT: each chunk's weights stay in L2 while every token tile passes
// over them, so weights come from DRAM once per call. A chunk is EL_CHUNK_BYTES of weights
// (half of Zen 4's 1 MiB L2; short rows then re-prepare the activations less often, 3-5%
// on SmolLM's 576-column prefill matmuls), at least EL_ROW_CHUNK rows.
#define EL_CHUNK_BYTES 262144
#define EL_ROW_CHUNK 64
// Activation blocks prepared once per call, on the stack (about 41 KiB for Q4_0): 1024 / nt
// blocks per pass (32768 columns when decoding, 8192 for 4-token tiles); wider rows run in
// several column passes that add into y.
#define EL_PREP_BLOCKS 1024
// Bytes ahead (rounded up to whole rows) whose weights are prefetched into L2: one core needs
// many misses in flight to reach DRAM bandwidth; 4 rows (4.5-12 KiB) streamed at 13 GB/s on
// Zen 4 for TinyLlama's FFN rows, 16 KiB at 20-22 GB/s (bench_matmul, cold).
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
// x1 = [A 0..15 | B 0..15], x2 = [A 16..31 | B 16..31], so dpbusd(dpbusd(0, lo, x1), hi, x2)
// leaves in int32 lanes 0..3 the exact dot of A's unsigned nibbles, in lanes 4..7 B's. The
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
static void el_q4_0_prepare_avx512(el_q4_0_prep *xp, const uint8_t *x, size_t x_row_bytes,
                                   int64_t cb, int n, int nt) {
    const __m256i ones = _mm256_set1_epi8(1);
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
            __m256i s4 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, xv);  // sums of 4
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

// f32 scales of the first gs (0..8) Q4_0 blocks at wb (0 past gs): the f16 words sit every 9
// words, so two 64-byte loads (masked, never past block gs) and one word permute gather them.
EL_INLINE __m256 el_q4_0_dw8(const el_block_q4_0 *wb, int gs) {
    const __m512i idx = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                         0, 0, 0, 0, 0, 63, 54, 45, 36, 27, 18, 9, 0);
    unsigned n = 18u * (unsigned)gs;  // bytes of the gs blocks
    __mmask64 m0 = n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
    __mmask64 m1 = n >= 128 ? ~(__mmask64)0 : n > 64 ? (((__mmask64)1 << (n - 64)) - 1) : 0;
    __m512i a = _mm512_maskz_loadu_epi8(m0, wb);
    __m512i b = _mm512_maskz_loadu_epi8(m1, (const uint8_t *)wb + 64);
    __m512i d = _mm512_permutex2var_epi16(a, idx, b);
    return _mm256_cvtph_ps(_mm512_castsi512_si128(d));
}

// Pair p (blocks 2p, 2p + 1, slot k of its group) of one weight row against nt tokens;
// s[t]: the group's 8 scale products for token t.
EL_INLINE void el_q4_0_pair_avx512(__m256 acc[EL_TT], const el_block_q4_0 *wr, int p, int k,
                                   const el_q4_0_xpair *pair, int pair_stride,
                                   const __m256 s[EL_TT], int nt) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m128i ra = _mm_loadu_si128((const __m128i *)wr[2 * p].qs);
    __m128i rb = _mm_loadu_si128((const __m128i *)wr[2 * p + 1].qs);
    __m256i raw = _mm256_inserti128_si256(_mm256_castsi128_si256(ra), rb, 1);
    __m256i lo = _mm256_and_si256(raw, m4);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
    __m256i idx = _mm256_load_si256((const __m256i *)el_pair_idx[k]);
    for (int t = 0; t < nt; t++) {
        const el_q4_0_xpair *x = pair + t * pair_stride + p;
        __m256i q = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, x->x1), hi, x->x2);
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_permutexvar_ps(idx, s[t]), acc[t]);
    }
}

// Rows [r0, r1) x nt tokens over blocks [cb, cb + n); y gets (accumulate: += ) the dots.
// Each row runs in groups of 8 blocks, then whole pairs of a last partial group.
EL_INLINE void el_q4_0_rows_avx512(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
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
                el_q4_0_pair_avx512(acc[k], wr, g / 2 + k, k, xp->pair, pb / 2, s, nt);
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
                el_q4_0_pair_avx512(acc[0], wr, n8 / 2 + k, k, xp->pair, pb / 2, s, nt);
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
// Layout: both blocks are 32 signed bytes in element order. Flipping the weights' sign bit
// gives w + 128 in [0, 255] for dpbusd; the accumulator starts with -128 * sum(x) in lane 0
// (prepared once per call), so the int32 lanes sum to the exact dot. Scales per block in f32,
// gathered 8 blocks at a time.

typedef struct {
    int32_t off[EL_PREP_BLOCKS];         // [nt, nb] -128 * sum of the block's x
    float dx[EL_PREP_BLOCKS + 8 * EL_TT];  // [nt, nb + 8] f32 scales (+8: whole-group loads)
} el_q8_0_prep;

static void el_q8_0_prepare_avx512(el_q8_0_prep *xp, const uint8_t *x, size_t x_row_bytes,
                                   int64_t cb, int n, int nt) {
    const __m256i ones = _mm256_set1_epi8(1);
    int pb = el_pass_blocks(nt);
    for (int t = 0; t < nt; t++) {
        const el_block_q8_0 *xb = (const el_block_q8_0 *)(x + (size_t)t * x_row_bytes) + cb;
        int32_t *off = xp->off + t * pb;
        float *dx = xp->dx + t * (pb + 8);
        for (int j = 0; j < n; j++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)xb[j].qs);
            __m256i s4 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, xv);  // sums of 4
            __m128i s2 = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
            s2 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0x4e));
            off[j] = -128 * _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xb1)));
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
EL_INLINE void el_q8_0_block_avx512(__m256 acc[EL_TT], const el_block_q8_0 *wr, int j, int k,
                                    const uint8_t *x, size_t x_row_bytes, int64_t cb,
                                    const int32_t *off, int off_stride, const __m256 s[EL_TT],
                                    int nt) {
    const __m256i sign = _mm256_set1_epi8((char)0x80);
    __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)wr[j].qs), sign);
    __m256i idx = _mm256_set1_epi32(k);
    for (int t = 0; t < nt; t++) {
        const el_block_q8_0 *xb = (const el_block_q8_0 *)(x + (size_t)t * x_row_bytes) + cb + j;
        __m256i init = _mm256_castsi128_si256(_mm_cvtsi32_si128(off[t * off_stride + j]));
        __m256i p = _mm256_dpbusd_epi32(init, q, _mm256_loadu_si256((const __m256i *)xb->qs));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permutexvar_ps(idx, s[t]), acc[t]);
    }
}

EL_INLINE void el_q8_0_rows_avx512(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
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
                el_q8_0_block_avx512(acc[k & 3], wr, g + k, k, x, x_row_bytes, cb, xp->off, pb, s, nt);
            }
        }
        if (n8 < n) {  // a last group of 1..7 blocks
            el_prefetch_l2(pf + (size_t)n8 * sizeof(el_block_q8_0), (size_t)(n - n8) * sizeof(el_block_q8_0));
            __m256 dw = el_q8_0_dw8(wr + n8, n - n8);
            for (int t = 0; t < nt; t++) {
                s[t] = _mm256_mul_ps(dw, _mm256_loadu_ps(xp->dx + t * (pb + 8) + n8));
            }
            for (int k = 0; k < n - n8; k++) {
                el_q8_0_block_avx512(acc[0], wr, n8 + k, k, x, x_row_bytes, cb, xp->off, pb, s, nt);
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
// Layout: rows of cols floats (or f16 bits, widened with vcvtph2ps), 16 columns per zmm; short
// rows go four at a time (see el_f32_rows4_avx512), long rows one at a time with four
// independent accumulators per token. The last cols % 16 columns (if any) go to the generic dot.

EL_INLINE __m512 el_load_w16(const uint8_t *wr, int64_t c, int is_f16) {
    if (is_f16) {
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)wr + c)));
    }
    return _mm512_loadu_ps((const float *)wr + c);
}

// Four row sums at once: lane i of the result = sum of the 16 lanes of v[i].
EL_INLINE __m128 el_hsum4_ps512(const __m512 v[4]) {
    __m256 h[4];
    for (int i = 0; i < 4; i++) {
        h[i] = _mm256_add_ps(_mm512_castps512_ps256(v[i]),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[i]), 1)));
    }
    __m256 q = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
    return _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1));
}

// One row at a time, four independent accumulators per token (long rows, leftover rows).
EL_INLINE void el_f32_rows_avx512(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
                                  size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                                  int64_t r0, int64_t r1, const int is_f16, const int nt) {
    const int64_t c4 = cols & ~(int64_t)63, c1 = cols & ~(int64_t)15;
    const size_t esize = is_f16 ? sizeof(uint16_t) : sizeof(float);
    const size_t pf_dist = el_pf_dist(w_row_bytes);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + (size_t)r * w_row_bytes;
        __m512 acc[4][EL_TT];  // [slot, token]: independent FMA chains
        for (int k = 0; k < 4; k++) {
            for (int t = 0; t < EL_TT; t++) {
                acc[k][t] = _mm512_setzero_ps();
            }
        }
        for (int64_t c = 0; c < c4; c += 64) {
            el_prefetch_l2(wr + pf_dist + (size_t)c * esize, 64 * esize);
            __m512 wv[4];
            for (int k = 0; k < 4; k++) {
                wv[k] = el_load_w16(wr, c + 16 * k, is_f16);
            }
            for (int t = 0; t < nt; t++) {
                const float *xt = (const float *)(x + (size_t)t * x_row_bytes) + c;
                for (int k = 0; k < 4; k++) {
                    acc[k][t] = _mm512_fmadd_ps(wv[k], _mm512_loadu_ps(xt + 16 * k), acc[k][t]);
                }
            }
        }
        for (int64_t c = c4; c < c1; c += 16) {  // up to 3 more whole vectors
            __m512 wv = el_load_w16(wr, c, is_f16);
            for (int t = 0; t < nt; t++) {
                acc[0][t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps((const float *)(x + (size_t)t * x_row_bytes) + c), acc[0][t]);
            }
        }
        for (int t = 0; t < nt; t++) {
            const float *xt = (const float *)(x + (size_t)t * x_row_bytes);
            float tail = 0.0f;
            if (c1 < cols) {
                tail = is_f16 ? el_vec_dot_f16_f32_generic((const uint16_t *)wr + c1, xt + c1, cols - c1)
                              : el_vec_dot_f32_f32_generic((const float *)wr + c1, xt + c1, cols - c1);
            }
            __m512 a = _mm512_add_ps(_mm512_add_ps(acc[0][t], acc[1][t]), _mm512_add_ps(acc[2][t], acc[3][t]));
            y[t * y_stride + r] = _mm512_reduce_add_ps(a) + tail;
        }
    }
}

// Four rows at a time (short rows: attention's head_dim-long keys, position-long values):
// one accumulator per (row, token), each x vector loaded once for the four rows, and the
// four rows of a token reduced together into one 4-lane vector of sums.
EL_INLINE void el_f32_rows4_avx512(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
                                   size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                                   int64_t r0, int64_t r1, const int is_f16, const int nt) {
    const int64_t c1 = cols & ~(int64_t)15;
    for (int64_t r = r0; r + 4 <= r1; r += 4) {
        const uint8_t *wr = w + (size_t)r * w_row_bytes;
        __m512 acc[EL_TT][4];  // [token, row]
        for (int t = 0; t < EL_TT; t++) {
            for (int i = 0; i < 4; i++) {
                acc[t][i] = _mm512_setzero_ps();
            }
        }
        for (int64_t c = 0; c < c1; c += 16) {
            __m512 wv[4];
            for (int i = 0; i < 4; i++) {
                wv[i] = el_load_w16(wr + (size_t)i * w_row_bytes, c, is_f16);
            }
            for (int t = 0; t < nt; t++) {
                __m512 xv = _mm512_loadu_ps((const float *)(x + (size_t)t * x_row_bytes) + c);
                for (int i = 0; i < 4; i++) {
                    acc[t][i] = _mm512_fmadd_ps(wv[i], xv, acc[t][i]);
                }
            }
        }
        for (int t = 0; t < nt; t++) {
            __m128 v = el_hsum4_ps512(acc[t]);
            if (c1 < cols) {
                const float *xt = (const float *)(x + (size_t)t * x_row_bytes);
                float tail[4];
                for (int i = 0; i < 4; i++) {
                    const uint8_t *wi = wr + (size_t)i * w_row_bytes;
                    tail[i] = is_f16 ? el_vec_dot_f16_f32_generic((const uint16_t *)wi + c1, xt + c1, cols - c1)
                                     : el_vec_dot_f32_f32_generic((const float *)wi + c1, xt + c1, cols - c1);
                }
                v = _mm_add_ps(v, _mm_loadu_ps(tail));
            }
            _mm_storeu_ps(y + t * y_stride + r, v);
        }
    }
}

// --------------------------------------------------------------------------
// Drivers: token tiles of constant size (so tile bodies unroll and keep accumulators in
// registers), row chunks for batched calls, column chunks for the prepared activations.

static void el_q4_0_part_avx512(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
                                size_t x_row_bytes, float *y, int64_t y_stride, int64_t nb,
                                int64_t r0, int64_t r1, int nt) {
    el_q4_0_prep xp;
    int pb = el_pass_blocks(nt);
    for (int64_t cb = 0; cb < nb; cb += pb) {
        int n = nb - cb < pb ? (int)(nb - cb) : pb;
        el_q4_0_prepare_avx512(&xp, x, x_row_bytes, cb, n, nt);
        int acc = cb > 0;
        switch (nt) {
            case 1: el_q4_0_rows_avx512(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 1); break;
            case 2: el_q4_0_rows_avx512(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 2); break;
            case 3: el_q4_0_rows_avx512(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 3); break;
            default: el_q4_0_rows_avx512(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 4); break;
        }
    }
}

static void el_q8_0_part_avx512(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
                                size_t x_row_bytes, float *y, int64_t y_stride, int64_t nb,
                                int64_t r0, int64_t r1, int nt) {
    el_q8_0_prep xp;
    int pb = el_pass_blocks(nt);
    for (int64_t cb = 0; cb < nb; cb += pb) {
        int n = nb - cb < pb ? (int)(nb - cb) : pb;
        el_q8_0_prepare_avx512(&xp, x, x_row_bytes, cb, n, nt);
        int acc = cb > 0;
        switch (nt) {
            case 1: el_q8_0_rows_avx512(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 1); break;
            case 2: el_q8_0_rows_avx512(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 2); break;
            case 3: el_q8_0_rows_avx512(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 3); break;
            default: el_q8_0_rows_avx512(w, w_row_bytes, x, x_row_bytes, &xp, y, y_stride, cb, n, r0, r1, acc, 4); break;
        }
    }
}

// Rows up to this long go four at a time (the whole row's accumulators stay in registers and
// the per-output horizontal sum dominates); longer rows one at a time with prefetch.
#define EL_F32_SHORT_COLS 1024

static void el_f32_part_avx512(const uint8_t *w, size_t w_row_bytes, const uint8_t *x,
                               size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                               int64_t r0, int64_t r1, int is_f16, int nt) {
    if (cols <= EL_F32_SHORT_COLS && r1 - r0 >= 4) {
        int64_t r4 = r0 + ((r1 - r0) & ~(int64_t)3);
        switch (nt * 2 + is_f16) {
            case 2: el_f32_rows4_avx512(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r4, 0, 1); break;
            case 3: el_f32_rows4_avx512(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r4, 1, 1); break;
            case 4: el_f32_rows4_avx512(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r4, 0, 2); break;
            case 5: el_f32_rows4_avx512(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r4, 1, 2); break;
            case 6: el_f32_rows4_avx512(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r4, 0, 3); break;
            case 7: el_f32_rows4_avx512(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r4, 1, 3); break;
            case 8: el_f32_rows4_avx512(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r4, 0, 4); break;
            default: el_f32_rows4_avx512(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r4, 1, 4); break;
        }
        r0 = r4;
    }
    switch (nt * 2 + is_f16) {
        case 2: el_f32_rows_avx512(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 0, 1); break;
        case 3: el_f32_rows_avx512(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 1, 1); break;
        case 4: el_f32_rows_avx512(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 0, 2); break;
        case 5: el_f32_rows_avx512(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 1, 2); break;
        case 6: el_f32_rows_avx512(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 0, 3); break;
        case 7: el_f32_rows_avx512(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 1, 3); break;
        case 8: el_f32_rows_avx512(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 0, 4); break;
        default: el_f32_rows_avx512(w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, 1, 4); break;
    }
}

enum { EL_K_F32, EL_K_F16, EL_K_Q4_0, EL_K_Q8_0 };

static void el_matmul_avx512(int kind, const void *w, size_t w_row_bytes, const void *x,
                             size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                             int64_t r0, int64_t r1, int64_t n_tok) {
    const uint8_t *wb = (const uint8_t *)w;
    const uint8_t *xb = (const uint8_t *)x;
    int64_t chunk = r1 - r0;
    if (n_tok > EL_TT) {
        chunk = (int64_t)(EL_CHUNK_BYTES / w_row_bytes) & ~(int64_t)15;
        chunk = chunk < EL_ROW_CHUNK ? EL_ROW_CHUNK : chunk;
    }
    for (int64_t rc = r0; rc < r1; rc += chunk) {
        int64_t rc_end = rc + chunk < r1 ? rc + chunk : r1;
        for (int64_t t = 0; t < n_tok; t += EL_TT) {
            int nt = n_tok - t < EL_TT ? (int)(n_tok - t) : EL_TT;
            const uint8_t *xt = xb + (size_t)t * x_row_bytes;
            float *yt = y + t * y_stride;
            if (kind == EL_K_Q4_0) {
                el_q4_0_part_avx512(wb, w_row_bytes, xt, x_row_bytes, yt, y_stride, cols / EL_QK, rc, rc_end, nt);
            } else if (kind == EL_K_Q8_0) {
                el_q8_0_part_avx512(wb, w_row_bytes, xt, x_row_bytes, yt, y_stride, cols / EL_QK, rc, rc_end, nt);
            } else {
                el_f32_part_avx512(wb, w_row_bytes, xt, x_row_bytes, yt, y_stride, cols, rc, rc_end, kind == EL_K_F16, nt);
            }
        }
    }
}

void el_matmul_f32_f32_avx512(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                              float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                              int64_t n_tok) {
    el_matmul_avx512(EL_K_F32, w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, n_tok);
}

void el_matmul_f16_f32_avx512(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                              float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                              int64_t n_tok) {
    el_matmul_avx512(EL_K_F16, w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, n_tok);
}

void el_matmul_q4_0_q8_0_avx512(const void *w, size_t w_row_bytes, const void *x,
                                size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                                int64_t r0, int64_t r1, int64_t n_tok) {
    el_matmul_avx512(EL_K_Q4_0, w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, n_tok);
}

void el_matmul_q8_0_q8_0_avx512(const void *w, size_t w_row_bytes, const void *x,
                                size_t x_row_bytes, float *y, int64_t y_stride, int64_t cols,
                                int64_t r0, int64_t r1, int64_t n_tok) {
    el_matmul_avx512(EL_K_Q8_0, w, w_row_bytes, x, x_row_bytes, y, y_stride, cols, r0, r1, n_tok);
}

const el_kernel_table el_kernels_avx512 = {
    .isa = EDGELLM_ISA_AVX512,
    .name = "avx512",
    .matmul = {
        [EL_WK_F32] = el_matmul_f32_f32_avx512,
        [EL_WK_F16] = el_matmul_f16_f32_avx512,
        [EL_WK_Q4_0] = el_matmul_q4_0_q8_0_avx512,
        [EL_WK_Q8_0] = el_matmul_q8_0_q8_0_avx512,
    },
    .quantize_q8_0 = el_quantize_row_q8_0_avx512,
};
