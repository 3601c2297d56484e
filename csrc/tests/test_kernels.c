// SPDX-License-Identifier: MIT
// C-only kernel tests: f16, the quantizers, ISA selection, and every usable ISA's matmul vs generic.
#include <math.h>

#include "edgellm.h"
#include "el_test.h"
#include "generic/generic.h"
#include "kernels.h"

// Float kernels sum in another order than generic (which sums F32/F16 in double): the
// difference stays below ~(cols / lanes + log2(lanes)) f32 ulps of sum |w x|, under 2e-5 of
// it for 4096 columns and 8-32 lanes.
#define EL_TOL_DOT_REL 2e-5
// Quantised tolerance case: same bound, the per-block f32 scale products add one rounding.
#define EL_TOL_QDOT_REL 2e-5

// Exact-case data: block scales are powers of two in {1/2, 1}, so scale products are
// multiples of 1/4; "full" blocks use the whole int8/int4 range (saturation edges), the
// others |q| <= 8. EL_FULL_Q8 / EL_FULL_Q4 full blocks per row keep every partial sum of any
// summation order below 2^24 quarter units for cols <= 4096 (exactly representable in f32).
#define EL_FULL_Q8 4
#define EL_FULL_Q4 16
#define EL_MAX_EXACT_COLS 4096

static const int64_t el_rows_list[] = {1, 7, 33};
static const int64_t el_tok_list[] = {1, 3, 4, 5, 9};
static const int64_t el_qcols_list[] = {32, 64, 96, 160, 288, 544, 800, 1056, 4096};
static const int64_t el_fcols_list[] = {1, 7, 16, 31, 33, 100, 257, 1000, 4096};
#define EL_LEN(a) ((int)(sizeof(a) / sizeof((a)[0])))

// --------------------------------------------------------------------------
// f16 conversion

static double el_f16_value(uint16_t h) { return (double)el_f16_to_f32(h); }

static void test_f16(void) {
    // every f16 survives f16 -> f32 -> f16 (NaN stays NaN)
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = el_f16_to_f32((uint16_t)h);
        uint16_t back = el_f32_to_f16(f);
        int ok = isnan(f) ? isnan(el_f16_to_f32(back)) : back == h;
        bad += !ok;
    }
    EL_CHECK(bad == 0, "%d f16 values do not round-trip", bad);
    EL_CHECK(el_f16_to_f32(0x3c00) == 1.0f && el_f16_to_f32(0x7bff) == 65504.0f &&
                 el_f16_to_f32(0x0001) == 0x1p-24f && el_f16_to_f32(0x7c00) == INFINITY &&
                 signbit(el_f16_to_f32(0x8000)),
             "known f16 values");
    EL_CHECK(el_f32_to_f16(65519.99f) == 0x7bff && el_f32_to_f16(65520.0f) == 0x7c00 &&
                 el_f32_to_f16(-1e9f) == 0xfc00 && el_f32_to_f16(0x1p-25f) == 0x0000 &&
                 el_f32_to_f16(0x1.8p-25f) == 0x0001 && el_f32_to_f16(0x1.8p-24f) == 0x0002,
             "overflow and subnormal rounding");
    // random f32: the result is the nearest f16, ties to the even one
    el_rng rng = {42};
    bad = 0;
    for (int i = 0; i < 200000; i++) {
        float f = el_rng_float(&rng) * ldexpf(1.0f, el_rng_int(&rng, -27, 16));
        if (i % 7 == 0) {  // exact halfway points between neighbouring f16 values
            uint16_t h0 = (uint16_t)el_rng_int(&rng, 0, 0x7bfe);
            f = (float)((el_f16_value(h0) + el_f16_value((uint16_t)(h0 + 1))) / 2);
        }
        uint16_t h = el_f32_to_f16(f);
        double v = el_f16_value(h), ax = fabs((double)f);
        if (isinf(v)) {
            bad += ax < 65520.0;
            continue;
        }
        uint16_t mag = h & 0x7fff;
        double err = fabs(fabs(v) - ax);
        double up = mag < 0x7bff ? fabs(el_f16_value((uint16_t)(mag + 1)) - ax) : INFINITY;
        double down = mag > 0 ? fabs(el_f16_value((uint16_t)(mag - 1)) - ax) : INFINITY;
        bad += err > up || err > down || ((err == up || err == down) && (mag & 1));
        bad += (f < 0) != ((h & 0x8000) != 0);
    }
    EL_CHECK(bad == 0, "%d f32 -> f16 conversions are not round-to-nearest-even", bad);
}

