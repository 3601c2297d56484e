// SPDX-License-Identifier: MIT
// Chooses the kernel table once at run time, and the public quantize / matmul entry points.
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_features.h"
#include "edgellm.h"
#include "kernels.h"

// --------------------------------------------------------------------------
// ISA names, built tables, support

static const char *const el_isa_names[EDGELLM_ISA_COUNT] = {
    [EDGELLM_ISA_GENERIC] = "generic",
    [EDGELLM_ISA_AVX2] = "avx2",
    [EDGELLM_ISA_AVX512] = "avx512",
    [EDGELLM_ISA_NEON] = "neon",
    [EDGELLM_ISA_NEON_DOTPROD] = "neon_dotprod",
};

// The table of each ISA compiled into this library (CMake defines EL_BUILT_<ISA>=1), else NULL.
static const el_kernel_table *const el_isa_tables[EDGELLM_ISA_COUNT] = {
    [EDGELLM_ISA_GENERIC] = &el_kernels_generic,
#ifdef EL_BUILT_AVX2
    [EDGELLM_ISA_AVX2] = &el_kernels_avx2,
#endif
#ifdef EL_BUILT_AVX512
    [EDGELLM_ISA_AVX512] = &el_kernels_avx512,
#endif
#ifdef EL_BUILT_NEON
    [EDGELLM_ISA_NEON] = &el_kernels_neon,
#endif
#ifdef EL_BUILT_NEON_DOTPROD
    [EDGELLM_ISA_NEON_DOTPROD] = &el_kernels_neon_dotprod,
#endif
};

// Preference when nothing is named: the widest first.
static const int32_t el_isa_preference[] = {
    EDGELLM_ISA_AVX512, EDGELLM_ISA_AVX2, EDGELLM_ISA_NEON_DOTPROD, EDGELLM_ISA_NEON,
    EDGELLM_ISA_GENERIC,
};

const char *edgellm_isa_name(int32_t isa) {
    if (isa < 0 || isa >= EDGELLM_ISA_COUNT) {
        return NULL;
    }
    return el_isa_names[isa];
}

uint32_t edgellm_isa_built_mask(void) {
    uint32_t mask = 0;
    for (int32_t i = 0; i < EDGELLM_ISA_COUNT; i++) {
        mask |= (uint32_t)(el_isa_tables[i] != NULL) << i;
    }
    return mask;
}

const el_kernel_table *el_kernels_for(int32_t isa) {
    if (isa < 0 || isa >= EDGELLM_ISA_COUNT) {
        return NULL;
    }
    if (!(edgellm_isa_supported_mask() & (1u << isa))) {
        return NULL;
    }
    return el_isa_tables[isa];
}

typedef struct {
    int have;          // detected
    const char *name;  // what to print when missing
} el_need;

// Writes the CPU features an ISA needs that this CPU (or OS) lacks into buf.
static void el_isa_missing(int32_t isa, char *buf, size_t size) {
    const el_cpu_info *c = el_cpu_info_get();
    el_need need[10];
    int n = 0;
    switch (isa) {
        case EDGELLM_ISA_AVX512:
            need[n++] = (el_need){c->avx512f, "avx512f"};
            need[n++] = (el_need){c->avx512bw, "avx512bw"};
            need[n++] = (el_need){c->avx512vl, "avx512vl"};
            need[n++] = (el_need){c->avx512dq, "avx512dq"};
            need[n++] = (el_need){c->avx512vnni, "avx512vnni"};
            need[n++] = (el_need){c->os_zmm, "OS support for ZMM/opmask state (XCR0)"};
            __attribute__((fallthrough));  // AVX-512 kernels also use AVX2, FMA and F16C
        case EDGELLM_ISA_AVX2:
            need[n++] = (el_need){c->avx2, "avx2"};
            need[n++] = (el_need){c->fma, "fma"};
            need[n++] = (el_need){c->f16c, "f16c"};
            need[n++] = (el_need){c->os_ymm, "OS support for YMM state (XCR0)"};
            break;
        case EDGELLM_ISA_NEON_DOTPROD:
            need[n++] = (el_need){c->asimddp, "asimddp (SDOT/UDOT)"};
            __attribute__((fallthrough));
        case EDGELLM_ISA_NEON:
            need[n++] = (el_need){c->asimd, "asimd"};
            break;
        default:
            break;
    }
    buf[0] = '\0';
    for (int i = 0; i < n; i++) {
        if (!need[i].have) {
            size_t len = strlen(buf);
            snprintf(buf + len, size - len, "%s%s", len ? ", " : "", need[i].name);
        }
    }
    if (buf[0] == '\0') {
        snprintf(buf, size, "%s", "a different CPU architecture");
    }
}

