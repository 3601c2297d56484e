// SPDX-License-Identifier: MIT
// DRAM read bandwidth: T threads each sum their slice of one buffer; prints JSON (best, median).
// Usage: bandwidth THREADS MIB REPS. Built and run by bench/common.py (read_bandwidth).
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    const uint64_t *p;
    size_t n;  // words in this thread's slice
    pthread_barrier_t *start;
    uint64_t sum;      // kept so the compiler cannot drop the loads
    double t0, t1;     // this reader's own start and end: the main thread may not be on a
                       // core when the barrier opens (T readers on T cores), so it can't time
} slice;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *reader(void *arg) {
    slice *s = arg;
    pthread_barrier_wait(s->start);
    s->t0 = now();
    // Eight independent accumulators so the adds never limit the load rate.
    uint64_t a[8] = {0};
    for (size_t i = 0; i + 8 <= s->n; i += 8)
        for (int k = 0; k < 8; k++) a[k] += s->p[i + k];
    for (int k = 0; k < 8; k++) s->sum += a[k];
    s->t1 = now();
    return NULL;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s THREADS MIB REPS\n", argv[0]);
        return 2;
    }
    const int t = atoi(argv[1]), reps = atoi(argv[3]);
    const size_t bytes = (size_t)atol(argv[2]) << 20, words = bytes / 8;
    if (t < 1 || t > 256 || reps < 1 || words < (size_t)t * 8) return 2;
    uint64_t *buf = aligned_alloc(64, bytes);
    if (!buf) return 1;
    for (size_t i = 0; i < words; i++) buf[i] = i;  // touch every page before timing
    double *bw = calloc(reps, sizeof *bw);
    slice *sl = calloc(t, sizeof *sl);
    pthread_t *th = calloc(t, sizeof *th);
    pthread_barrier_t start;
    uint64_t check = 0;
    for (int r = 0; r < reps; r++) {
        pthread_barrier_init(&start, NULL, t + 1);
        for (int i = 0; i < t; i++) {
            sl[i] = (slice){buf + words / t * i, words / t, &start, 0, 0, 0};
            pthread_create(&th[i], NULL, reader, &sl[i]);
        }
        pthread_barrier_wait(&start);
        double t0 = 0, t1 = 0;  // first start to last end over the readers
        for (int i = 0; i < t; i++) {
            pthread_join(th[i], NULL);
            t0 = i == 0 || sl[i].t0 < t0 ? sl[i].t0 : t0;
            t1 = sl[i].t1 > t1 ? sl[i].t1 : t1;
            check += sl[i].sum;
        }
        const double dt = t1 - t0;
        bw[r] = (double)(words / t * t * 8) / dt;
        pthread_barrier_destroy(&start);
    }
    qsort(bw, reps, sizeof *bw, cmp);
    printf("{\"best_bytes_per_s\": %.0f, \"median_bytes_per_s\": %.0f, \"checksum\": %llu}\n",
           bw[reps - 1], bw[reps / 2], (unsigned long long)(check & 0xffff));
    free(th);
    free(sl);
    free(bw);
    free(buf);
    return 0;
}
