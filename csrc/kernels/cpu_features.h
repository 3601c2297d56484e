// SPDX-License-Identifier: MIT
// What cpu_features.c detected: per-feature flags, the ISA mask and the feature string.
#ifndef EL_CPU_FEATURES_H
#define EL_CPU_FEATURES_H

#include <stdint.h>

typedef struct {
    // x86: instructions the CPU reports (cpuid) ...
    int avx, avx2, fma, f16c;
    int avx512f, avx512bw, avx512vl, avx512dq, avx512vnni;
    // ... and register state the OS saves (XCR0)
    int os_ymm, os_zmm;
    // aarch64 (AT_HWCAP)
    int asimd, asimddp;
    uint32_t supported;   // bit (1 << edgellm_isa) per ISA this CPU and OS can run
    char features[256];   // space-separated names of the flags above that are set
} el_cpu_info;

// Detects once (thread-safe) and returns the result.
const el_cpu_info *el_cpu_info_get(void);

#endif  // EL_CPU_FEATURES_H