// Comma-separated names of the ISAs set in mask.
static void el_isa_list(uint32_t mask, char *buf, size_t size) {
    buf[0] = '\0';
    for (int32_t i = 0; i < EDGELLM_ISA_COUNT; i++) {
        if (mask & (1u << i)) {
            size_t len = strlen(buf);
            snprintf(buf + len, size - len, "%s%s", len ? "," : "", el_isa_names[i]);
        }
    }
}

// The table for isa, or NULL with the error detail set (not built / not supported / unknown).
static const el_kernel_table *el_isa_table_checked(int32_t isa, int32_t *status) {
    char list[128], missing[256];
    *status = EDGELLM_STATUS_ERR_ISA;
    if (isa < 0 || isa >= EDGELLM_ISA_COUNT) {
        el_set_error(EDGELLM_STATUS_ERR_ISA, "ISA id %d is out of range [0, %d)", (int)isa,
                     (int)EDGELLM_ISA_COUNT);
        return NULL;
    }
    if (el_isa_tables[isa] == NULL) {
        el_isa_list(edgellm_isa_built_mask(), list, sizeof list);
        el_set_error(EDGELLM_STATUS_ERR_ISA,
                     "ISA '%s' is not compiled into this library (built: %s)", el_isa_names[isa],
                     list);
        return NULL;
    }
    if (!(edgellm_isa_supported_mask() & (1u << isa))) {
        el_isa_missing(isa, missing, sizeof missing);
        el_set_error(EDGELLM_STATUS_ERR_ISA, "ISA '%s' is built, but this CPU lacks: %s",
                     el_isa_names[isa], missing);
        return NULL;
    }
    *status = EDGELLM_STATUS_OK;
    return el_isa_tables[isa];
}

// --------------------------------------------------------------------------
// The active table

static _Atomic(const el_kernel_table *) el_active;  // NULL until the first select

static const el_kernel_table *el_isa_best(void) {
    uint32_t ok = edgellm_isa_built_mask() & edgellm_isa_supported_mask();
    for (size_t i = 0; i < sizeof el_isa_preference / sizeof el_isa_preference[0]; i++) {
        if (ok & (1u << el_isa_preference[i])) {
            return el_isa_tables[el_isa_preference[i]];
        }
    }
    return &el_kernels_generic;
}

int32_t edgellm_isa_select(const char *name) {
    if (name == NULL || name[0] == '\0') {
        atomic_store(&el_active, el_isa_best());
        return EDGELLM_STATUS_OK;
    }
    for (int32_t i = 0; i < EDGELLM_ISA_COUNT; i++) {
        if (strcmp(name, el_isa_names[i]) == 0) {
            int32_t status;
            const el_kernel_table *t = el_isa_table_checked(i, &status);
            if (t == NULL) {
                return status;  // the active table stays as it was
            }
            atomic_store(&el_active, t);
            return EDGELLM_STATUS_OK;
        }
    }
    char list[128];
    el_isa_list((1u << EDGELLM_ISA_COUNT) - 1, list, sizeof list);
    return el_set_error(EDGELLM_STATUS_ERR_ISA, "unknown ISA name '%.64s' (known: %s)", name, list);
}

const el_kernel_table *el_kernels(void) {
    const el_kernel_table *t = atomic_load_explicit(&el_active, memory_order_acquire);
    if (t == NULL) {
        // first use without a select: the best table; racing threads all store the same pointer
        const el_kernel_table *expected = NULL;
        t = el_isa_best();
        if (!atomic_compare_exchange_strong(&el_active, &expected, t)) {
            t = expected;
        }
    }
    return t;
}

int32_t edgellm_isa_active(void) { return el_kernels()->isa; }

// --------------------------------------------------------------------------
// Types

int el_weight_kind(int32_t type) {
    switch (type) {
        case EDGELLM_TYPE_F32: return EL_WK_F32;
        case EDGELLM_TYPE_F16: return EL_WK_F16;
        case EDGELLM_TYPE_Q4_0: return EL_WK_Q4_0;
        case EDGELLM_TYPE_Q8_0: return EL_WK_Q8_0;
        default: return -1;
    }
}

