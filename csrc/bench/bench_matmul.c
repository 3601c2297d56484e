// SPDX-License-Identifier: MIT
// Matmul micro-benchmark: every usable ISA and weight type over L1..DRAM sizes (min/median, GB/s).
//
// Usage: bench_matmul [--quick] [--isa NAME] [--type f32|f16|q4_0|q8_0] [--rows R --cols C]
//                     [--tok N] [--reps N]
// Output: one JSON line per case on stdout; "hot" repeats one matrix (cache-resident when it
// fits), "cold" cycles through copies totalling > 128 MiB so weights stream from DRAM.
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "edgellm.h"
#include "kernels.h"

static double el_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int el_cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct {
    const char *name;
    int32_t type;
} el_bench_type;

static const el_bench_type el_types[] = {
    {"f32", EDGELLM_TYPE_F32}, {"f16", EDGELLM_TYPE_F16},
    {"q4_0", EDGELLM_TYPE_Q4_0}, {"q8_0", EDGELLM_TYPE_Q8_0},
};

// Times one (isa, type, rows, cols, n_tok) case; prints a JSON line.
static int el_bench_case(const el_kernel_table *k, const el_bench_type *bt, int64_t rows,
                         int64_t cols, int64_t n_tok, int reps, int cold) {
    int wk = el_weight_kind(bt->type);
    size_t w_row_bytes = (size_t)(cols / edgellm_type_block_size(bt->type)) *
                         edgellm_type_block_bytes(bt->type);
    size_t w_bytes = w_row_bytes * (size_t)rows;
    int copies = 1;
    if (cold) {
        copies = (int)((128u << 20) / w_bytes) + 1;
    }
    float *wf = malloc((size_t)rows * (size_t)cols * sizeof(float));    // [rows, cols]
    float *xf = malloc((size_t)n_tok * (size_t)cols * sizeof(float));   // [n_tok, cols]
    float *y = malloc((size_t)n_tok * (size_t)rows * sizeof(float));    // [n_tok, rows]
    uint8_t *w = malloc(w_bytes * (size_t)copies);                     // copies x [rows, cols]
    size_t x_row_bytes = wk >= EL_WK_Q4_0 ? (size_t)(cols / EL_QK) * sizeof(el_block_q8_0)
                                          : (size_t)cols * sizeof(float);
    uint8_t *x = malloc(x_row_bytes * (size_t)n_tok);
    if (!wf || !xf || !y || !w || !x) {
        fprintf(stderr, "bench_matmul: out of memory\n");
        return 1;
    }
    srand(1);
    for (int64_t i = 0; i < rows * cols; i++) {
        wf[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    }
    for (int64_t i = 0; i < n_tok * cols; i++) {
        xf[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    }
    edgellm_quantize(bt->type, wf, w, rows * cols);
    for (int c = 1; c < copies; c++) {
        memcpy(w + (size_t)c * w_bytes, w, w_bytes);
    }
    for (int64_t t = 0; t < n_tok; t++) {
        if (wk >= EL_WK_Q4_0) {
            el_quantize_row_q8_0(xf + t * cols, (el_block_q8_0 *)(x + (size_t)t * x_row_bytes), cols);
        } else {
            memcpy(x + (size_t)t * x_row_bytes, xf + t * cols, x_row_bytes);
        }
    }
    double *ts = malloc(sizeof(double) * (size_t)reps);
    for (int r = 0; r < reps / 10 + 2; r++) {  // warm up
        k->matmul[wk](w, w_row_bytes, x, x_row_bytes, y, rows, cols, 0, rows, n_tok);
    }
    for (int r = 0; r < reps; r++) {
        const uint8_t *wc = w + (size_t)(r % copies) * w_bytes;
        double t0 = el_now();
        k->matmul[wk](wc, w_row_bytes, x, x_row_bytes, y, rows, cols, 0, rows, n_tok);
        ts[r] = el_now() - t0;
    }
    qsort(ts, (size_t)reps, sizeof(double), el_cmp_double);
    double tmin = ts[0], tmed = ts[reps / 2];
    double gop = 2.0 * (double)rows * (double)cols * (double)n_tok * 1e-9;
    printf("{\"isa\": \"%s\", \"type\": \"%s\", \"rows\": %lld, \"cols\": %lld, \"n_tok\": %lld, "
           "\"mode\": \"%s\", \"weight_bytes\": %zu, \"min_us\": %.2f, \"median_us\": %.2f, "
           "\"gbps_min\": %.2f, \"gbps_median\": %.2f, \"gops_min\": %.2f, \"build\": \"%s\"}\n",
           k->name, bt->name, (long long)rows, (long long)cols, (long long)n_tok,
           cold ? "cold" : "hot", w_bytes, tmin * 1e6, tmed * 1e6, (double)w_bytes / tmin * 1e-9,
           (double)w_bytes / tmed * 1e-9, gop / tmin, edgellm_build_info());
    fflush(stdout);
    free(ts);
    free(wf);
    free(xf);
    free(y);
    free(w);
    free(x);
    return 0;
}

int main(int argc, char **argv) {
    const char *isa_name = NULL, *type_name = NULL;
    int64_t rows = 0, cols = 0, n_tok = 0;
    int reps = 0, quick = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) {
            quick = 1;
        } else if (i + 1 < argc && strcmp(argv[i], "--isa") == 0) {
            isa_name = argv[++i];
        } else if (i + 1 < argc && strcmp(argv[i], "--type") == 0) {
            type_name = argv[++i];
        } else if (i + 1 < argc && strcmp(argv[i], "--rows") == 0) {
            rows = atoll(argv[++i]);
        } else if (i + 1 < argc && strcmp(argv[i], "--cols") == 0) {
            cols = atoll(argv[++i]);
        } else if (i + 1 < argc && strcmp(argv[i], "--tok") == 0) {
            n_tok = atoll(argv[++i]);
        } else if (i + 1 < argc && strcmp(argv[i], "--reps") == 0) {
            reps = atoi(argv[++i]);
        } else {
            fprintf(stderr, "usage: %s [--quick] [--isa NAME] [--type f32|f16|q4_0|q8_0] "
                            "[--rows R --cols C] [--tok N] [--reps N]\n", argv[0]);
            return 2;
        }
    }
    // L1, L2, L3 and DRAM-sized Q4_0 matrices, plus the two model shapes of the brief.
    static const int64_t shapes[][2] = {{64, 256}, {256, 1024}, {1024, 2048}, {2048, 2048},
                                        {5632, 2048}, {2048, 5632}};
    int n_shapes = (int)(sizeof shapes / sizeof shapes[0]);
    fprintf(stderr, "bench_matmul: %s\ncpu: %s\n", edgellm_build_info(), edgellm_cpu_features());
    for (int isa = 0; isa < EDGELLM_ISA_COUNT; isa++) {
        const el_kernel_table *k = el_kernels_for(isa);
        if (k == NULL || (isa_name && strcmp(isa_name, k->name) != 0)) {
            continue;
        }
        for (size_t ti = 0; ti < sizeof el_types / sizeof el_types[0]; ti++) {
            if (type_name && strcmp(type_name, el_types[ti].name) != 0) {
                continue;
            }
            for (int s = 0; s < n_shapes; s++) {
                int64_t r = rows ? rows : shapes[s][0], c = cols ? cols : shapes[s][1];
                if ((rows || cols) && s > 0) {
                    break;
                }
                if (quick && !(rows || cols) && s != 3 && s != 4) {
                    continue;
                }
                int64_t toks[] = {1, 4, 32};
                for (int tk = 0; tk < 3; tk++) {
                    int64_t nt = n_tok ? n_tok : toks[tk];
                    if ((n_tok && tk > 0) || (quick && !n_tok && tk > 0)) {
                        break;
                    }
                    int rp = reps ? reps : (isa == EDGELLM_ISA_GENERIC ? 5 : 100);
                    for (int cold = 0; cold < 2; cold++) {
                        if (el_bench_case(k, &el_types[ti], r, c, nt, rp, cold)) {
                            return 1;
                        }
                    }
                }
            }
        }
    }
    return 0;
}
