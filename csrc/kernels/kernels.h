// SPDX-License-Identifier: MIT
// Internal kernel interface: quant block layouts, the per-ISA kernel table and its dispatch.
#ifndef EL_KERNELS_H
#define EL_KERNELS_H

#include <assert.h>
#include <stddef.h>
#include <stdint.h>

#include "edgellm.h"

#define EL_QK 32  // elements per Q4_0 / Q8_0 block (ggml's QK4_0 / QK8_0)

// ggml block_q8_0: f16 scale, then 32 signed 8-bit values; x[i] = d * qs[i].
typedef struct {
    uint16_t d;        // f16 bits
    int8_t qs[EL_QK];  // [32]
} el_block_q8_0;
static_assert(sizeof(el_block_q8_0) == 34, "Q8_0 block must match ggml (34 bytes)");

// ggml block_q4_0: f16 scale, then 16 bytes; byte j holds x[j] (low nibble) and x[j + 16]
// (high nibble), each stored as q + 8 with q in [-8, 7]; x[i] = d * q.
typedef struct {
    uint16_t d;            // f16 bits
    uint8_t qs[EL_QK / 2]; // [16]
} el_block_q4_0;
static_assert(sizeof(el_block_q4_0) == 18, "Q4_0 block must match ggml (18 bytes)");

// Weight kinds indexing el_kernel_table.matmul (dense, unlike edgellm_type values).
enum { EL_WK_F32 = 0, EL_WK_F16 = 1, EL_WK_Q4_0 = 2, EL_WK_Q8_0 = 3, EL_WK_COUNT = 4 };

// One matmul slice: for r in [r0, r1) and t in [0, n_tok):
//   y[t * y_stride + r] = dot(w row r, x row t)
// w: [rows, cols] rows of w_row_bytes; x: [n_tok, ...] rows of x_row_bytes, holding f32 for
// F32/F16 weights and el_block_q8_0 for Q4_0/Q8_0 weights. cols is a multiple of EL_QK for
// quantised weights. Threads call it on disjoint row ranges.
typedef void (*el_matmul_fn)(const void *w, size_t w_row_bytes, const void *x, size_t x_row_bytes,
                             float *y, int64_t y_stride, int64_t cols, int64_t r0, int64_t r1,
                             int64_t n_tok);

// Activation quantizer: x: [n] f32 -> y: [n / 32] Q8_0 blocks, n a multiple of EL_QK; every
// entry is byte-exact with el_quantize_row_q8_0 (the generic oracle).
typedef void (*el_quantize_fn)(const float *x, el_block_q8_0 *y, int64_t n);

typedef struct {
    int32_t isa;                     // edgellm_isa
    const char *name;                // "generic", "avx2", ...
    el_matmul_fn matmul[EL_WK_COUNT];  // indexed by EL_WK_*
    el_quantize_fn quantize_q8_0;    // activations for the quantised matmuls
} el_kernel_table;

// Weight kind for an edgellm_type, or -1.
int el_weight_kind(int32_t type);

// The active table (chosen once; see edgellm_isa_select).
const el_kernel_table *el_kernels(void);
// The table of one ISA, or NULL when it is not built in or the CPU cannot run it.
const el_kernel_table *el_kernels_for(int32_t isa);

// Portable conversions and the activation quantizer (generic only; byte-exact with ggml).
float el_f16_to_f32(uint16_t h);
uint16_t el_f32_to_f16(float f);
void el_quantize_row_q8_0(const float *x, el_block_q8_0 *y, int64_t n);  // x: [n] -> [n/32]
void el_quantize_row_q8_0_avx512(const float *x, el_block_q8_0 *y, int64_t n);  // same bytes
void el_quantize_row_q4_0(const float *x, el_block_q4_0 *y, int64_t n);  // x: [n] -> [n/32]
void el_dequantize_row_q8_0(const el_block_q8_0 *x, float *y, int64_t n);
void el_dequantize_row_q4_0(const el_block_q4_0 *x, float *y, int64_t n);
void el_dequantize_row_f16(const uint16_t *x, float *y, int64_t n);

// Per-ISA tables, defined in kernels/<isa>/matmul.c (only when that ISA is compiled in).
extern const el_kernel_table el_kernels_generic;
extern const el_kernel_table el_kernels_avx2;
extern const el_kernel_table el_kernels_avx512;
extern const el_kernel_table el_kernels_neon;
extern const el_kernel_table el_kernels_neon_dotprod;

// Set the thread-local detail message for the failing call (printf-style); returns status.
int32_t el_set_error(int32_t status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

#endif  // EL_KERNELS_H