int64_t edgellm_type_block_size(int32_t type) {
    switch (type) {
        case EDGELLM_TYPE_F32:
        case EDGELLM_TYPE_F16: return 1;
        case EDGELLM_TYPE_Q4_0:
        case EDGELLM_TYPE_Q8_0: return EL_QK;
        default: return 0;
    }
}

size_t edgellm_type_block_bytes(int32_t type) {
    switch (type) {
        case EDGELLM_TYPE_F32: return sizeof(float);
        case EDGELLM_TYPE_F16: return sizeof(uint16_t);
        case EDGELLM_TYPE_Q4_0: return sizeof(el_block_q4_0);
        case EDGELLM_TYPE_Q8_0: return sizeof(el_block_q8_0);
        default: return 0;
    }
}

// Checks type and n for (de)quantize: known type, n >= 0 and a whole number of blocks.
static int32_t el_check_type_n(const char *fn, int32_t type, int64_t n) {
    int64_t bs = edgellm_type_block_size(type);
    if (bs == 0) {
        return el_set_error(EDGELLM_STATUS_ERR_UNSUPPORTED,
                            "%s: tensor type %d is not one of F32 (0), F16 (1), Q4_0 (2), Q8_0 (8)",
                            fn, (int)type);
    }
    if (n < 0 || n % bs != 0) {
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                            "%s: n = %lld must be >= 0 and a multiple of the block size %lld", fn,
                            (long long)n, (long long)bs);
    }
    return EDGELLM_STATUS_OK;
}

int32_t edgellm_quantize(int32_t type, const float *x, void *out, int64_t n) {
    int32_t st = el_check_type_n("edgellm_quantize", type, n);
    if (st != EDGELLM_STATUS_OK) {
        return st;
    }
    if (n > 0 && (x == NULL || out == NULL)) {
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "edgellm_quantize: NULL buffer");
    }
    if (type == EDGELLM_TYPE_Q4_0 || type == EDGELLM_TYPE_Q8_0) {
        // scales of blocks with inf/NaN are meaningless and the int conversion is undefined
        for (int64_t i = 0; i < n; i++) {
            if (!isfinite(x[i])) {
                return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                                    "edgellm_quantize: x[%lld] = %g is not finite", (long long)i,
                                    (double)x[i]);
            }
        }
    }
    switch (type) {
        case EDGELLM_TYPE_F32: memcpy(out, x, (size_t)n * sizeof(float)); break;
        case EDGELLM_TYPE_F16:
            for (int64_t i = 0; i < n; i++) {
                ((uint16_t *)out)[i] = el_f32_to_f16(x[i]);
            }
            break;
        case EDGELLM_TYPE_Q4_0: el_quantize_row_q4_0(x, (el_block_q4_0 *)out, n); break;
        case EDGELLM_TYPE_Q8_0: el_quantize_row_q8_0(x, (el_block_q8_0 *)out, n); break;
        default: break;
    }
    return EDGELLM_STATUS_OK;
}

int32_t edgellm_dequantize(int32_t type, const void *x, float *out, int64_t n) {
    int32_t st = el_check_type_n("edgellm_dequantize", type, n);
    if (st != EDGELLM_STATUS_OK) {
        return st;
    }
    if (n > 0 && (x == NULL || out == NULL)) {
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "edgellm_dequantize: NULL buffer");
    }
    switch (type) {
        case EDGELLM_TYPE_F32: memcpy(out, x, (size_t)n * sizeof(float)); break;
        case EDGELLM_TYPE_F16: el_dequantize_row_f16((const uint16_t *)x, out, n); break;
        case EDGELLM_TYPE_Q4_0: el_dequantize_row_q4_0((const el_block_q4_0 *)x, out, n); break;
        case EDGELLM_TYPE_Q8_0: el_dequantize_row_q8_0((const el_block_q8_0 *)x, out, n); break;
        default: break;
    }
    return EDGELLM_STATUS_OK;
}

// --------------------------------------------------------------------------
// Single-threaded matmul entry points (tests and benches; the model calls the table itself)

