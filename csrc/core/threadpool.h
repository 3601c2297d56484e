// SPDX-License-Identifier: MIT
// A pthreads pool for parallel regions: n_threads-1 workers plus the calling thread, cheap barrier.
#ifndef EL_THREADPOOL_H
#define EL_THREADPOOL_H

#include <stdint.h>

// One parallel region's body: called once per thread with ith in [0, nth); thread 0 is the caller.
typedef void (*el_task_fn)(void *arg, int ith, int nth);

typedef struct el_threadpool el_threadpool;

// Starts n_threads - 1 workers (n_threads >= 1). Returns an edgellm_status; sets the detail.
int32_t el_threadpool_new(int n_threads, el_threadpool **out);
// Stops and joins the workers; NULL is a no-op.
void el_threadpool_free(el_threadpool *p);
int el_threadpool_size(const el_threadpool *p);
// Runs fn(arg, ith, nth) on every thread and returns when all have finished (the barrier).
// Not reentrant: one region at a time, from the thread that created the pool.
void el_threadpool_run(el_threadpool *p, el_task_fn fn, void *arg);

#endif  // EL_THREADPOOL_H
