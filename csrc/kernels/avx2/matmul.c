// SPDX-License-Identifier: MIT
// Placeholder avx2 table (generic entries) until the SIMD kernels land.
#include "../generic/generic.h"
#include "kernels.h"

const el_kernel_table el_kernels_avx2 = {
    .isa = EDGELLM_ISA_AVX2,
    .name = "avx2",
    .matmul = {el_matmul_f32_f32_generic, el_matmul_f16_f32_generic, el_matmul_q4_0_q8_0_generic,
               el_matmul_q8_0_q8_0_generic},
};