// --------------------------------------------------------------------------
// Quantizers

static void test_quantize(void) {
    el_rng rng = {7};
    enum { N = 32 * 64 };
    float x[N], y[N];
    el_block_q8_0 q8[N / 32], q8b[N / 32];
    el_block_q4_0 q4[N / 32], q4b[N / 32];
    for (int i = 0; i < N; i++) {
        // block magnitudes 2^-6..2^10 keep d inside the normal f16 range
        x[i] = el_rng_normal(&rng) * ldexpf(1.0f, (int)((i / 32) * 7 % 17) - 6);
    }
    // error bounds: Q8_0 |x - q d| <= d/2 (+ the f16 rounding of d), Q4_0 <= d (the clip at +8)
    el_quantize_row_q8_0(x, q8, N);
    el_dequantize_row_q8_0(q8, y, N);
    int bad = 0;
    for (int b = 0; b < N / 32; b++) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        for (int j = 0; j < 32; j++) bad += fabsf(x[b * 32 + j] - y[b * 32 + j]) > 0.57f * amax / 127;
    }
    EL_CHECK(bad == 0, "%d Q8_0 elements beyond d/2", bad);
    el_quantize_row_q4_0(x, q4, N);
    el_dequantize_row_q4_0(q4, y, N);
    bad = 0;
    for (int b = 0; b < N / 32; b++) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        for (int j = 0; j < 32; j++) bad += fabsf(x[b * 32 + j] - y[b * 32 + j]) > 1.01f * amax / 8;
    }
    EL_CHECK(bad == 0, "%d Q4_0 elements beyond d", bad);
    // quantising dequantised data gives the same bytes back
    el_dequantize_row_q8_0(q8, y, N);
    el_quantize_row_q8_0(y, q8b, N);
    EL_CHECK(memcmp(q8, q8b, sizeof q8) == 0, "Q8_0 re-quantisation changed bytes");
    el_dequantize_row_q4_0(q4, y, N);
    el_quantize_row_q4_0(y, q4b, N);
    EL_CHECK(memcmp(q4, q4b, sizeof q4) == 0, "Q4_0 re-quantisation changed bytes");

    // edge blocks: zeros, all equal, ties (roundf: half away from zero)
    float z[32] = {0}, eq[32], ties[32];
    for (int j = 0; j < 32; j++) {
        eq[j] = -3.0f;
        ties[j] = (j % 2 ? -1.0f : 1.0f) * ((float)(j % 8) + 0.5f);
    }
    ties[31] = 127.0f;  // d = 1, id = 1
    el_quantize_row_q8_0(z, q8, 32);
    el_quantize_row_q4_0(z, q4, 32);
    EL_CHECK(q8[0].d == 0 && q8[0].qs[0] == 0 && q8[0].qs[31] == 0, "Q8_0 of zeros");
    EL_CHECK(q4[0].d == 0x8000 && q4[0].qs[0] == 0x88 && q4[0].qs[15] == 0x88,
             "Q4_0 of zeros (d = 0 / -8 = -0, as in ggml and NumPy)");
    el_quantize_row_q8_0(eq, q8, 32);
    el_quantize_row_q4_0(eq, q4, 32);
    EL_CHECK(q8[0].qs[0] == -127 && q8[0].qs[31] == -127 &&
                 q8[0].d == el_f32_to_f16(3.0f / 127.0f), "Q8_0 of a constant block");
    EL_CHECK(q4[0].qs[0] == 0x00 && q4[0].qs[15] == 0x00 && q4[0].d == el_f32_to_f16(0.375f),
             "Q4_0 of a constant block (d = max / -8, all at q = -8)");
    el_quantize_row_q8_0(ties, q8, 32);
    bad = 0;
    for (int j = 0; j < 31; j++) {
        int want = (j % 2 ? -1 : 1) * (j % 8 + 1);
        bad += q8[0].qs[j] != want;
    }
    EL_CHECK(bad == 0 && q8[0].d == 0x3c00, "Q8_0 ties round half away from zero (%d wrong)", bad);

    // the public entry points: copies, F16, errors
    float back[64];
    uint16_t h[64];
    EL_CHECK(edgellm_quantize(EDGELLM_TYPE_F16, x, h, 64) == EDGELLM_STATUS_OK &&
                 edgellm_dequantize(EDGELLM_TYPE_F16, h, back, 64) == EDGELLM_STATUS_OK &&
                 back[5] == el_f16_to_f32(el_f32_to_f16(x[5])), "F16 through the public API");
    EL_CHECK(edgellm_quantize(EDGELLM_TYPE_Q8_0, x, q8, 33) == EDGELLM_STATUS_ERR_INVALID_ARG,
             "n not a multiple of 32");
    EL_CHECK(edgellm_dequantize(EDGELLM_TYPE_Q4_0, q4, y, -32) == EDGELLM_STATUS_ERR_INVALID_ARG,
             "negative n");
    EL_CHECK(edgellm_quantize(3, x, q8, 32) == EDGELLM_STATUS_ERR_UNSUPPORTED, "unknown type");
    float inf_x[32] = {0};
    inf_x[3] = INFINITY;
    EL_CHECK(edgellm_quantize(EDGELLM_TYPE_Q4_0, inf_x, q4, 32) == EDGELLM_STATUS_ERR_INVALID_ARG,
             "non-finite input");
    EL_CHECK(edgellm_type_block_size(EDGELLM_TYPE_Q4_0) == 32 &&
                 edgellm_type_block_bytes(EDGELLM_TYPE_Q4_0) == 18 &&
                 edgellm_type_block_bytes(EDGELLM_TYPE_Q8_0) == 34 &&
                 edgellm_type_block_bytes(EDGELLM_TYPE_F16) == 2 && edgellm_type_block_size(9) == 0,
             "block sizes");
}

