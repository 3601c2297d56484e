// SPDX-License-Identifier: MIT
// A session: the KV cache, scratch and thread pool of one conversation, and the batched forward.
#define _GNU_SOURCE  // sysconf(_SC_NPROCESSORS_ONLN)
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "edgellm.h"
#include "kernels.h"
#include "model.h"
#include "ops.h"
#include "threadpool.h"

// Tokens per forward pass of a batched prefill. Bounds the scratch (64 x hidden_dim f32 is
// 1.4 MB for TinyLlama) while giving the matmul kernels enough tokens to reuse each weight
// row many times per load.
#define EL_CHUNK 64
// Matmul row ranges start on multiples of 32: one Q8_0 block, so a thread can quantise the
// outputs it computed, and a multiple of every kernel's row tile, so each output element is
// computed by the same code path whatever the thread count.
#define EL_ROW_ALIGN 32
// More threads than this is a caller bug (no edge board has that many cores).
#define EL_MAX_THREADS 256
// Scratch buffers start on a cache line.
#define EL_ALIGN 64
// A decode step cuts each kv head's positions into chunks of >= 128 (a multiple of 32)
// that threads share, merged afterwards flash-decoding style; the cut depends only on the
// position, so results do not depend on the thread count. At most 16 chunks per head.
#define EL_ATT_SPLIT_LEN 128
#define EL_ATT_MAX_SPLIT 16
// The values product runs over whole blocks of 32 positions, the SIMD kernels' unit: the last
// n % 32 positions go through a zero-padded copy instead of the scalar tail of the kernels.
#define EL_KV_PAD 32
// A LoRA stage's A products (rank x n_in per token and pair) run on the calling thread below
// this many multiply-adds (64 KB of F16 A for one token): waking the pool (a few us) costs
// more. Either way each output comes from the same kernel call, so results do not change.
#define EL_LORA_INLINE_MACS (1 << 15)

// What the current parallel region works on (set by the caller thread before each region).
typedef struct {
    const el_kernel_table *kt;
    const el_layer *L;
    int32_t layer;
    int32_t p0;       // position of the pass's first token
    int64_t n_tok;    // tokens in the pass
    // Norm regions: rows [row0, row0 + n_tok) of x -> rows [0, n_tok) of xn (and xq_in).
    const float *norm_w;  // (dim) f32
    int64_t row0;
    int norm_quant;       // also quantise xn to Q8_0
    // Matmul regions.
    const el_tensor *w;
    const float *xf;              // (n_tok, w->ne0) f32 input
    const el_block_q8_0 *xq;      // (n_tok, w->ne0 / 32) the same input as Q8_0
    float *y;                     // output rows
    int64_t y_stride;             // floats between output rows
    int quant_out;                // quantise this region's outputs into xq_mid
    // Attention regions.
    int64_t att_split;            // position chunks per (kv head, token): 1 = no merge
    int64_t att_len;              // positions per chunk when att_split > 1
    // LoRA: the adapter of this eval (NULL: none) and the pairs of the current stage.
    const edgellm_adapter *ad;
    float ad_scale;               // the scale given to attach
    const el_lora *lo[3];         // the stage's pairs in role order; NULL = not adapted
    float lo_scale[3];            // ad_scale * alpha / rank of each pair
    float *lo_t[3];               // (n_tok, rank) A x of each pair, unscaled
    const float *lo_x;            // (n_tok, n_in) f32 input of the stage
} el_pass;

struct edgellm_session {
    const edgellm_model *m;
    int32_t n_ctx;
    int32_t n_ctx_pad; // n_ctx rounded up to EL_KV_PAD: the row length of scores
    int32_t kv_type;   // EDGELLM_TYPE_F32 or EDGELLM_TYPE_F16
    int32_t pos;       // positions held in the KV cache
    int32_t chunk;     // tokens per forward pass
    int32_t n_threads;
    // f32 or f16, per layer K then V, per kv head: K as (n_ctx, head_dim) and V transposed,
    // (head_dim, n_ctx), so both attention products are matmul kernel calls (rows = positions
    // for scores, rows = dims for values; the group's query heads are the "tokens").
    void *kv;
    size_t kv_bytes;
    void *arena;       // every scratch buffer below, one allocation
    float *rope_cos;   // (n_ctx, rope_dim / 2)
    float *rope_sin;   // (n_ctx, rope_dim / 2)
    float *x;          // (chunk, dim) residual stream
    float *xn;         // (chunk, dim) normalised stream
    float *q;          // (chunk, q_dim)
    float *k;          // (chunk, kv_dim)
    float *v;          // (chunk, kv_dim)
    float *att;        // (chunk, q_dim) attention output
    float *hb;         // (chunk, hidden_dim) gate, then silu(gate) * up
    float *hb2;        // (chunk, hidden_dim) up
    float *tmp;        // (chunk, dim) a matmul output before its residual add
    el_block_q8_0 *xq_in;   // (chunk, max_cols / 32) Q8_0 of xn
    el_block_q8_0 *xq_mid;  // (chunk, max_cols / 32) Q8_0 of att or hb
    float *scores;     // (n_threads, n_rep, n_ctx_pad) attention weights of one unit's heads
    void *vtail;       // (n_threads, head_dim, 32) kv type: the last n % 32 value columns, padded
    float *otail;      // (n_threads, n_rep, head_dim) the values product over those columns
    float *att_ml;     // (n_threads, 2, n_rep) softmax max and sum of one unit's heads
    float *part_o;     // (n_heads, EL_ATT_MAX_SPLIT, head_dim) unnormalised chunk outputs
    float *part_m;     // (n_heads, EL_ATT_MAX_SPLIT) chunk score maxima
    float *part_l;     // (n_heads, EL_ATT_MAX_SPLIT) chunk softmax sums
    // LoRA scratch, allocated at the first eval that needs it (an adapter may come later).
    float *lora_t;     // (chunk, stage_rank) the A products of one stage
    int32_t lora_cap;  // stage_rank lora_t was sized for (0: none)
    uint32_t adapter_epoch;  // the model's adapter_epoch when this cache was started
    el_threadpool *pool;
    el_pass pass;
};

