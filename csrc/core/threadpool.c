// SPDX-License-Identifier: MIT
// A pthreads pool for parallel regions: n_threads-1 workers plus the calling thread, cheap barrier.
#define _GNU_SOURCE  // sched_yield, clock_gettime under -std=c11
#include "threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "edgellm.h"
#include "kernels.h"
#include "ops.h"

// How long an idle worker spins before sleeping on the condition variable. Decode runs ~5
// regions per layer with microsecond gaps, so workers spin through a token; between calls
// (sampling in Python) they sleep. 100 us costs < 1% of a core at 10 tokens/s.
#define EL_SPIN_NS 100000
// Spin iterations between clock reads (a read costs ~20 ns; a spin iteration ~1 ns).
#define EL_SPIN_CHECK 256
// The caller waiting at the barrier yields its core after this long (oversubscribed machines).
#define EL_WAIT_YIELD_NS 200000

typedef struct {
    el_threadpool *pool;
    int ith;
} el_worker;

struct el_threadpool {
    // Written by the caller per region, read by workers after they see a new gen.
    el_task_fn fn;
    void *arg;
    int n_threads;
    pthread_t *threads;  // (n_threads - 1)
    el_worker *workers;  // (n_threads - 1)
    pthread_mutex_t mu;
    pthread_cond_t cv;
    // Each hot counter on its own cache line: workers poll gen, the caller polls n_done.
    alignas(64) atomic_uint gen;  // bumped once per region (and once to stop)
    alignas(64) atomic_int n_done;  // workers finished with the current region
    alignas(64) atomic_int n_sleeping;  // workers inside the condvar wait
    atomic_int stop;
};

// --------------------------------------------------------------------------
// Time

static int64_t el_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

// --------------------------------------------------------------------------
// Workers

// Waits until gen differs from seen: spin first, then sleep. Returns the new gen.
static unsigned el_wait_gen(el_threadpool *p, unsigned seen) {
    unsigned g;
    int64_t t0 = 0;
    for (unsigned i = 1;; i++) {
        g = atomic_load_explicit(&p->gen, memory_order_acquire);
        if (g != seen) return g;
        if (i % EL_SPIN_CHECK == 0) {
            const int64_t t = el_now_ns();
            if (t0 == 0) t0 = t;
            else if (t - t0 > EL_SPIN_NS) break;
        }
    }
    // Sleep. n_sleeping is raised before re-reading gen (both seq_cst), and the caller bumps gen
    // before reading n_sleeping, so either we see the new gen or the caller sees us and wakes us.
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->n_sleeping, 1);
    while ((g = atomic_load(&p->gen)) == seen) pthread_cond_wait(&p->cv, &p->mu);
    atomic_fetch_sub(&p->n_sleeping, 1);
    pthread_mutex_unlock(&p->mu);
    return g;
}

static void *el_worker_main(void *arg) {
    el_worker *w = arg;
    el_threadpool *p = w->pool;
    unsigned seen = 0;
    el_fp_flush_denormals();  // workers run only edgellm regions: no need to restore
    for (;;) {
        seen = el_wait_gen(p, seen);
        if (atomic_load_explicit(&p->stop, memory_order_acquire)) break;
        p->fn(p->arg, w->ith, p->n_threads);
        atomic_fetch_add_explicit(&p->n_done, 1, memory_order_release);
    }
    return NULL;
}

// --------------------------------------------------------------------------
// Lifecycle

static void el_threadpool_stop(el_threadpool *p, int n_started) {
    atomic_store_explicit(&p->stop, 1, memory_order_release);
    atomic_fetch_add(&p->gen, 1);
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < n_started; i++) pthread_join(p->threads[i], NULL);
}

int32_t el_threadpool_new(int n_threads, el_threadpool **out) {
    if (out == NULL || n_threads < 1)
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "thread pool: n_threads %d < 1",
                            n_threads);
    *out = NULL;
    // aligned_alloc needs a size that is a multiple of the alignment.
    const size_t bytes = (sizeof(el_threadpool) + 63) / 64 * 64;
    el_threadpool *p = aligned_alloc(64, bytes);
    if (p == NULL) return el_set_error(EDGELLM_STATUS_ERR_NOMEM, "thread pool: %zu bytes", bytes);
    memset(p, 0, bytes);
    p->n_threads = n_threads;
    atomic_init(&p->gen, 0);
    atomic_init(&p->n_done, 0);
    atomic_init(&p->n_sleeping, 0);
    atomic_init(&p->stop, 0);
    if (pthread_mutex_init(&p->mu, NULL) != 0) {
        free(p);
        return el_set_error(EDGELLM_STATUS_ERR_NOMEM, "thread pool: pthread_mutex_init failed");
    }
    if (pthread_cond_init(&p->cv, NULL) != 0) {
        pthread_mutex_destroy(&p->mu);
        free(p);
        return el_set_error(EDGELLM_STATUS_ERR_NOMEM, "thread pool: pthread_cond_init failed");
    }
    const int n_workers = n_threads - 1;
    if (n_workers > 0) {
        p->threads = calloc((size_t)n_workers, sizeof *p->threads);
        p->workers = calloc((size_t)n_workers, sizeof *p->workers);
        if (p->threads == NULL || p->workers == NULL) {
            el_threadpool_free(p);
            return el_set_error(EDGELLM_STATUS_ERR_NOMEM, "thread pool: %d workers", n_workers);
        }
    }
    for (int i = 0; i < n_workers; i++) {
        p->workers[i].pool = p;
        p->workers[i].ith = i + 1;
        const int rc = pthread_create(&p->threads[i], NULL, el_worker_main, &p->workers[i]);
        if (rc != 0) {
            el_threadpool_stop(p, i);
            p->n_threads = 1;  // the stopped workers are joined; free must not join again
            el_threadpool_free(p);
            return el_set_error(EDGELLM_STATUS_ERR_NOMEM,
                                "thread pool: creating worker %d of %d failed: %s", i + 1,
                                n_workers, strerror(rc));
        }
    }
    *out = p;
    return EDGELLM_STATUS_OK;
}

void el_threadpool_free(el_threadpool *p) {
    if (p == NULL) return;
    if (p->n_threads > 1 && p->threads != NULL && p->workers != NULL)
        el_threadpool_stop(p, p->n_threads - 1);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p->threads);
    free(p->workers);
    free(p);
}

int el_threadpool_size(const el_threadpool *p) { return p->n_threads; }

// --------------------------------------------------------------------------
// Parallel region

void el_threadpool_run(el_threadpool *p, el_task_fn fn, void *arg) {
    const int nth = p->n_threads;
    if (nth == 1) {
        fn(arg, 0, 1);
        return;
    }
    p->fn = fn;
    p->arg = arg;
    // Every worker counted the previous region before the caller left it, so no stale add.
    atomic_store_explicit(&p->n_done, 0, memory_order_relaxed);
    atomic_fetch_add(&p->gen, 1);  // seq_cst: publishes fn/arg and orders the read below
    if (atomic_load(&p->n_sleeping) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    fn(arg, 0, nth);
    // Barrier: spin on the workers' counter; yield the core if they are slow to come.
    int64_t t0 = 0;
    for (unsigned i = 1; atomic_load_explicit(&p->n_done, memory_order_acquire) != nth - 1; i++) {
        if (i % EL_SPIN_CHECK == 0) {
            const int64_t t = el_now_ns();
            if (t0 == 0) t0 = t;
            else if (t - t0 > EL_WAIT_YIELD_NS) sched_yield();
        }
    }
}