// --------------------------------------------------------------------------
// Matmul: one ISA's table against generic

static const char *const el_wk_names[EL_WK_COUNT] = {"f32", "f16", "q4_0", "q8_0"};

typedef struct {
    int wk;
    int64_t rows, cols, n_tok;
    size_t w_row_bytes, x_row_bytes;
    uint8_t *w, *x;  // misaligned buffers
    size_t w_off, x_off;
} el_mm_case;

// Fills w and x: exact = small integers / power-of-two scales, else random real data.
static void el_fill_case(el_mm_case *c, int exact, el_rng *rng) {
    int64_t nb = c->cols / EL_QK;
    float *tmp = malloc(sizeof(float) * (size_t)c->cols);
    // exact case: which blocks use the full range (shared by every row and token)
    int n_full = c->wk == EL_WK_Q8_0 ? EL_FULL_Q8 : EL_FULL_Q4;
    for (int64_t r = 0; r < c->rows; r++) {
        uint8_t *wr = c->w + (size_t)r * c->w_row_bytes;
        if (c->wk == EL_WK_F32 || c->wk == EL_WK_F16) {
            for (int64_t i = 0; i < c->cols; i++) {
                tmp[i] = exact ? (float)el_rng_int(rng, -15, 15) : el_rng_normal(rng);
            }
            if (c->wk == EL_WK_F32) memcpy(wr, tmp, sizeof(float) * (size_t)c->cols);
            else for (int64_t i = 0; i < c->cols; i++) ((uint16_t *)wr)[i] = el_f32_to_f16(tmp[i]);
            continue;
        }
        if (!exact) {
            for (int64_t i = 0; i < c->cols; i++) tmp[i] = el_rng_normal(rng) * (1.0f + (float)(i % 5));
            if (c->wk == EL_WK_Q4_0) el_quantize_row_q4_0(tmp, (el_block_q4_0 *)wr, c->cols);
            else el_quantize_row_q8_0(tmp, (el_block_q8_0 *)wr, c->cols);
            continue;
        }
        for (int64_t b = 0; b < nb; b++) {
            int full = b % 8 == 3 && b / 8 < n_full;
            int pattern = full ? el_rng_int(rng, 0, 3) : 0;  // 0 random, 1 min, 2 max, 3 alternating
            uint16_t d = el_rng_int(rng, 0, 1) ? 0x3800 : 0x3c00;  // 1/2 or 1
            if (c->wk == EL_WK_Q4_0) {
                el_block_q4_0 *blk = (el_block_q4_0 *)wr + b;
                blk->d = d;
                for (int j = 0; j < 16; j++) {
                    int lo = full ? el_rng_int(rng, 0, 15) : el_rng_int(rng, 4, 11);
                    int hi = full ? el_rng_int(rng, 0, 15) : el_rng_int(rng, 4, 11);
                    if (pattern == 1) lo = hi = 0;
                    if (pattern == 2) lo = hi = 15;
                    if (pattern == 3) { lo = j % 2 ? 15 : 0; hi = 15 - lo; }
                    blk->qs[j] = (uint8_t)(lo | (hi << 4));
                }
            } else {
                el_block_q8_0 *blk = (el_block_q8_0 *)wr + b;
                blk->d = d;
                for (int j = 0; j < 32; j++) {
                    int v = full ? el_rng_int(rng, -128, 127) : el_rng_int(rng, -8, 8);
                    if (pattern == 1) v = -128;
                    if (pattern == 2) v = 127;
                    if (pattern == 3) v = j % 2 ? 127 : -128;
                    blk->qs[j] = (int8_t)v;
                }
            }
        }
    }
    for (int64_t t = 0; t < c->n_tok; t++) {
        uint8_t *xr = c->x + (size_t)t * c->x_row_bytes;
        if (c->wk == EL_WK_F32 || c->wk == EL_WK_F16) {
            for (int64_t i = 0; i < c->cols; i++) {
                ((float *)xr)[i] = exact ? (float)el_rng_int(rng, -15, 15) : el_rng_normal(rng);
            }
        } else if (!exact) {
            for (int64_t i = 0; i < c->cols; i++) tmp[i] = el_rng_normal(rng);
            el_quantize_row_q8_0(tmp, (el_block_q8_0 *)xr, c->cols);
        } else {
            for (int64_t b = 0; b < nb; b++) {
                el_block_q8_0 *blk = (el_block_q8_0 *)xr + b;
                int full = b % 8 == 3 && b / 8 < n_full;
                int pattern = full ? el_rng_int(rng, 0, 2) : 0;  // random, all 127, all -127
                blk->d = el_rng_int(rng, 0, 1) ? 0x3800 : 0x3c00;
                for (int j = 0; j < 32; j++) {
                    // the activation quantizer never makes -128 (|x / d| <= 127)
                    int v = full ? el_rng_int(rng, -127, 127) : el_rng_int(rng, -8, 8);
                    if (pattern == 1) v = 127;
                    if (pattern == 2) v = -127;
                    blk->qs[j] = (int8_t)v;
                }
            }
        }
    }
    free(tmp);
}