// --------------------------------------------------------------------------
// Sizes

static int el_is_quant(int kind) { return kind == EL_WK_Q4_0 || kind == EL_WK_Q8_0; }

static int32_t el_kv_size(const edgellm_model *m, int32_t n_ctx, int32_t kv_type, size_t *out) {
    if (m == NULL) return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "kv cache: model is NULL");
    if (n_ctx < 1 || n_ctx > m->cfg.seq_len)
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                            "kv cache: n_ctx = %d is outside [1, seq_len = %d]", n_ctx,
                            m->cfg.seq_len);
    if (kv_type != EDGELLM_TYPE_F32 && kv_type != EDGELLM_TYPE_F16)
        return el_set_error(EDGELLM_STATUS_ERR_UNSUPPORTED,
                            "kv cache: kv_type %d is not supported (F32=%d, F16=%d)", kv_type,
                            EDGELLM_TYPE_F32, EDGELLM_TYPE_F16);
    const uint64_t elt = kv_type == EDGELLM_TYPE_F32 ? 4 : 2;
    // The config bounds keep this below 2^52; only a 32-bit size_t can overflow.
    const uint64_t bytes = 2 * (uint64_t)m->cfg.n_layers * (uint64_t)n_ctx * (uint64_t)m->kv_dim * elt;
    if (bytes > SIZE_MAX)
        return el_set_error(EDGELLM_STATUS_ERR_NOMEM, "kv cache: %llu bytes exceed size_t",
                            (unsigned long long)bytes);
    *out = (size_t)bytes;
    return EDGELLM_STATUS_OK;
}

size_t edgellm_kv_cache_bytes(const edgellm_model *m, int32_t n_ctx, int32_t kv_type) {
    size_t bytes = 0;
    return el_kv_size(m, n_ctx, kv_type, &bytes) == EDGELLM_STATUS_OK ? bytes : 0;
}

// Element offset of K (which = 0) or V (which = 1) of layer l, kv head h: each is n_ctx x
// head_dim elements (see edgellm_session.kv for the layout inside).
static inline size_t el_kv_offset(const edgellm_session *s, int32_t l, int which, int64_t h) {
    const edgellm_config *c = &s->m->cfg;
    return (((size_t)l * 2 + (size_t)which) * (size_t)c->n_kv_heads + (size_t)h) *
           (size_t)s->n_ctx * (size_t)c->head_dim;
}

// --------------------------------------------------------------------------
// Lifecycle

// Carves n bytes (rounded up to a cache line) at offset *off of base (NULL: only measures).
static void *el_carve(char *base, size_t *off, size_t n) {
    void *p = base == NULL ? NULL : base + *off;
    *off += (n + EL_ALIGN - 1) / EL_ALIGN * EL_ALIGN;
    return p;
}

// Lays the scratch out from base (NULL: only measures). Returns the total bytes.
static size_t el_layout(edgellm_session *s, char *base) {
    const edgellm_model *m = s->m;
    const edgellm_config *c = &m->cfg;
    const size_t ch = (size_t)s->chunk, f = sizeof(float);
    const size_t half = (size_t)c->rope_dim / 2;
    int64_t max_cols = c->dim > c->hidden_dim ? c->dim : c->hidden_dim;
    max_cols = max_cols > m->q_dim ? max_cols : m->q_dim;
    const size_t q8_row = (size_t)((max_cols + EL_QK - 1) / EL_QK) * sizeof(el_block_q8_0);
    size_t off = 0;
    s->rope_cos = el_carve(base, &off, (size_t)s->n_ctx * half * f);
    s->rope_sin = el_carve(base, &off, (size_t)s->n_ctx * half * f);
    s->x = el_carve(base, &off, ch * (size_t)c->dim * f);
    s->xn = el_carve(base, &off, ch * (size_t)c->dim * f);
    s->tmp = el_carve(base, &off, ch * (size_t)c->dim * f);
    s->q = el_carve(base, &off, ch * (size_t)m->q_dim * f);
    s->att = el_carve(base, &off, ch * (size_t)m->q_dim * f);
    s->k = el_carve(base, &off, ch * (size_t)m->kv_dim * f);
    s->v = el_carve(base, &off, ch * (size_t)m->kv_dim * f);
    s->hb = el_carve(base, &off, ch * (size_t)c->hidden_dim * f);
    s->hb2 = el_carve(base, &off, ch * (size_t)c->hidden_dim * f);
    s->xq_in = el_carve(base, &off, ch * q8_row);
    s->xq_mid = el_carve(base, &off, ch * q8_row);
    const size_t nth = (size_t)s->n_threads, hd = (size_t)c->head_dim;
    const size_t n_rep = (size_t)(c->n_heads / c->n_kv_heads), nh = (size_t)c->n_heads;
    s->scores = el_carve(base, &off, nth * n_rep * (size_t)s->n_ctx_pad * f);
    s->vtail = el_carve(base, &off, nth * hd * EL_KV_PAD * f);  // f32 size also fits f16
    s->otail = el_carve(base, &off, nth * n_rep * hd * f);
    s->att_ml = el_carve(base, &off, nth * 2 * n_rep * f);
    s->part_o = el_carve(base, &off, nh * EL_ATT_MAX_SPLIT * hd * f);
    s->part_m = el_carve(base, &off, nh * EL_ATT_MAX_SPLIT * f);
    s->part_l = el_carve(base, &off, nh * EL_ATT_MAX_SPLIT * f);
    return off;
}

