// SPDX-License-Identifier: MIT
// Placeholder neon table (generic entries) until the SIMD kernels land.
#include "../generic/generic.h"
#include "kernels.h"

const el_kernel_table el_kernels_neon = {
    .isa = EDGELLM_ISA_NEON,
    .name = "neon",
    .matmul = {el_matmul_f32_f32_generic, el_matmul_f16_f32_generic, el_matmul_q4_0_q8_0_generic,
               el_matmul_q8_0_q8_0_generic},
};
