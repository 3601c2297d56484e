// SPDX-License-Identifier: MIT
// Minimal helpers for the C-only tests: checks that count failures, a seeded RNG, buffers.
#ifndef EL_TEST_H
#define EL_TEST_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int el_test_failures = 0;  // failed checks in this test binary
static int el_test_checks = 0;    // all checks run

// Records a failed check with its location and a printf-style message; never aborts, so one
// run reports every mismatch (capped at 20 printed lines).
#define EL_CHECK(cond, ...)                                                          \
    do {                                                                             \
        el_test_checks++;                                                            \
        if (!(cond)) {                                                               \
            if (el_test_failures++ < 20) {                                           \
                fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);      \
                fprintf(stderr, __VA_ARGS__);                                        \
                fputc('\n', stderr);                                                 \
            }                                                                        \
        }                                                                            \
    } while (0)

// Prints the summary and returns the process exit status.
static inline int el_test_finish(const char *name) {
    printf("%s: %d checks, %d failed\n", name, el_test_checks, el_test_failures);
    return el_test_failures ? 1 : 0;
}

// splitmix64: deterministic across platforms, so qemu and native runs test the same data.
typedef struct {
    uint64_t s;
} el_rng;

static inline uint64_t el_rng_u64(el_rng *r) {
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Uniform integer in [lo, hi].
static inline int32_t el_rng_int(el_rng *r, int32_t lo, int32_t hi) {
    return lo + (int32_t)(el_rng_u64(r) % (uint64_t)(hi - lo + 1));
}

// Uniform float in [-1, 1).
static inline float el_rng_float(el_rng *r) {
    return (float)((double)(el_rng_u64(r) >> 11) * 0x1p-52 - 1.0);
}

// Standard normal (Box-Muller), for activation-like data.
static inline float el_rng_normal(el_rng *r) {
    double u1 = ((double)(el_rng_u64(r) >> 11) + 1.0) * 0x1p-53;
    double u2 = (double)(el_rng_u64(r) >> 11) * 0x1p-53;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

// A buffer of n bytes starting offset bytes past a 64-byte boundary (to test misaligned
// access); free with el_free_offset(p, offset).
static inline void *el_alloc_offset(size_t n, size_t offset) {
    uint8_t *base = (uint8_t *)aligned_alloc(64, ((n + offset + 63) / 64) * 64 + 64);
    if (base == NULL) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return base + offset;
}

static inline void el_free_offset(void *p, size_t offset) {
    if (p != NULL) {
        free((uint8_t *)p - offset);
    }
}

#endif  // EL_TEST_H