// cos/sin of (p / rope_scale) * rope_base^(-2i / rope_dim), computed in double.
static void el_rope_tables(edgellm_session *s) {
    const edgellm_config *c = &s->m->cfg;
    const int32_t half = c->rope_dim / 2;
    for (int32_t i = 0; i < half; i++) {
        const double theta = pow((double)c->rope_base, -2.0 * i / (double)c->rope_dim);
        for (int32_t p = 0; p < s->n_ctx; p++) {
            const double angle = ((double)p / (double)c->rope_scale) * theta;
            s->rope_cos[(size_t)p * half + i] = (float)cos(angle);
            s->rope_sin[(size_t)p * half + i] = (float)sin(angle);
        }
    }
}

static int el_online_cpus(void) {
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > EL_MAX_THREADS ? EL_MAX_THREADS : (int)n;
}

int32_t edgellm_session_new(const edgellm_model *m, int32_t n_ctx, int32_t kv_type,
                            int32_t n_threads, edgellm_session **out) {
    if (out == NULL) return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "session_new: out is NULL");
    *out = NULL;
    if (m == NULL) return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "session_new: model is NULL");
    if (!m->finalized)
        return el_set_error(EDGELLM_STATUS_ERR_STATE,
                            "session_new: the model is not finalized (call edgellm_model_finalize)");
    size_t kv_bytes = 0;
    int32_t st = el_kv_size(m, n_ctx, kv_type, &kv_bytes);
    if (st != EDGELLM_STATUS_OK) return st;
    if (n_threads > EL_MAX_THREADS)
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "session_new: n_threads = %d > %d",
                            n_threads, EL_MAX_THREADS);
    edgellm_session *s = calloc(1, sizeof *s);
    if (s == NULL) return el_set_error(EDGELLM_STATUS_ERR_NOMEM, "session_new: %zu bytes", sizeof *s);
    s->m = m;
    s->n_ctx = n_ctx;
    s->n_ctx_pad = (n_ctx + EL_KV_PAD - 1) / EL_KV_PAD * EL_KV_PAD;
    s->kv_type = kv_type;
    s->chunk = n_ctx < EL_CHUNK ? n_ctx : EL_CHUNK;
    s->n_threads = n_threads <= 0 ? el_online_cpus() : n_threads;
    s->kv_bytes = kv_bytes;
    // calloc: the pages of key rows past the positions in use are not committed until reached.
    s->kv = calloc(1, kv_bytes);
    const size_t arena_bytes = el_layout(s, NULL);
    s->arena = aligned_alloc(EL_ALIGN, arena_bytes);
    if (s->kv == NULL || s->arena == NULL) {
        edgellm_session_free(s);
        return el_set_error(EDGELLM_STATUS_ERR_NOMEM,
                            "session_new: KV cache %zu bytes + scratch %zu bytes", kv_bytes,
                            arena_bytes);
    }
    el_layout(s, s->arena);
    el_rope_tables(s);
    st = el_threadpool_new(s->n_threads, &s->pool);
    if (st != EDGELLM_STATUS_OK) {
        edgellm_session_free(s);
        return st;
    }
    *out = s;
    return EDGELLM_STATUS_OK;
}

void edgellm_session_free(edgellm_session *s) {
    if (s == NULL) return;
    el_threadpool_free(s->pool);
    free(s->lora_t);
    free(s->arena);
    free(s->kv);
    free(s);
}

int32_t edgellm_session_pos(const edgellm_session *s) { return s == NULL ? 0 : s->pos; }

int32_t edgellm_session_n_ctx(const edgellm_session *s) { return s == NULL ? 0 : s->n_ctx; }

int32_t edgellm_session_truncate(edgellm_session *s, int32_t n_keep) {
    if (s == NULL) return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "truncate: session is NULL");
    if (n_keep < 0 || n_keep > s->pos)
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                            "truncate: n_keep = %d is outside [0, pos = %d]", n_keep, s->pos);
    // Positions >= n_keep are never read before the next eval overwrites them.
    s->pos = n_keep;
    return EDGELLM_STATUS_OK;
}

// --------------------------------------------------------------------------
// Parallel regions. Each runs on every thread; ith/nth pick a disjoint share.

// Splits [0, n) into nth ranges whose starts are multiples of align; range ith -> [r0, r1).
static inline void el_split(int64_t n, int64_t align, int ith, int nth, int64_t *r0, int64_t *r1) {
    const int64_t units = (n + align - 1) / align;
    const int64_t u0 = units * ith / nth, u1 = units * (ith + 1) / nth;
    *r0 = u0 * align < n ? u0 * align : n;
    *r1 = u1 * align < n ? u1 * align : n;
}

// y[t * y_stride + r] = w row r . input row t, for r in [r0, r1): Q8_0 input for quantised w.
static inline void el_mm(const el_kernel_table *kt, const el_tensor *w, const float *xf,
                         const el_block_q8_0 *xq, float *y, int64_t y_stride, int64_t r0,
                         int64_t r1, int64_t n_tok) {
    if (r0 >= r1) return;
    if (el_is_quant(w->kind))
        kt->matmul[w->kind](w->data, w->row_bytes, xq, (size_t)(w->ne0 / EL_QK) * sizeof(el_block_q8_0),
                            y, y_stride, w->ne0, r0, r1, n_tok);
    else
        kt->matmul[w->kind](w->data, w->row_bytes, xf, (size_t)w->ne0 * sizeof(float), y, y_stride,
                            w->ne0, r0, r1, n_tok);
}

