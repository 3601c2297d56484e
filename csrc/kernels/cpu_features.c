// SPDX-License-Identifier: MIT
// Run-time CPU feature detection (cpuid + XGETBV on x86, AT_HWCAP on aarch64) into an ISA mask.
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "cpu_features.h"
#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#elif defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

static el_cpu_info el_cpu;                      // filled once by el_cpu_detect
static pthread_once_t el_cpu_once = PTHREAD_ONCE_INIT;

// --------------------------------------------------------------------------
// x86: the CPU must report the instructions AND the OS must save the registers (XCR0)

#if defined(__x86_64__) || defined(__i386__)
static uint64_t el_xgetbv0(void) {
    uint32_t lo, hi;
    // XGETBV with ECX = 0 reads XCR0 (encoded by hand: no -mxsave needed on the baseline build)
    __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static void el_cpu_detect_arch(el_cpu_info *c) {
    unsigned a, b, cx, d;
    unsigned max_leaf = __get_cpuid_max(0, NULL);
    if (max_leaf < 1 || !__get_cpuid(1, &a, &b, &cx, &d)) {
        return;
    }
    int osxsave = (cx >> 27) & 1;
    c->fma = (cx >> 12) & 1;
    c->avx = (cx >> 28) & 1;
    c->f16c = (cx >> 29) & 1;
    uint64_t xcr0 = osxsave ? el_xgetbv0() : 0;
    c->os_ymm = (xcr0 & 0x6) == 0x6;     // XMM (bit 1) and YMM upper halves (bit 2)
    c->os_zmm = (xcr0 & 0xe6) == 0xe6;   // + opmask (5), ZMM0-15 upper (6), ZMM16-31 (7)
    if (max_leaf >= 7) {
        __cpuid_count(7, 0, a, b, cx, d);
        c->avx2 = (b >> 5) & 1;
        c->avx512f = (b >> 16) & 1;
        c->avx512dq = (b >> 17) & 1;
        c->avx512bw = (b >> 30) & 1;
        c->avx512vl = (b >> 31) & 1;
        c->avx512vnni = (cx >> 11) & 1;
    }
}
#elif defined(__aarch64__) && defined(__linux__)
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1UL << 1)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
static void el_cpu_detect_arch(el_cpu_info *c) {
    unsigned long hw = getauxval(AT_HWCAP);
    c->asimd = (hw & HWCAP_ASIMD) != 0;
    c->asimddp = (hw & HWCAP_ASIMDDP) != 0;
}
#else
static void el_cpu_detect_arch(el_cpu_info *c) { (void)c; }  // unknown target: generic only
#endif

// --------------------------------------------------------------------------
// The mask and the feature string

static void el_cpu_add(char *buf, size_t size, int have, const char *name) {
    if (have) {
        size_t len = strlen(buf);
        snprintf(buf + len, size - len, "%s%s", len ? " " : "", name);
    }
}

static void el_cpu_detect(void) {
    el_cpu_info *c = &el_cpu;
    el_cpu_detect_arch(c);
    int avx2 = c->avx && c->avx2 && c->fma && c->f16c && c->os_ymm;
    int avx512 = avx2 && c->avx512f && c->avx512bw && c->avx512vl && c->avx512dq &&
                 c->avx512vnni && c->os_zmm;
    c->supported = 1u << EDGELLM_ISA_GENERIC;
    c->supported |= (uint32_t)avx2 << EDGELLM_ISA_AVX2;
    c->supported |= (uint32_t)avx512 << EDGELLM_ISA_AVX512;
    c->supported |= (uint32_t)c->asimd << EDGELLM_ISA_NEON;
    c->supported |= (uint32_t)(c->asimd && c->asimddp) << EDGELLM_ISA_NEON_DOTPROD;

    char *s = c->features;
    size_t n = sizeof c->features;
    el_cpu_add(s, n, c->avx, "avx");
    el_cpu_add(s, n, c->avx2, "avx2");
    el_cpu_add(s, n, c->fma, "fma");
    el_cpu_add(s, n, c->f16c, "f16c");
    el_cpu_add(s, n, c->avx512f, "avx512f");
    el_cpu_add(s, n, c->avx512bw, "avx512bw");
    el_cpu_add(s, n, c->avx512vl, "avx512vl");
    el_cpu_add(s, n, c->avx512dq, "avx512dq");
    el_cpu_add(s, n, c->avx512vnni, "avx512vnni");
    el_cpu_add(s, n, c->os_ymm, "os_ymm");
    el_cpu_add(s, n, c->os_zmm, "os_zmm");
    el_cpu_add(s, n, c->asimd, "asimd");
    el_cpu_add(s, n, c->asimddp, "asimddp");
}

const el_cpu_info *el_cpu_info_get(void) {
    pthread_once(&el_cpu_once, el_cpu_detect);
    return &el_cpu;
}

uint32_t edgellm_isa_supported_mask(void) { return el_cpu_info_get()->supported; }

const char *edgellm_cpu_features(void) { return el_cpu_info_get()->features; }