// sum |w_i x_i| of row r and token t in double: the scale of a dot's rounding error.
static double el_abs_dot(const el_mm_case *c, int64_t r, int64_t t) {
    float *wf = malloc(sizeof(float) * (size_t)c->cols), *xf = malloc(sizeof(float) * (size_t)c->cols);
    const uint8_t *wr = c->w + (size_t)r * c->w_row_bytes, *xr = c->x + (size_t)t * c->x_row_bytes;
    switch (c->wk) {
        case EL_WK_F32: memcpy(wf, wr, sizeof(float) * (size_t)c->cols); break;
        case EL_WK_F16: el_dequantize_row_f16((const uint16_t *)wr, wf, c->cols); break;
        case EL_WK_Q4_0: el_dequantize_row_q4_0((const el_block_q4_0 *)wr, wf, c->cols); break;
        default: el_dequantize_row_q8_0((const el_block_q8_0 *)wr, wf, c->cols); break;
    }
    if (c->wk == EL_WK_F32 || c->wk == EL_WK_F16) memcpy(xf, xr, sizeof(float) * (size_t)c->cols);
    else el_dequantize_row_q8_0((const el_block_q8_0 *)xr, xf, c->cols);
    double s = 0;
    for (int64_t i = 0; i < c->cols; i++) s += fabs((double)wf[i] * (double)xf[i]);
    free(wf);
    free(xf);
    return s;
}