// xn rows = rmsnorm(x rows) * norm_w, then Q8_0 when a quantised matmul reads them. Over tokens.
static void el_task_norm(void *arg, int ith, int nth) {
    edgellm_session *s = arg;
    const el_pass *P = &s->pass;
    const int64_t dim = s->m->cfg.dim;
    int64_t t0, t1;
    el_split(P->n_tok, 1, ith, nth, &t0, &t1);
    for (int64_t t = t0; t < t1; t++) {
        float *xn = s->xn + t * dim;
        el_rmsnorm(xn, s->x + (P->row0 + t) * dim, P->norm_w, dim, s->m->cfg.norm_eps);
        if (P->norm_quant) P->kt->quantize_q8_0(xn, s->xq_in + t * (dim / EL_QK), dim);
    }
}

// Adds bias: (rows) to y: (n_tok, y_stride) over rows [r0, r1).
static inline void el_add_bias(float *y, int64_t y_stride, const el_tensor *b, int64_t r0,
                               int64_t r1, int64_t n_tok) {
    if (b->data == NULL || r0 >= r1) return;
    const float *bias = (const float *)b->data + r0;  // (r1 - r0)
    for (int64_t t = 0; t < n_tok; t++) el_add_f32(y + t * y_stride + r0, bias, r1 - r0);
}

// --- LoRA: y += scale * B (A x). A x runs as its own region per stage (el_lora_stage); the
// B product joins the region of the base matmul, on the same rows.

// Units of the A products of the stage: (pair k, 32-row block of A) -> t_k rows.
static void el_task_lora_a(void *arg, int ith, int nth) {
    edgellm_session *s = arg;
    const el_pass *P = &s->pass;
    int64_t n_units = 0;
    for (int k = 0; k < 3; k++)
        if (P->lo[k] != NULL) n_units += (P->lo[k]->a.ne1 + EL_ROW_ALIGN - 1) / EL_ROW_ALIGN;
    int64_t u0, u1;
    el_split(n_units, 1, ith, nth, &u0, &u1);
    int64_t u = 0;
    for (int k = 0; k < 3 && u < u1; k++) {
        const el_lora *lo = P->lo[k];
        if (lo == NULL) continue;
        const int64_t rank = lo->a.ne1;
        for (int64_t r0 = 0; r0 < rank; r0 += EL_ROW_ALIGN, u++) {
            if (u < u0 || u >= u1) continue;
            const int64_t r1 = r0 + EL_ROW_ALIGN < rank ? r0 + EL_ROW_ALIGN : rank;
            el_mm(P->kt, &lo->a, P->lo_x, NULL, P->lo_t[k], rank, r0, r1, P->n_tok);
        }
    }
}

// Chooses the pairs of roles[0..n) in layer (from the eval's adapter) and computes their A
// products of the pass's n_tok rows of x: (n_tok, n_in) f32. Clears the stage without one.
static void el_lora_stage(edgellm_session *s, const int32_t *roles, int n, int32_t layer,
                          const float *x) {
    el_pass *P = &s->pass;
    size_t off = 0;
    int64_t macs = 0;
    for (int k = 0; k < 3; k++) {
        const el_lora *lo = P->ad != NULL && k < n ? el_adapter_lora(P->ad, roles[k], layer) : NULL;
        P->lo[k] = lo;
        if (lo == NULL) continue;
        P->lo_t[k] = s->lora_t + off;
        P->lo_scale[k] = P->ad_scale * lo->alpha_r;
        off += (size_t)(P->n_tok * lo->a.ne1);
        macs += P->n_tok * lo->a.ne1 * lo->a.ne0;
    }
    if (macs == 0) return;
    P->lo_x = x;
    if (macs < EL_LORA_INLINE_MACS) el_task_lora_a(s, 0, 1);
    else el_threadpool_run(s->pool, el_task_lora_a, s);
}

// y rows [r0, r1) of n_tok tokens (y_stride apart) += lo_scale[k] * B_k t_k, as rank axpys
// over the rows of B^T: each output adds the same terms in the same order on any thread.
static inline void el_lora_add(const edgellm_session *s, int k, float *y, int64_t y_stride,
                               int64_t r0, int64_t r1, int64_t n_tok) {
    const el_pass *P = &s->pass;
    const el_lora *lo = P->lo[k];
    if (lo == NULL || r0 >= r1) return;
    const int64_t rank = lo->b.ne0, n_out = lo->b.ne1;
    for (int64_t t = 0; t < n_tok; t++) {
        const float *tt = P->lo_t[k] + t * rank;  // (rank)
        float *yt = y + t * y_stride + r0;
        for (int64_t j = 0; j < rank; j++)
            el_axpy(yt, P->lo_scale[k] * tt[j], lo->bt + j * n_out + r0, r1 - r0);
    }
}

// q, k, v = Wq xn, Wk xn, Wv xn (+ biases): one region over the rows of all three.
static void el_task_qkv(void *arg, int ith, int nth) {
    edgellm_session *s = arg;
    const el_pass *P = &s->pass;
    const el_layer *L = P->L;
    const int64_t qd = s->m->q_dim, kvd = s->m->kv_dim, n = P->n_tok;
    int64_t a, b;
    el_split(qd + 2 * kvd, EL_ROW_ALIGN, ith, nth, &a, &b);
    // Rows [a, b) of the stacked [Wq; Wk; Wv], cut into each matrix's own row numbers.
    const el_tensor *w[3] = {&L->wq, &L->wk, &L->wv};
    const el_tensor *bias[3] = {&L->bq, &L->bk, &L->bv};
    float *y[3] = {s->q, s->k, s->v};
    const int64_t base[3] = {0, qd, qd + kvd}, rows[3] = {qd, kvd, kvd};
    for (int i = 0; i < 3; i++) {
        const int64_t r0 = a - base[i] > 0 ? a - base[i] : 0;
        const int64_t r1 = b - base[i] < rows[i] ? b - base[i] : rows[i];
        if (r0 >= r1) continue;
        el_mm(P->kt, w[i], s->xn, s->xq_in, y[i], rows[i], r0, r1, n);
        el_add_bias(y[i], rows[i], bias[i], r0, r1, n);
        el_lora_add(s, i, y[i], rows[i], r0, r1, n);
    }
}

