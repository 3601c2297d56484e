// SPDX-License-Identifier: MIT
// AVX-512 activation quantizer; byte-exact with el_quantize_row_q8_0 (generic/quants.c).
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__)
#error "kernels/avx512 needs -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mfma -mf16c"
#endif

#include <immintrin.h>

#include "kernels.h"

// Layout: one block's 32 floats in two zmm. The scale is computed in scalar f32 exactly as the
// generic one (amax / 127, 1 / d); q = round-half-away(x * id) as trunc(|v|) + (|v| - trunc >=
// 0.5) with v's sign, 0 where |v| >= 256 or NaN, then narrowed to int8 like the generic cast.
static inline __m512i el_round_half_away16(__m512 v) {
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    __m512 a = _mm512_and_ps(v, abs_mask);
    __m512 t = _mm512_roundscale_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(a, t), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    t = _mm512_mask_add_ps(t, up, t, _mm512_set1_ps(1.0f));
    __mmask16 ok = _mm512_cmp_ps_mask(a, _mm512_set1_ps(256.0f), _CMP_LT_OQ);
    __m512i i = _mm512_maskz_cvttps_epi32(ok, t);
    __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_mask_sub_epi32(i, neg, _mm512_setzero_si512(), i);
}

void el_quantize_row_q8_0_avx512(const float *x, el_block_q8_0 *y, int64_t n) {
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    int64_t nb = n / EL_QK;
    for (int64_t b = 0; b < nb; b++) {
        __m512 v0 = _mm512_loadu_ps(x + b * EL_QK);
        __m512 v1 = _mm512_loadu_ps(x + b * EL_QK + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(v0, abs_mask),
                                                        _mm512_and_ps(v1, abs_mask)));
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = el_f32_to_f16(d);
        __m512 vid = _mm512_set1_ps(id);
        __m128i q0 = _mm512_cvtepi32_epi8(el_round_half_away16(_mm512_mul_ps(v0, vid)));
        __m128i q1 = _mm512_cvtepi32_epi8(el_round_half_away16(_mm512_mul_ps(v1, vid)));
        _mm_storeu_si128((__m128i *)y[b].qs, q0);
        _mm_storeu_si128((__m128i *)(y[b].qs + 16), q1);
    }
}