// Runs one case on table k and on generic; returns the number of mismatches.
static int el_run_case(const el_kernel_table *k, int wk, int64_t rows, int64_t cols,
                       int64_t n_tok, int exact, el_rng *rng) {
    el_mm_case c = {.wk = wk, .rows = rows, .cols = cols, .n_tok = n_tok};
    int quant = wk == EL_WK_Q4_0 || wk == EL_WK_Q8_0;
    size_t elem = wk == EL_WK_F32 ? 4 : 2;
    size_t wblk = wk == EL_WK_Q4_0 ? sizeof(el_block_q4_0) : sizeof(el_block_q8_0);
    // padded strides and offsets that keep the types' own alignment but no SIMD alignment
    c.w_row_bytes = quant ? (size_t)(cols / EL_QK) * wblk + (rows % 2 ? 0 : 2 * wblk)
                          : (size_t)cols * elem + 4 * (size_t)(cols % 3);
    c.x_row_bytes = quant ? (size_t)(cols / EL_QK) * sizeof(el_block_q8_0) + (n_tok % 2) * 34
                          : (size_t)cols * 4 + 4 * (size_t)(n_tok % 2);
    c.w_off = quant ? 2 * (size_t)(1 + cols % 5) : 4 * (size_t)(1 + cols % 3);
    c.x_off = quant ? 2 * (size_t)(1 + rows % 3) : 4 * (size_t)(1 + rows % 5);
    c.w = el_alloc_offset(c.w_row_bytes * (size_t)rows, c.w_off);
    c.x = el_alloc_offset(c.x_row_bytes * (size_t)n_tok, c.x_off);
    el_fill_case(&c, exact, rng);

    int64_t y_stride = rows + 3;
    size_t ny = (size_t)(n_tok * y_stride);
    float *yg = malloc(sizeof(float) * ny), *yk = malloc(sizeof(float) * ny);
    for (size_t i = 0; i < ny; i++) yg[i] = yk[i] = -7.25f;  // sentinel outside [r0, r1)
    el_kernels_generic.matmul[wk](c.w, c.w_row_bytes, c.x, c.x_row_bytes, yg, y_stride, cols, 0,
                                  rows, n_tok);
    // the ISA runs in two thread-like slices [0, mid) and [mid, rows)
    int64_t mid = rows / 3;
    k->matmul[wk](c.w, c.w_row_bytes, c.x, c.x_row_bytes, yk, y_stride, cols, 0, mid, n_tok);
    k->matmul[wk](c.w, c.w_row_bytes, c.x, c.x_row_bytes, yk, y_stride, cols, mid, rows, n_tok);
    int bad = 0;
    for (int64_t t = 0; t < n_tok; t++) {
        for (int64_t r = 0; r < y_stride; r++) {
            float g = yg[t * y_stride + r], v = yk[t * y_stride + r];
            int ok;
            if (r >= rows) {
                ok = v == -7.25f;  // the slice wrote outside its rows
            } else if (exact) {
                ok = v == g;
            } else {
                double tol = (quant ? EL_TOL_QDOT_REL : EL_TOL_DOT_REL) * el_abs_dot(&c, r, t) + 1e-30;
                ok = fabs((double)v - (double)g) <= tol;
            }
            if (!ok && bad++ < 3) {
                fprintf(stderr, "  %s %s %s rows=%lld cols=%lld n_tok=%lld: y[%lld][%lld] = %.9g, generic %.9g\n",
                        k->name, el_wk_names[wk], exact ? "exact" : "tolerance", (long long)rows,
                        (long long)cols, (long long)n_tok, (long long)t, (long long)r, v, g);
            }
        }
    }
    free(yg);
    free(yk);
    el_free_offset(c.w, c.w_off);
    el_free_offset(c.x, c.x_off);
    return bad;
}