// Attention of the n_rep query heads of kv head g for token t over positions [j0, j1), on
// thread ith: o_r: [head_dim] (at o + r * o_stride) = sum_j exp(scale (s_rj - m_r)) v_j,
// unnormalised, with s_rj = q_r . k_j, m_r = max_j s_rj and l_r = sum_j exp(scale (s_rj - m_r))
// stored at m[r * ml_stride], l[r * ml_stride]. Both products run as matmul kernels over the
// cache (f16 rows widened in SIMD registers), each key and value read once for all n_rep heads.
static void el_attend(edgellm_session *s, int ith, int64_t g, int64_t t, int64_t j0, int64_t j1,
                      float *o, size_t o_stride, float *m, float *l, size_t ml_stride) {
    const edgellm_config *c = &s->m->cfg;
    const int64_t hd = c->head_dim, n_rep = c->n_heads / c->n_kv_heads, n_ctx = s->n_ctx;
    const int64_t ldp = s->n_ctx_pad;  // row length of scores
    const int64_t n = j1 - j0, n_main = n / EL_KV_PAD * EL_KV_PAD, n_tail = n - n_main;
    const float scale = 1.0f / sqrtf((float)hd);
    const el_matmul_fn mm = s->pass.kt->matmul[s->kv_type == EDGELLM_TYPE_F16 ? EL_WK_F16 : EL_WK_F32];
    const size_t elt = s->kv_type == EDGELLM_TYPE_F16 ? sizeof(uint16_t) : sizeof(float);
    const float *q = s->q + t * s->m->q_dim + g * n_rep * hd;       // (n_rep, head_dim)
    float *sc = s->scores + (size_t)ith * (size_t)(n_rep * ldp);     // (n_rep, n_ctx_pad)
    const char *K = (const char *)s->kv + el_kv_offset(s, s->pass.layer, 0, g) * elt;   // (n_ctx, hd)
    const char *VT = (const char *)s->kv + el_kv_offset(s, s->pass.layer, 1, g) * elt;  // (hd, n_ctx)
    // Scores: sc[r][j - j0] = K row j . q_r.
    mm(K + (size_t)(j0 * hd) * elt, (size_t)hd * elt, q, (size_t)hd * sizeof(float), sc, ldp, hd,
       0, n, n_rep);
    // Softmax numerators, stable: exp(scale (s - max)); zeros after them up to the 32-block.
    for (int64_t r = 0; r < n_rep; r++) {
        float *sr = sc + r * ldp;
        m[r * ml_stride] = el_max(sr, n);
        l[r * ml_stride] = el_exp_sum(sr, n, m[r * ml_stride], scale);
        if (n_tail > 0) memset(sr + n, 0, (size_t)(EL_KV_PAD - n_tail) * sizeof(float));
    }
    // Values: o_r[d] = V^T row d (positions j0..j1) . sc[r], whole 32-blocks from the cache...
    if (n_main > 0)
        mm(VT + (size_t)j0 * elt, (size_t)n_ctx * elt, sc, (size_t)ldp * sizeof(float), o,
           (int64_t)o_stride, n_main, 0, hd, n_rep);
    else
        for (int64_t r = 0; r < n_rep; r++) memset(o + r * o_stride, 0, (size_t)hd * sizeof(float));
    if (n_tail == 0) return;
    // ...and the last n_tail positions from a zero-padded copy (later positions may hold other
    // tokens of this pass or stale values, which even a zero score must not touch: 0 * inf).
    char *vt = (char *)s->vtail + (size_t)ith * (size_t)hd * EL_KV_PAD * sizeof(float);  // (hd, 32)
    float *ot = s->otail + (size_t)ith * (size_t)(n_rep * hd);                           // (n_rep, hd)
    for (int64_t d = 0; d < hd; d++) {
        char *row = vt + (size_t)(d * EL_KV_PAD) * elt;
        memcpy(row, VT + (size_t)(d * n_ctx + j0 + n_main) * elt, (size_t)n_tail * elt);
        memset(row + (size_t)n_tail * elt, 0, (size_t)(EL_KV_PAD - n_tail) * elt);
    }
    mm(vt, EL_KV_PAD * elt, sc + n_main, (size_t)ldp * sizeof(float), ot, hd, EL_KV_PAD, 0, hd, n_rep);
    for (int64_t r = 0; r < n_rep; r++) el_add_f32(o + r * o_stride, ot + r * hd, hd);
}