// Validates a matmul call and finds its table and weight kind.
static int32_t el_matmul_check(const char *fn, int32_t isa, int32_t wtype, const void *w,
                               int64_t rows, int64_t cols, const void *x, int64_t n_tokens,
                               const float *y, const el_kernel_table **table, int *wk) {
    *wk = el_weight_kind(wtype);
    if (*wk < 0) {
        return el_set_error(EDGELLM_STATUS_ERR_UNSUPPORTED,
                            "%s: weight type %d is not one of F32 (0), F16 (1), Q4_0 (2), Q8_0 (8)",
                            fn, (int)wtype);
    }
    if (w == NULL || x == NULL || y == NULL) {
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "%s: NULL buffer", fn);
    }
    if (rows <= 0 || cols <= 0 || n_tokens <= 0 || rows > INT32_MAX || cols > INT32_MAX ||
        n_tokens > INT32_MAX) {
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                            "%s: rows = %lld, cols = %lld, n_tokens = %lld must be in [1, 2^31)",
                            fn, (long long)rows, (long long)cols, (long long)n_tokens);
    }
    if (cols % edgellm_type_block_size(wtype) != 0) {
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                            "%s: cols = %lld is not a multiple of the block size %d", fn,
                            (long long)cols, EL_QK);
    }
    if (isa < 0) {
        *table = el_kernels();
        return EDGELLM_STATUS_OK;
    }
    int32_t st;
    *table = el_isa_table_checked(isa, &st);
    return st;
}

int32_t edgellm_matmul(int32_t isa, int32_t wtype, const void *w, int64_t rows, int64_t cols,
                       const float *x, int64_t n_tokens, float *y) {
    const el_kernel_table *t = NULL;
    int wk;
    int32_t st = el_matmul_check("edgellm_matmul", isa, wtype, w, rows, cols, x, n_tokens, y, &t,
                                 &wk);
    if (st != EDGELLM_STATUS_OK) {
        return st;
    }
    size_t w_row_bytes = (size_t)(cols / edgellm_type_block_size(wtype)) *
                         edgellm_type_block_bytes(wtype);
    if (wk == EL_WK_F32 || wk == EL_WK_F16) {
        t->matmul[wk](w, w_row_bytes, x, (size_t)cols * sizeof(float), y, rows, cols, 0, rows,
                      n_tokens);
        return EDGELLM_STATUS_OK;
    }
    // quantised weights: activations to Q8_0 first, xq: [n_tokens, cols / 32] blocks
    size_t xq_row_bytes = (size_t)(cols / EL_QK) * sizeof(el_block_q8_0);
    el_block_q8_0 *xq = malloc(xq_row_bytes * (size_t)n_tokens);
    if (xq == NULL) {
        return el_set_error(EDGELLM_STATUS_ERR_NOMEM, "edgellm_matmul: %zu bytes for Q8_0 activations",
                            xq_row_bytes * (size_t)n_tokens);
    }
    for (int64_t tk = 0; tk < n_tokens; tk++) {
        el_quantize_row_q8_0(x + tk * cols, (el_block_q8_0 *)((char *)xq + (size_t)tk * xq_row_bytes),
                             cols);
    }
    t->matmul[wk](w, w_row_bytes, xq, xq_row_bytes, y, rows, cols, 0, rows, n_tokens);
    free(xq);
    return EDGELLM_STATUS_OK;
}

int32_t edgellm_matmul_q8(int32_t isa, int32_t wtype, const void *w, int64_t rows, int64_t cols,
                          const void *xq, int64_t n_tokens, float *y) {
    const el_kernel_table *t = NULL;
    int wk;
    int32_t st = el_matmul_check("edgellm_matmul_q8", isa, wtype, w, rows, cols, xq, n_tokens, y,
                                 &t, &wk);
    if (st != EDGELLM_STATUS_OK) {
        return st;
    }
    if (wk != EL_WK_Q4_0 && wk != EL_WK_Q8_0) {
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                            "edgellm_matmul_q8: weight type %d is not Q4_0 or Q8_0", (int)wtype);
    }
    size_t w_row_bytes = (size_t)(cols / EL_QK) * edgellm_type_block_bytes(wtype);
    size_t xq_row_bytes = (size_t)(cols / EL_QK) * sizeof(el_block_q8_0);
    t->matmul[wk](w, w_row_bytes, xq, xq_row_bytes, y, rows, cols, 0, rows, n_tokens);
    return EDGELLM_STATUS_OK;
}
