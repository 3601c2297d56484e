// SPDX-License-Identifier: MIT
// Portable f32 ops of the transformer forward, written so the baseline compiler can vectorise them.
#include "ops.h"

#include <math.h>

#include "edgellm.h"

// Independent partial sums for reductions: they break the add dependency chain and give the
// compiler lanes to vectorise without -ffast-math (16 = four 4-wide or two 8-wide vectors).
#define EL_LANES 16

// --------------------------------------------------------------------------
// Scalar building blocks (inlined into the loops below so those vectorise)

// exp(x) = 2^n * e^r with n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2] (Cody-Waite),
// e^r by a degree-7 Taylor polynomial (truncation error < 5e-9). No libm call and no branch:
// the clamps compare the float's bits as integers, because float compares may trap, which
// stops the compiler from turning them into vector selects.
static inline float el_expf_inl(float x) {
    union { float f; int32_t i; } xb = {x};
    const int32_t lo = (int32_t)0xC2AE0000u, hi = 0x42B00000;  // bits of -87.0f and 88.0f
    // Negative floats order inversely as ints: x < -87 <=> bits in (lo, 0).
    const int32_t below = -(int32_t)((xb.i > lo) & (xb.i < 0));  // all ones: clamp to -87
    xb.i = (lo & below) | (xb.i & ~below);
    const int32_t above = -(int32_t)(xb.i > hi);  // all ones: x > 88 (or NaN): clamp to 88
    xb.i = (hi & above) | (xb.i & ~above);
    x = xb.f;  // now in [-87, 88]: e^-87 ~ 1.6e-38 is normal, e^88 ~ 1.65e38 < FLT_MAX
    // Adding 1.5 * 2^23 rounds x / ln2 to an integer held in the low mantissa bits of z.
    const float z = x * 1.44269504088896341f + 12582912.0f;
    const float n = z - 12582912.0f;
    float r = x - n * 0.693145751953125f;    // ln2 high part: n * it is exact
    r = r - n * 1.42860682030941723212e-6f;  // ln2 low part
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    // 2^n: the bits of z are 0x4B400000 + n, and n + 127 in [1, 254] is a valid exponent.
    union { float f; uint32_t u; } zb = {z}, sc;
    sc.u = (zb.u - 0x4B400000u + 127u) << 23;
    return p * sc.f;
}

float el_expf(float x) { return el_expf_inl(x); }

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
uint32_t el_fp_flush_denormals(void) {
    const uint32_t saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
    return saved;
}
void el_fp_restore(uint32_t saved) { _mm_setcsr(saved); }
#elif defined(__aarch64__)
uint32_t el_fp_flush_denormals(void) {
    uint64_t fpcr;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr | (1u << 24)));  // FZ
    return (uint32_t)fpcr;
}
void el_fp_restore(uint32_t saved) {
    const uint64_t fpcr = saved;
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
}
#else
uint32_t el_fp_flush_denormals(void) { return 0; }
void el_fp_restore(uint32_t saved) { (void)saved; }
#endif

// --------------------------------------------------------------------------
// Attention

// Float bits -> an int with the same order (for non-NaN floats): negative floats flip their
// magnitude bits. Lets max run on integer compares, which vectorise (float compares may trap).
static inline int32_t el_ordered(float x) {
    union { float f; int32_t i; } b = {x};
    return b.i ^ ((b.i >> 31) & 0x7FFFFFFF);
}

float el_max(const float *x, int64_t n) {
    int32_t acc[EL_LANES];
    for (int j = 0; j < EL_LANES; j++) acc[j] = el_ordered(x[0]);
    int64_t i = 0;
    for (; i + EL_LANES <= n; i += EL_LANES)
        for (int j = 0; j < EL_LANES; j++) {
            const int32_t v = el_ordered(x[i + j]);
            acc[j] = v > acc[j] ? v : acc[j];
        }
    for (int j = 0; i < n; i++, j++) {
        const int32_t v = el_ordered(x[i]);
        acc[j] = v > acc[j] ? v : acc[j];
    }
    int32_t m = acc[0];
    for (int j = 1; j < EL_LANES; j++) m = acc[j] > m ? acc[j] : m;
    union { int32_t i; float f; } b = {m ^ ((m >> 31) & 0x7FFFFFFF)};  // the map is an involution
    return b.f;
}

float el_exp_sum(float *restrict x, int64_t n, float max, float scale) {
    for (int64_t i = 0; i < n; i++) x[i] = el_expf_inl((x[i] - max) * scale);
    float acc[EL_LANES] = {0};
    int64_t i = 0;
    for (; i + EL_LANES <= n; i += EL_LANES)
        for (int j = 0; j < EL_LANES; j++) acc[j] += x[i + j];
    for (int j = 0; i < n; i++, j++) acc[j] += x[i];  // tail: fewer than EL_LANES left
    // Pairwise reduction of the lanes.
    for (int w = EL_LANES / 2; w > 0; w /= 2)
        for (int j = 0; j < w; j++) acc[j] += acc[j + w];
    return acc[0];
}

void el_scale(float *x, float a, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] *= a;
}

void el_axpy(float *restrict y, float a, const float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

// --------------------------------------------------------------------------
// Element-wise and normalisation

void el_add_f32(float *restrict y, const float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
}

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

void el_silu_mul(float *restrict g, const float *restrict u, int64_t n) {
    for (int64_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + el_expf_inl(-g[i])) * u[i];
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