// Causal grouped-query attention over units (kv head, token, position chunk).
static void el_task_attention(void *arg, int ith, int nth) {
    edgellm_session *s = arg;
    const el_pass *P = &s->pass;
    const edgellm_config *c = &s->m->cfg;
    const int64_t hd = c->head_dim, qd = s->m->q_dim, n = P->n_tok, ns = P->att_split;
    const int64_t n_rep = c->n_heads / c->n_kv_heads;
    int64_t u0, u1;
    // kv-head-major units: a thread's consecutive units reuse one head's K and V from cache.
    el_split(c->n_kv_heads * n * ns, 1, ith, nth, &u0, &u1);
    for (int64_t u = u0; u < u1; u++) {
        const int64_t g = u / (n * ns), t = u / ns % n, ci = u % ns;
        const int64_t n_att = (int64_t)P->p0 + t + 1;  // causal: positions 0..p0+t
        if (ns == 1) {
            // Whole range: normalise straight into the attention output row.
            float *o = s->att + t * qd + g * n_rep * hd;  // (n_rep, head_dim)
            float *ml = s->att_ml + (size_t)ith * 2 * (size_t)n_rep;
            el_attend(s, ith, g, t, 0, n_att, o, (size_t)hd, ml, ml + n_rep, 1);
            for (int64_t r = 0; r < n_rep; r++) el_scale(o + r * hd, 1.0f / ml[n_rep + r], hd);
            // n_rep * head_dim % 32 == 0 here: this kv head's slice of the row is whole blocks.
            if (P->quant_out)
                P->kt->quantize_q8_0(o, s->xq_mid + t * (qd / EL_QK) + g * n_rep * hd / EL_QK,
                                     n_rep * hd);
        } else {
            // One chunk: keep its partial result for el_merge_chunks.
            const int64_t j0 = ci * P->att_len;
            const int64_t j1 = j0 + P->att_len < n_att ? j0 + P->att_len : n_att;
            const size_t h0 = (size_t)(g * n_rep) * EL_ATT_MAX_SPLIT + (size_t)ci;
            el_attend(s, ith, g, t, j0, j1, s->part_o + h0 * (size_t)hd, EL_ATT_MAX_SPLIT * (size_t)hd,
                      s->part_m + h0, s->part_l + h0, EL_ATT_MAX_SPLIT);
        }
    }
}

// Combines the chunk partials of a split decode step into the attention row (token 0):
// out_h = sum_c w_c o_c / sum_c w_c l_c with w_c = exp(scale (m_c - M)), M = max_c m_c.
static void el_merge_chunks(edgellm_session *s, int64_t ns) {
    const edgellm_config *c = &s->m->cfg;
    const int64_t hd = c->head_dim;
    const float scale = 1.0f / sqrtf((float)hd);
    for (int64_t h = 0; h < c->n_heads; h++) {
        const float *m = s->part_m + h * EL_ATT_MAX_SPLIT, *l = s->part_l + h * EL_ATT_MAX_SPLIT;
        const float mx = el_max(m, ns);
        float *out = s->att + h * hd;
        memset(out, 0, (size_t)hd * sizeof(float));
        float sum = 0.0f;
        for (int64_t ci = 0; ci < ns; ci++) {
            const float wgt = el_expf((m[ci] - mx) * scale);
            sum += wgt * l[ci];
            el_axpy(out, wgt, s->part_o + (h * EL_ATT_MAX_SPLIT + ci) * hd, hd);
        }
        el_scale(out, 1.0f / sum, hd);
    }
}

// x += W input (Wo after attention, W_down after the FFN): over output rows.
static void el_task_matmul_residual(void *arg, int ith, int nth) {
    edgellm_session *s = arg;
    const el_pass *P = &s->pass;
    const int64_t dim = s->m->cfg.dim;
    int64_t r0, r1;
    el_split(dim, EL_ROW_ALIGN, ith, nth, &r0, &r1);
    if (r0 >= r1) return;
    el_mm(P->kt, P->w, P->xf, P->xq, s->tmp, dim, r0, r1, P->n_tok);
    el_lora_add(s, 0, s->tmp, dim, r0, r1, P->n_tok);
    for (int64_t t = 0; t < P->n_tok; t++)
        el_add_f32(s->x + t * dim + r0, s->tmp + t * dim + r0, r1 - r0);
}

// hb = silu(W_gate xn) * (W_up xn), then Q8_0 of hb for W_down: over hidden rows.
static void el_task_ffn_up(void *arg, int ith, int nth) {
    edgellm_session *s = arg;
    const el_pass *P = &s->pass;
    const int64_t hid = s->m->cfg.hidden_dim;
    int64_t r0, r1;
    el_split(hid, EL_ROW_ALIGN, ith, nth, &r0, &r1);
    if (r0 >= r1) return;
    el_mm(P->kt, &P->L->w_gate, s->xn, s->xq_in, s->hb, hid, r0, r1, P->n_tok);
    el_mm(P->kt, &P->L->w_up, s->xn, s->xq_in, s->hb2, hid, r0, r1, P->n_tok);
    el_lora_add(s, 0, s->hb, hid, r0, r1, P->n_tok);
    el_lora_add(s, 1, s->hb2, hid, r0, r1, P->n_tok);
    for (int64_t t = 0; t < P->n_tok; t++) {
        float *h = s->hb + t * hid + r0;
        el_silu_mul(h, s->hb2 + t * hid + r0, r1 - r0);
        // r0 is a multiple of 32 and hidden_dim too (W_down is quantised): whole blocks.
        if (P->quant_out)
            P->kt->quantize_q8_0(h, s->xq_mid + t * (hid / EL_QK) + r0 / EL_QK, r1 - r0);
    }
}

// logits rows = W_output xn rows: over vocabulary rows.
static void el_task_logits(void *arg, int ith, int nth) {
    edgellm_session *s = arg;
    const el_pass *P = &s->pass;
    int64_t r0, r1;
    el_split(P->w->ne1, EL_ROW_ALIGN, ith, nth, &r0, &r1);
    el_mm(P->kt, P->w, s->xn, s->xq_in, P->y, P->y_stride, r0, r1, P->n_tok);
    el_lora_add(s, 0, P->y, P->y_stride, r0, r1, P->n_tok);
}

// --------------------------------------------------------------------------
// Forward

// x: [dim] = row tok of token_embd, dequantised.
static void el_embed(const el_tensor *e, int32_t tok, float *x) {
    const void *row = (const char *)e->data + (size_t)tok * e->row_bytes;
    switch (e->type) {
        case EDGELLM_TYPE_F32: memcpy(x, row, (size_t)e->ne0 * sizeof(float)); break;
        case EDGELLM_TYPE_F16: el_dequantize_row_f16(row, x, e->ne0); break;
        case EDGELLM_TYPE_Q8_0: el_dequantize_row_q8_0(row, x, e->ne0); break;
        case EDGELLM_TYPE_Q4_0: el_dequantize_row_q4_0(row, x, e->ne0); break;
        default: break;  // set_tensor admits only the four types above
    }
}