static void test_isa_matmul(const el_kernel_table *k) {
    el_rng rng = {1234 + (uint64_t)k->isa};
    for (int wk = 0; wk < EL_WK_COUNT; wk++) {
        int quant = wk == EL_WK_Q4_0 || wk == EL_WK_Q8_0;
        const int64_t *cols_list = quant ? el_qcols_list : el_fcols_list;
        int n_cols = quant ? EL_LEN(el_qcols_list) : EL_LEN(el_fcols_list);
        for (int exact = 0; exact < 2; exact++) {
            int bad = 0, cases = 0;
            for (int ci = 0; ci < n_cols; ci++) {
                for (int ri = 0; ri < EL_LEN(el_rows_list); ri++) {
                    for (int ti = 0; ti < EL_LEN(el_tok_list); ti++) {
                        // the biggest shapes only with one token count each, to stay fast
                        if (cols_list[ci] >= 1000 && ti != ri) continue;
                        bad += el_run_case(k, wk, el_rows_list[ri], cols_list[ci], el_tok_list[ti],
                                           exact, &rng);
                        cases++;
                    }
                }
            }
            EL_CHECK(bad == 0, "%s %s (%s): %d outputs differ from generic over %d cases",
                     k->name, el_wk_names[wk], exact ? "bit-exact" : "tolerance", bad, cases);
        }
    }
    // rows wider than one pass of prepared activations (8192 columns for 4-token tiles, 32768
    // when decoding): the kernels add column passes into y. Tolerance only (past the exact bound).
    static const int64_t wide[][3] = {{2, 8224, 4}, {3, 8256, 6}, {1, 32800, 1}};
    for (int wk = EL_WK_Q4_0; wk <= EL_WK_Q8_0; wk++) {
        int bad = 0;
        for (int i = 0; i < EL_LEN(wide); i++) {
            bad += el_run_case(k, wk, wide[i][0], wide[i][1], wide[i][2], 0, &rng);
        }
        EL_CHECK(bad == 0, "%s %s: %d outputs of wide rows differ from generic", k->name,
                 el_wk_names[wk], bad);
    }
}

// The table's activation quantizer against el_quantize_row_q8_0, byte for byte: random rows
// over many magnitudes (tiny ones give a subnormal d, so id = inf and x * id is inf or NaN),
// exact ties of x * id, zeros, constant blocks, and a misaligned source.
static void test_isa_quantize(const el_kernel_table *k) {
    enum { NB = 67 };  // odd block count
    float *buf = malloc((NB * EL_QK + 1) * sizeof(float));
    el_block_q8_0 want[NB], got[NB];
    el_rng rng = {777 + (uint64_t)k->isa};
    int bad = 0, cases = 0;
    for (int rep = 0; rep < 200; rep++) {
        float *x = buf + (rep & 1);  // misaligned every other case
        for (int b = 0; b < NB; b++) {
            float mag = ldexpf(1.0f, el_rng_int(&rng, -140, 40));
            int kind = el_rng_int(&rng, 0, 5);
            for (int j = 0; j < EL_QK; j++) {
                float *v = x + b * EL_QK + j;
                switch (kind) {
                    case 0: *v = 0.0f; break;
                    case 1: *v = -mag; break;
                    case 2:  // amax 127 gives id = 1: every other value an exact tie k + 0.5
                        *v = j == 0 ? 127.0f : (float)el_rng_int(&rng, -126, 126) + (j & 1 ? 0.5f : 0.0f);
                        break;
                    default: *v = el_rng_float(&rng) * mag; break;
                }
            }
        }
        el_quantize_row_q8_0(x, want, NB * EL_QK);
        k->quantize_q8_0(x, got, NB * EL_QK);
        bad += memcmp(want, got, sizeof want) != 0;
        cases++;
    }
    free(buf);
    EL_CHECK(bad == 0, "%s quantize_q8_0: %d of %d rows differ from generic", k->name, bad, cases);
}