// Rows [row0, row0 + n) of x -> normalised rows [0, n) of xn (+ Q8_0): parallel over tokens
// in a prefill, on the calling thread for one token (a region costs more than one row).
static void el_norm(edgellm_session *s, const el_tensor *w, int64_t row0, int64_t n, int quant) {
    el_pass *P = &s->pass;
    P->norm_w = w->data;
    P->row0 = row0;
    P->n_tok = n;
    P->norm_quant = quant;
    if (n == 1) el_task_norm(s, 0, 1);
    else el_threadpool_run(s->pool, el_task_norm, s);
}

// RoPE on the pass's q and k rows, then k and v into the cache at positions p0...
static void el_rope_store(edgellm_session *s, int32_t l, int32_t p0, int64_t n) {
    const edgellm_config *c = &s->m->cfg;
    const int64_t hd = c->head_dim, qd = s->m->q_dim, kvd = s->m->kv_dim, n_ctx = s->n_ctx;
    const int32_t half = c->rope_dim / 2;
    for (int64_t t = 0; t < n; t++) {
        const int32_t pos = p0 + (int32_t)t;
        const float *cs = s->rope_cos + (size_t)pos * half, *sn = s->rope_sin + (size_t)pos * half;
        for (int64_t h = 0; h < c->n_heads; h++)
            el_rope(s->q + t * qd + h * hd, cs, sn, c->rope_dim, c->rope_mode);
        for (int64_t g = 0; g < c->n_kv_heads; g++) {
            float *kh = s->k + t * kvd + g * hd;
            const float *vh = s->v + t * kvd + g * hd;
            el_rope(kh, cs, sn, c->rope_dim, c->rope_mode);
            const size_t ko = el_kv_offset(s, l, 0, g) + (size_t)pos * (size_t)hd;  // row pos of K
            const size_t vo = el_kv_offset(s, l, 1, g) + (size_t)pos;               // column pos of V^T
            if (s->kv_type == EDGELLM_TYPE_F32) {
                float *V = (float *)s->kv + vo;
                memcpy((float *)s->kv + ko, kh, (size_t)hd * sizeof(float));
                for (int64_t d = 0; d < hd; d++) V[d * n_ctx] = vh[d];
            } else {
                uint16_t *K = (uint16_t *)s->kv + ko, *V = (uint16_t *)s->kv + vo;
                for (int64_t d = 0; d < hd; d++) {
                    K[d] = el_f32_to_f16(kh[d]);
                    V[d * n_ctx] = el_f32_to_f16(vh[d]);
                }
            }
        }
    }
}

// The projections each LoRA stage adapts, in the order of their pass's outputs.
static const int32_t k_qkv[3] = {EDGELLM_TENSOR_ATTN_Q, EDGELLM_TENSOR_ATTN_K, EDGELLM_TENSOR_ATTN_V};
static const int32_t k_wo[1] = {EDGELLM_TENSOR_ATTN_OUT};
static const int32_t k_gate_up[2] = {EDGELLM_TENSOR_FFN_GATE, EDGELLM_TENSOR_FFN_UP};
static const int32_t k_down[1] = {EDGELLM_TENSOR_FFN_DOWN};
static const int32_t k_out[1] = {EDGELLM_TENSOR_OUTPUT};

// One pass over n <= chunk tokens at positions p0...; logits: NULL, or (all ? n : 1) rows.
static void el_forward(edgellm_session *s, const el_kernel_table *kt, const int32_t *tokens,
                       int64_t n, int32_t p0, float *logits, int all) {
    const edgellm_model *m = s->m;
    const edgellm_config *c = &m->cfg;
    el_pass *P = &s->pass;
    P->kt = kt;
    P->p0 = p0;
    for (int64_t t = 0; t < n; t++) el_embed(&m->token_embd, tokens[t], s->x + t * c->dim);
    const int64_t n_rep = c->n_heads / c->n_kv_heads;
    // A single token splits long contexts into position chunks so every thread has work.
    P->att_split = 1;
    P->att_len = 0;
    if (n == 1 && p0 + 1 > EL_ATT_SPLIT_LEN) {
        const int64_t n_att = (int64_t)p0 + 1;
        int64_t ns = (n_att + EL_ATT_SPLIT_LEN - 1) / EL_ATT_SPLIT_LEN;
        ns = ns < EL_ATT_MAX_SPLIT ? ns : EL_ATT_MAX_SPLIT;
        const int64_t len = ((n_att + ns - 1) / ns + 31) / 32 * 32;
        P->att_split = (n_att + len - 1) / len;  // every chunk non-empty
        P->att_len = len;
    }

    for (int32_t l = 0; l < c->n_layers; l++) {
        const el_layer *L = &m->layers[l];
        P->L = L;
        P->layer = l;
        // Attention block: x += Wo attention(rope(Wq xn), rope(Wk xn), Wv xn).
        el_norm(s, &L->attn_norm, 0, n,
                el_is_quant(L->wq.kind) || el_is_quant(L->wk.kind) || el_is_quant(L->wv.kind));
        P->n_tok = n;
        el_lora_stage(s, k_qkv, 3, l, s->xn);
        el_threadpool_run(s->pool, el_task_qkv, s);
        el_rope_store(s, l, p0, n);
        const int wo_quant = el_is_quant(L->wo.kind);
        P->quant_out = wo_quant && P->att_split == 1 && n_rep * c->head_dim % EL_QK == 0;
        el_threadpool_run(s->pool, el_task_attention, s);
        if (P->att_split > 1) el_merge_chunks(s, P->att_split);
        if (wo_quant && !P->quant_out)  // not quantised by the attention units: whole rows here
            for (int64_t t = 0; t < n; t++)
                kt->quantize_q8_0(s->att + t * m->q_dim, s->xq_mid + t * (m->q_dim / EL_QK),
                                  m->q_dim);
        P->n_tok = n;
        el_lora_stage(s, k_wo, 1, l, s->att);
        P->w = &L->wo;
        P->xf = s->att;
        P->xq = s->xq_mid;
        el_threadpool_run(s->pool, el_task_matmul_residual, s);
        // Feed-forward block: x += W_down (silu(W_gate xn) * (W_up xn)).
        el_norm(s, &L->ffn_norm, 0, n, el_is_quant(L->w_gate.kind) || el_is_quant(L->w_up.kind));
        P->n_tok = n;
        P->quant_out = el_is_quant(L->w_down.kind);
        el_lora_stage(s, k_gate_up, 2, l, s->xn);
        el_threadpool_run(s->pool, el_task_ffn_up, s);
        el_lora_stage(s, k_down, 1, l, s->hb);
        P->w = &L->w_down;
        P->xf = s->hb;
        P->xq = s->xq_mid;
        el_threadpool_run(s->pool, el_task_matmul_residual, s);
    }

    if (logits == NULL) return;
    // Only the rows whose logits are wanted go through the final norm and the output matmul.
    const el_tensor *out = el_model_output(m);
    const int64_t rows = all ? n : 1;
    el_norm(s, &m->output_norm, n - rows, rows, el_is_quant(out->kind));
    P->n_tok = rows;
    el_lora_stage(s, k_out, 1, -1, s->xn);
    P->w = out;
    P->y = logits;
    P->y_stride = c->vocab_size;
    el_threadpool_run(s->pool, el_task_logits, s);
}

// Makes the LoRA scratch fit adapter a (NULL: nothing to do); kept for later evals.
static int32_t el_lora_scratch(edgellm_session *s, const edgellm_adapter *a) {
    if (a == NULL || a->stage_rank <= s->lora_cap) return EDGELLM_STATUS_OK;
    size_t bytes = 0;
    el_carve(NULL, &bytes, (size_t)s->chunk * (size_t)a->stage_rank * sizeof(float));
    float *buf = aligned_alloc(EL_ALIGN, bytes);
    if (buf == NULL)
        return el_set_error(EDGELLM_STATUS_ERR_NOMEM, "eval: LoRA scratch of %zu bytes", bytes);
    free(s->lora_t);
    s->lora_t = buf;
    s->lora_cap = a->stage_rank;
    return EDGELLM_STATUS_OK;
}

int32_t edgellm_session_eval(edgellm_session *s, const int32_t *tokens, int32_t n_tokens,
                             int32_t logits_mode, float *logits) {
    if (s == NULL) return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "eval: session is NULL");
    if (tokens == NULL) return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "eval: tokens is NULL");
    if (n_tokens < 1)
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "eval: n_tokens = %d < 1", n_tokens);
    if (logits_mode != EDGELLM_LOGITS_NONE && logits_mode != EDGELLM_LOGITS_LAST &&
        logits_mode != EDGELLM_LOGITS_ALL)
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                            "eval: logits_mode %d is not NONE (0), LAST (1) or ALL (2)", logits_mode);
    if (logits_mode != EDGELLM_LOGITS_NONE && logits == NULL)
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "eval: logits is NULL for mode %d",
                            logits_mode);
    if ((int64_t)s->pos + n_tokens > s->n_ctx)
        return el_set_error(EDGELLM_STATUS_ERR_CONTEXT_FULL,
                            "eval: pos %d + n_tokens %d exceeds n_ctx %d", s->pos, n_tokens,
                            s->n_ctx);
    const int32_t vocab = s->m->cfg.vocab_size;
    for (int32_t i = 0; i < n_tokens; i++)
        if (tokens[i] < 0 || tokens[i] >= vocab)
            return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                                "eval: token id %d at position %d is outside [0, vocab_size = %d)",
                                tokens[i], i, vocab);
    const el_kernel_table *kt = el_kernels();
    if (kt == NULL) return el_set_error(EDGELLM_STATUS_ERR_ISA, "eval: no kernel table is usable");
    // The adapter is read once per call: every chunk of this eval runs under the same one.
    const edgellm_model *m = s->m;
    if (s->pos > 0 && s->adapter_epoch != m->adapter_epoch)
        return el_set_error(EDGELLM_STATUS_ERR_STATE,
                            "eval: an adapter was attached or detached since this session's cache "
                            "was filled; truncate it to 0 and evaluate the prompt again");
    const int32_t st = el_lora_scratch(s, m->adapter);
    if (st != EDGELLM_STATUS_OK) return st;
    s->adapter_epoch = m->adapter_epoch;
    s->pass.ad = m->adapter;
    s->pass.ad_scale = m->adapter_scale;

    // Long prompts run in passes of `chunk` tokens, each batched through every matmul. The
    // caller's float mode is borrowed for the call (the workers keep theirs).
    const uint32_t fp_saved = el_fp_flush_denormals();
    for (int32_t c0 = 0; c0 < n_tokens; c0 += s->chunk) {
        const int32_t n = n_tokens - c0 < s->chunk ? n_tokens - c0 : s->chunk;
        const int last = c0 + n == n_tokens;
        float *out = NULL;
        if (logits_mode == EDGELLM_LOGITS_ALL) out = logits + (size_t)c0 * (size_t)vocab;
        else if (logits_mode == EDGELLM_LOGITS_LAST && last) out = logits;
        el_forward(s, kt, tokens + c0, n, s->pos + c0, out, logits_mode == EDGELLM_LOGITS_ALL);
    }
    el_fp_restore(fp_saved);
    s->pos += n_tokens;
    return EDGELLM_STATUS_OK;
}