// --------------------------------------------------------------------------
// ISA selection and the public matmul entry points

static void test_isa_select(void) {
    uint32_t built = edgellm_isa_built_mask(), supported = edgellm_isa_supported_mask();
    EL_CHECK(built & supported & 1u, "generic is always built and supported");
    for (int32_t isa = 0; isa < EDGELLM_ISA_COUNT; isa++) {
        const char *name = edgellm_isa_name(isa);
        int usable = (built & supported & (1u << isa)) != 0;
        int32_t st = edgellm_isa_select(name);
        if (usable) {
            EL_CHECK(st == EDGELLM_STATUS_OK && edgellm_isa_active() == isa &&
                         el_kernels() == el_kernels_for(isa), "selecting %s", name);
        } else {
            // e.g. EDGELLM_ISA=neon on x86, or neon_dotprod on a Cortex-A53: an error, not a fallback
            EL_CHECK(st == EDGELLM_STATUS_ERR_ISA && el_kernels_for(isa) == NULL &&
                         strstr(edgellm_last_error(), name) != NULL,
                     "forcing unusable %s gave %d (%s)", name, st, edgellm_last_error());
            const char *why = (built & (1u << isa)) ? "lacks" : "not compiled";
            EL_CHECK(strstr(edgellm_last_error(), why) != NULL, "detail for %s: %s", name,
                     edgellm_last_error());
            float w[32] = {0}, x[32] = {0}, y[1];
            EL_CHECK(edgellm_matmul(isa, EDGELLM_TYPE_F32, w, 1, 32, x, 1, y) == EDGELLM_STATUS_ERR_ISA,
                     "matmul on unusable %s", name);
        }
    }
    EL_CHECK(edgellm_isa_select("sse9") == EDGELLM_STATUS_ERR_ISA &&
                 strstr(edgellm_last_error(), "unknown") != NULL, "unknown ISA name");
    EL_CHECK(edgellm_isa_name(EDGELLM_ISA_COUNT) == NULL && edgellm_isa_name(-1) == NULL, "isa_name range");
    EL_CHECK(edgellm_isa_select("generic") == EDGELLM_STATUS_OK &&
                 edgellm_isa_active() == EDGELLM_ISA_GENERIC, "select generic");
    EL_CHECK(edgellm_isa_select("") == EDGELLM_STATUS_OK, "select best");
    int32_t best = edgellm_isa_active();
    for (int32_t isa = best + 1; isa < EDGELLM_ISA_COUNT; isa++) {
        // the preference order is avx512 > avx2 > neon_dotprod > neon > generic
        EL_CHECK(!(built & supported & (1u << isa)) || isa == EDGELLM_ISA_AVX2 ||
                     isa == EDGELLM_ISA_NEON, "best table %d but %d is usable", best, isa);
    }
}

static void test_public_matmul(void) {
    el_rng rng = {99};
    enum { ROWS = 5, COLS = 96, TOK = 3 };
    float w[ROWS * COLS], x[TOK * COLS], y1[TOK * ROWS], y2[TOK * ROWS];
    el_block_q4_0 wq[ROWS * COLS / 32];
    el_block_q8_0 xq[TOK * COLS / 32];
    for (int i = 0; i < ROWS * COLS; i++) w[i] = el_rng_normal(&rng);
    for (int i = 0; i < TOK * COLS; i++) x[i] = el_rng_normal(&rng);
    EL_CHECK(edgellm_quantize(EDGELLM_TYPE_Q4_0, w, wq, ROWS * COLS) == EDGELLM_STATUS_OK, "quantize w");
    for (int t = 0; t < TOK; t++) el_quantize_row_q8_0(x + t * COLS, xq + t * COLS / 32, COLS);
    // edgellm_matmul quantises x to Q8_0 exactly as the model does
    EL_CHECK(edgellm_matmul(-1, EDGELLM_TYPE_Q4_0, wq, ROWS, COLS, x, TOK, y1) == EDGELLM_STATUS_OK &&
                 edgellm_matmul_q8(-1, EDGELLM_TYPE_Q4_0, wq, ROWS, COLS, xq, TOK, y2) == EDGELLM_STATUS_OK &&
                 memcmp(y1, y2, sizeof y1) == 0, "matmul == quantize + matmul_q8");
    // and agrees with the float product of the dequantised operands
    float wd[ROWS * COLS], xd[TOK * COLS];
    el_dequantize_row_q4_0(wq, wd, ROWS * COLS);
    el_dequantize_row_q8_0(xq, xd, TOK * COLS);
    int bad = 0;
    for (int t = 0; t < TOK; t++) {
        for (int r = 0; r < ROWS; r++) {
            double ref = 0, mag = 0;
            for (int i = 0; i < COLS; i++) {
                ref += (double)wd[r * COLS + i] * xd[t * COLS + i];
                mag += fabs((double)wd[r * COLS + i] * xd[t * COLS + i]);
            }
            bad += fabs(y1[t * ROWS + r] - ref) > EL_TOL_QDOT_REL * mag;
        }
    }
    EL_CHECK(bad == 0, "%d Q4_0 outputs differ from the dequantised product", bad);
    // argument errors
    EL_CHECK(edgellm_matmul(-1, EDGELLM_TYPE_Q4_0, wq, ROWS, 33, x, TOK, y1) == EDGELLM_STATUS_ERR_INVALID_ARG,
             "cols not a multiple of 32");
    EL_CHECK(edgellm_matmul(-1, 5, w, ROWS, COLS, x, TOK, y1) == EDGELLM_STATUS_ERR_UNSUPPORTED, "bad type");
    EL_CHECK(edgellm_matmul(-1, EDGELLM_TYPE_F32, NULL, ROWS, COLS, x, TOK, y1) == EDGELLM_STATUS_ERR_INVALID_ARG,
             "NULL w");
    EL_CHECK(edgellm_matmul(-1, EDGELLM_TYPE_F32, w, 0, COLS, x, TOK, y1) == EDGELLM_STATUS_ERR_INVALID_ARG,
             "zero rows");
    EL_CHECK(edgellm_matmul(EDGELLM_ISA_COUNT, EDGELLM_TYPE_F32, w, ROWS, COLS, x, TOK, y1) == EDGELLM_STATUS_ERR_ISA,
             "ISA out of range");
    EL_CHECK(edgellm_matmul_q8(-1, EDGELLM_TYPE_F32, w, ROWS, COLS, xq, TOK, y1) == EDGELLM_STATUS_ERR_INVALID_ARG,
             "matmul_q8 with F32 weights");
}

int main(void) {
    uint32_t built = edgellm_isa_built_mask(), supported = edgellm_isa_supported_mask();
    printf("test_kernels: %s\n", edgellm_build_info());
    printf("cpu features: %s\n", edgellm_cpu_features());
    printf("isa built:");
    for (int32_t i = 0; i < EDGELLM_ISA_COUNT; i++) if (built & (1u << i)) printf(" %s", edgellm_isa_name(i));
    printf("\nisa supported:");
    for (int32_t i = 0; i < EDGELLM_ISA_COUNT; i++) if (supported & (1u << i)) printf(" %s", edgellm_isa_name(i));
    printf("\n");

    test_f16();
    test_quantize();
    test_isa_select();
    test_public_matmul();
    printf("isa tested:");
    for (int32_t isa = 0; isa < EDGELLM_ISA_COUNT; isa++) {
        const el_kernel_table *k = el_kernels_for(isa);
        if (k == NULL || isa == EDGELLM_ISA_GENERIC) {
            continue;
        }
        int before = el_test_failures;
        test_isa_matmul(k);
        test_isa_quantize(k);
        printf(" %s%s", k->name, el_test_failures > before ? "(FAILED)" : "");
        fflush(stdout);
    }
    printf("\n");
    return el_test_finish("test_kernels");
}
