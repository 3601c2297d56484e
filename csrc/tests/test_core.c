// SPDX-License-Identifier: MIT
// C-only tests of the transformer core: forward vs a double reference, batching, KV cache, errors.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "edgellm.h"
#include "kernels.h"
#include "ops.h"
#include "threadpool.h"

// Tolerances, relative to the largest |logit| of the reference:
// f32 rounding through 2 layers against a double reference (measured ~1e-7).
#define TOL_REF_F32 1e-5
// Q8_0 activations (8-bit, 1/254 of each block's range) against f32 activations (measured ~7e-3).
#define TOL_REF_QUANT 2e-2
// The same computation batched vs token by token: only summation order may differ.
#define TOL_BATCH 1e-5
// Q8_0 activations: a last-bit difference may flip one activation's rounding (1/127 of a block).
#define TOL_BATCH_QUANT 2e-3
// An F16 KV cache rounds K and V to 11 significant bits.
#define TOL_KV_F16 1e-2

static int g_failures;
static int g_checks;

#define CHECK(cond)                                                                   \
    do {                                                                              \
        g_checks++;                                                                   \
        if (!(cond)) {                                                                \
            g_failures++;                                                             \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);  \
        }                                                                             \
    } while (0)

// Checks a status and, for failures, that the detail message names needle (NULL: no check).
static void check_status(int32_t st, int32_t want, const char *needle, const char *expr,
                         const char *file, int line) {
    g_checks++;
    if (st != want) {
        g_failures++;
        fprintf(stderr, "%s:%d: %s returned %d (%s), want %d; detail: %s\n", file, line, expr, st,
                edgellm_status_str(st), (int)want, edgellm_last_error());
    } else if (needle != NULL && strstr(edgellm_last_error(), needle) == NULL) {
        g_failures++;
        fprintf(stderr, "%s:%d: detail \"%s\" lacks \"%s\"\n", file, line, edgellm_last_error(), needle);
    }
}

#define CHECK_STATUS(expr, want, needle) check_status((expr), (want), (needle), #expr, __FILE__, __LINE__)

// --------------------------------------------------------------------------
// Deterministic random numbers (xorshift64*)

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

static double rnd_uniform(void) {  // [-1, 1)
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return (double)((g_rng * 0x2545F4914F6CDD1Dull) >> 11) / (double)(1ull << 52) - 1.0;
}

// --------------------------------------------------------------------------
// A tiny model in memory

typedef struct {
    void *data;     // as registered (type `type`)
    float *f;       // (ne1, ne0) the same values as f32, for the reference
    int32_t type;
    int64_t ne0, ne1;
    size_t nbytes;
} ttensor;

typedef struct {
    edgellm_config cfg;
    int32_t wtype;  // type of every matrix, token_embd included
    int bias;       // has q/k/v biases
    int tied;       // no output tensor
    ttensor glob[3];          // by role: token_embd, output_norm, output
    ttensor (*lay)[EDGELLM_TENSOR_ROLE_COUNT];  // (n_layers) by role
    edgellm_model *m;
} tmodel;

static edgellm_config small_config(void) {
    edgellm_config c = {
        .arch = EDGELLM_ARCH_LLAMA, .dim = 64, .hidden_dim = 96, .n_layers = 2, .n_heads = 4,
        // seq_len 150: not a multiple of 32, so a full context ends in a partial 32-block
        .n_kv_heads = 2, .head_dim = 16, .vocab_size = 96, .seq_len = 150,
        .rope_mode = EDGELLM_ROPE_NORM, .rope_dim = 16, .rope_base = 10000.0f,
        .rope_scale = 1.0f, .norm_eps = 1e-5f,
    };
    return c;
}

static ttensor *tm_get(tmodel *tm, int32_t role, int32_t layer) {
    return role < EDGELLM_TENSOR_ATTN_NORM ? &tm->glob[role] : &tm->lay[layer][role];
}

// Expected shape of a role under cfg (ne0 = columns, ne1 = rows).
static void role_shape(const edgellm_config *c, int32_t role, int64_t *ne0, int64_t *ne1) {
    const int64_t qd = (int64_t)c->n_heads * c->head_dim, kvd = (int64_t)c->n_kv_heads * c->head_dim;
    *ne1 = 1;
    switch (role) {
        case EDGELLM_TENSOR_TOKEN_EMBD:
        case EDGELLM_TENSOR_OUTPUT: *ne0 = c->dim; *ne1 = c->vocab_size; break;
        case EDGELLM_TENSOR_ATTN_Q: *ne0 = c->dim; *ne1 = qd; break;
        case EDGELLM_TENSOR_ATTN_K:
        case EDGELLM_TENSOR_ATTN_V: *ne0 = c->dim; *ne1 = kvd; break;
        case EDGELLM_TENSOR_ATTN_OUT: *ne0 = qd; *ne1 = c->dim; break;
        case EDGELLM_TENSOR_ATTN_Q_BIAS: *ne0 = qd; break;
        case EDGELLM_TENSOR_ATTN_K_BIAS:
        case EDGELLM_TENSOR_ATTN_V_BIAS: *ne0 = kvd; break;
        case EDGELLM_TENSOR_FFN_GATE:
        case EDGELLM_TENSOR_FFN_UP: *ne0 = c->dim; *ne1 = c->hidden_dim; break;
        case EDGELLM_TENSOR_FFN_DOWN: *ne0 = c->hidden_dim; *ne1 = c->dim; break;
        default: *ne0 = c->dim; break;  // norms
    }
}

static int role_is_vector(int32_t role) {
    return role == EDGELLM_TENSOR_OUTPUT_NORM || role == EDGELLM_TENSOR_ATTN_NORM ||
           role == EDGELLM_TENSOR_FFN_NORM || (role >= EDGELLM_TENSOR_ATTN_Q_BIAS &&
                                               role <= EDGELLM_TENSOR_ATTN_V_BIAS);
}

// Fills one tensor with random values (matrices ~ U(-1,1)/sqrt(cols), norms ~ 1 +- 0.2,
// biases ~ +-0.1), stored as its type and kept dequantised for the reference.
static void tm_fill(tmodel *tm, int32_t role, int32_t layer) {
    ttensor *t = tm_get(tm, role, layer);
    role_shape(&tm->cfg, role, &t->ne0, &t->ne1);
    t->type = role_is_vector(role) ? EDGELLM_TYPE_F32 : tm->wtype;
    const int64_t n = t->ne0 * t->ne1;
    t->f = malloc((size_t)n * sizeof(float));
    const double s = role == EDGELLM_TENSOR_TOKEN_EMBD ? 1.0 : 1.0 / sqrt((double)t->ne0);
    for (int64_t i = 0; i < n; i++) {
        const double u = rnd_uniform();
        if (role >= EDGELLM_TENSOR_ATTN_Q_BIAS && role <= EDGELLM_TENSOR_ATTN_V_BIAS) t->f[i] = (float)(0.1 * u);
        else if (role_is_vector(role)) t->f[i] = (float)(1.0 + 0.2 * u);
        else t->f[i] = (float)(s * u);
    }
    t->nbytes = (size_t)(n / edgellm_type_block_size(t->type)) * edgellm_type_block_bytes(t->type);
    t->data = malloc(t->nbytes);
    CHECK(edgellm_quantize(t->type, t->f, t->data, n) == EDGELLM_STATUS_OK);
    CHECK(edgellm_dequantize(t->type, t->data, t->f, n) == EDGELLM_STATUS_OK);
}

static int32_t tm_register(tmodel *tm, int32_t role, int32_t layer) {
    const ttensor *t = tm_get(tm, role, layer);
    return edgellm_model_set_tensor(tm->m, role, layer, t->type, t->data, t->ne0, t->ne1, t->nbytes);
}

static int tm_role_present(const tmodel *tm, int32_t role) {
    if (role == EDGELLM_TENSOR_OUTPUT) return !tm->tied;
    if (role >= EDGELLM_TENSOR_ATTN_Q_BIAS && role <= EDGELLM_TENSOR_ATTN_V_BIAS) return tm->bias;
    return 1;
}

// Builds, registers and finalizes a model (same seed -> same weights); patch, when given, edits
// the F32 weights after they are drawn and before they are registered.
static void tm_build_patched(tmodel *tm, const edgellm_config *cfg, int32_t wtype, int bias,
                             int tied, uint64_t seed, void (*patch)(tmodel *)) {
    memset(tm, 0, sizeof *tm);
    g_rng = seed;
    tm->cfg = *cfg;
    tm->wtype = wtype;
    tm->bias = bias;
    tm->tied = tied;
    tm->lay = calloc((size_t)cfg->n_layers, sizeof *tm->lay);
    CHECK_STATUS(edgellm_model_new(cfg, &tm->m), EDGELLM_STATUS_OK, NULL);
    for (int32_t role = 0; role < EDGELLM_TENSOR_ATTN_NORM; role++)
        if (tm_role_present(tm, role)) tm_fill(tm, role, -1);
    for (int32_t l = 0; l < cfg->n_layers; l++)
        for (int32_t role = EDGELLM_TENSOR_ATTN_NORM; role < EDGELLM_TENSOR_ROLE_COUNT; role++)
            if (tm_role_present(tm, role)) tm_fill(tm, role, l);
    if (patch != NULL) patch(tm);
    for (int32_t role = 0; role < EDGELLM_TENSOR_ATTN_NORM; role++)
        if (tm_role_present(tm, role)) CHECK_STATUS(tm_register(tm, role, -1), EDGELLM_STATUS_OK, NULL);
    for (int32_t l = 0; l < cfg->n_layers; l++)
        for (int32_t role = EDGELLM_TENSOR_ATTN_NORM; role < EDGELLM_TENSOR_ROLE_COUNT; role++)
            if (tm_role_present(tm, role)) CHECK_STATUS(tm_register(tm, role, l), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_model_finalize(tm->m), EDGELLM_STATUS_OK, NULL);
}

static void tm_build(tmodel *tm, const edgellm_config *cfg, int32_t wtype, int bias, int tied,
                     uint64_t seed) {
    tm_build_patched(tm, cfg, wtype, bias, tied, seed, NULL);
}

static void tt_free(ttensor *t) {
    free(t->data);
    free(t->f);
}

static void tm_free(tmodel *tm) {
    edgellm_model_free(tm->m);
    for (int i = 0; i < 3; i++) tt_free(&tm->glob[i]);
    for (int32_t l = 0; l < tm->cfg.n_layers; l++)
        for (int r = 0; r < EDGELLM_TENSOR_ROLE_COUNT; r++) tt_free(&tm->lay[l][r]);
    free(tm->lay);
}

// --------------------------------------------------------------------------
// Reference forward: double precision, one position at a time, straight from the description.

static void ref_matvec(const ttensor *w, const double *x, double *y) {  // y: [ne1] = W [ne1, ne0] x
    for (int64_t r = 0; r < w->ne1; r++) {
        double s = 0;
        for (int64_t c = 0; c < w->ne0; c++) s += (double)w->f[r * w->ne0 + c] * x[c];
        y[r] = s;
    }
}

static void ref_rmsnorm(const double *x, const ttensor *w, double *out, int64_t n, double eps) {
    double ss = 0;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const double sc = 1.0 / sqrt(ss / (double)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * sc * w->f[i];
}

static void ref_rope(const edgellm_config *c, double *x, int pos) {  // one head
    const int half = c->rope_dim / 2;
    for (int i = 0; i < half; i++) {
        const double ang = (pos / (double)c->rope_scale) * pow(c->rope_base, -2.0 * i / c->rope_dim);
        const int a = c->rope_mode == EDGELLM_ROPE_NEOX ? i : 2 * i;
        const int b = c->rope_mode == EDGELLM_ROPE_NEOX ? i + half : 2 * i + 1;
        const double x0 = x[a], x1 = x[b];
        x[a] = x0 * cos(ang) - x1 * sin(ang);
        x[b] = x0 * sin(ang) + x1 * cos(ang);
    }
}

// tokens: [n] -> logits: [n, vocab_size].
static void ref_forward(tmodel *tm, const int32_t *tokens, int n, double *logits) {
    const edgellm_config *c = &tm->cfg;
    const int64_t dim = c->dim, hd = c->head_dim, qd = c->n_heads * hd, kvd = c->n_kv_heads * hd;
    const int64_t hid = c->hidden_dim;
    double *x = malloc(dim * sizeof *x), *xn = malloc(dim * sizeof *x), *q = malloc(qd * sizeof *x);
    double *att = malloc(qd * sizeof *x), *o = malloc(dim * sizeof *x);
    double *g = malloc(hid * sizeof *x), *u = malloc(hid * sizeof *x);
    double *kc = malloc((size_t)c->n_layers * n * kvd * sizeof *x);  // (n_layers, n, kv_dim)
    double *vc = malloc((size_t)c->n_layers * n * kvd * sizeof *x);
    double *sc = malloc((size_t)n * sizeof *x);
    for (int p = 0; p < n; p++) {
        const ttensor *e = &tm->glob[EDGELLM_TENSOR_TOKEN_EMBD];
        for (int64_t i = 0; i < dim; i++) x[i] = e->f[(int64_t)tokens[p] * dim + i];
        for (int l = 0; l < c->n_layers; l++) {
            ttensor *L = tm->lay[l];
            double *k = kc + ((size_t)l * n + p) * kvd, *v = vc + ((size_t)l * n + p) * kvd;
            ref_rmsnorm(x, &L[EDGELLM_TENSOR_ATTN_NORM], xn, dim, c->norm_eps);
            ref_matvec(&L[EDGELLM_TENSOR_ATTN_Q], xn, q);
            ref_matvec(&L[EDGELLM_TENSOR_ATTN_K], xn, k);
            ref_matvec(&L[EDGELLM_TENSOR_ATTN_V], xn, v);
            if (tm->bias) {
                for (int64_t i = 0; i < qd; i++) q[i] += L[EDGELLM_TENSOR_ATTN_Q_BIAS].f[i];
                for (int64_t i = 0; i < kvd; i++) k[i] += L[EDGELLM_TENSOR_ATTN_K_BIAS].f[i];
                for (int64_t i = 0; i < kvd; i++) v[i] += L[EDGELLM_TENSOR_ATTN_V_BIAS].f[i];
            }
            for (int h = 0; h < c->n_heads; h++) ref_rope(c, q + h * hd, p);
            for (int h = 0; h < c->n_kv_heads; h++) ref_rope(c, k + h * hd, p);
            for (int h = 0; h < c->n_heads; h++) {
                const int kh = h / (c->n_heads / c->n_kv_heads);
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j <= p; j++) {
                    const double *kj = kc + ((size_t)l * n + j) * kvd + kh * hd;
                    double s = 0;
                    for (int64_t i = 0; i < hd; i++) s += q[h * hd + i] * kj[i];
                    sc[j] = s / sqrt((double)hd);
                    mx = sc[j] > mx ? sc[j] : mx;
                }
                for (int j = 0; j <= p; j++) sum += (sc[j] = exp(sc[j] - mx));
                for (int64_t i = 0; i < hd; i++) att[h * hd + i] = 0;
                for (int j = 0; j <= p; j++) {
                    const double *vj = vc + ((size_t)l * n + j) * kvd + kh * hd;
                    for (int64_t i = 0; i < hd; i++) att[h * hd + i] += sc[j] / sum * vj[i];
                }
            }
            ref_matvec(&L[EDGELLM_TENSOR_ATTN_OUT], att, o);
            for (int64_t i = 0; i < dim; i++) x[i] += o[i];
            ref_rmsnorm(x, &L[EDGELLM_TENSOR_FFN_NORM], xn, dim, c->norm_eps);
            ref_matvec(&L[EDGELLM_TENSOR_FFN_GATE], xn, g);
            ref_matvec(&L[EDGELLM_TENSOR_FFN_UP], xn, u);
            for (int64_t i = 0; i < hid; i++) g[i] = g[i] / (1.0 + exp(-g[i])) * u[i];
            ref_matvec(&L[EDGELLM_TENSOR_FFN_DOWN], g, o);
            for (int64_t i = 0; i < dim; i++) x[i] += o[i];
        }
        ref_rmsnorm(x, &tm->glob[EDGELLM_TENSOR_OUTPUT_NORM], xn, dim, c->norm_eps);
        const ttensor *out = tm->tied ? &tm->glob[EDGELLM_TENSOR_TOKEN_EMBD] : &tm->glob[EDGELLM_TENSOR_OUTPUT];
        ref_matvec(out, xn, logits + (size_t)p * c->vocab_size);
    }
    free(x); free(xn); free(q); free(att); free(o); free(g); free(u); free(kc); free(vc); free(sc);
}

// --------------------------------------------------------------------------
// Helpers

// max |a - b| / max |b| over n values.
static double rel_diff(const float *a, const float *b, size_t n) {
    double d = 0, m = 1e-30;
    for (size_t i = 0; i < n; i++) {
        const double e = fabs((double)a[i] - b[i]);
        d = e > d || isnan(e) ? e : d;
        m = fabs((double)b[i]) > m ? fabs((double)b[i]) : m;
    }
    return d / m;
}

static double rel_diff_ref(const float *a, const double *ref, size_t n) {
    double d = 0, m = 1e-30;
    for (size_t i = 0; i < n; i++) {
        const double e = fabs((double)a[i] - ref[i]);
        d = e > d || isnan(e) ? e : d;
        m = fabs(ref[i]) > m ? fabs(ref[i]) : m;
    }
    return d / m;
}

static void make_tokens(int32_t *toks, int n, int32_t vocab, uint64_t seed) {
    g_rng = seed;
    for (int i = 0; i < n; i++) toks[i] = (int32_t)((rnd_uniform() + 1.0) * 0.5 * vocab) % vocab;
}

// Evaluates tokens in one call (LOGITS_ALL) on a fresh session; logits: [n, vocab].
static void eval_all(const tmodel *tm, int32_t kv_type, int n_threads, const int32_t *toks, int n,
                     float *logits) {
    edgellm_session *s = NULL;
    CHECK_STATUS(edgellm_session_new(tm->m, tm->cfg.seq_len, kv_type, n_threads, &s), EDGELLM_STATUS_OK, NULL);
    if (s == NULL) return;
    CHECK_STATUS(edgellm_session_eval(s, toks, n, EDGELLM_LOGITS_ALL, logits), EDGELLM_STATUS_OK, NULL);
    CHECK(edgellm_session_pos(s) == n);
    edgellm_session_free(s);
}

// Evaluates tokens one call per token (LOGITS_LAST); logits: [n, vocab].
static void eval_each(const tmodel *tm, int32_t kv_type, int n_threads, const int32_t *toks, int n,
                      float *logits) {
    edgellm_session *s = NULL;
    CHECK_STATUS(edgellm_session_new(tm->m, tm->cfg.seq_len, kv_type, n_threads, &s), EDGELLM_STATUS_OK, NULL);
    if (s == NULL) return;
    for (int i = 0; i < n; i++)
        CHECK_STATUS(edgellm_session_eval(s, toks + i, 1, EDGELLM_LOGITS_LAST,
                                          logits + (size_t)i * tm->cfg.vocab_size),
                     EDGELLM_STATUS_OK, NULL);
    edgellm_session_free(s);
}

static const int32_t k_wtypes[4] = {EDGELLM_TYPE_F32, EDGELLM_TYPE_F16, EDGELLM_TYPE_Q8_0, EDGELLM_TYPE_Q4_0};

static int is_quant(int32_t t) { return t == EDGELLM_TYPE_Q8_0 || t == EDGELLM_TYPE_Q4_0; }

// --------------------------------------------------------------------------
// Tests: numerics

// The forward matches the double-precision reference, for both architectures/rope modes, every
// weight type and every ISA this machine runs; the prompt spans two prefill chunks.
static void test_reference(void) {
    edgellm_config llama = small_config();
    edgellm_config qwen = small_config();
    qwen.arch = EDGELLM_ARCH_QWEN2;
    qwen.rope_mode = EDGELLM_ROPE_NEOX;
    qwen.rope_dim = 8;  // partial rotary: the last 8 dims of each head pass through
    qwen.rope_scale = 2.0f;
    qwen.rope_base = 1000000.0f;
    qwen.n_kv_heads = 1;  // multi-query
    const edgellm_config *cfgs[2] = {&llama, &qwen};
    enum { N = 100 };
    int32_t toks[N];
    make_tokens(toks, N, llama.vocab_size, 11);
    const size_t nl = (size_t)N * llama.vocab_size;
    double *ref = malloc(nl * sizeof *ref);
    float *got = malloc(nl * sizeof *got);
    const uint32_t ok_isas = edgellm_isa_built_mask() & edgellm_isa_supported_mask();
    for (int ci = 0; ci < 2; ci++)
        for (int wi = 0; wi < 4; wi++) {
            tmodel tm;
            // qwen2: biases and tied output
            tm_build(&tm, cfgs[ci], k_wtypes[wi], ci == 1, ci == 1, 100 + wi);
            ref_forward(&tm, toks, N, ref);
            for (int32_t isa = 0; isa < EDGELLM_ISA_COUNT; isa++) {
                if (!(ok_isas & (1u << isa))) continue;
                CHECK_STATUS(edgellm_isa_select(edgellm_isa_name(isa)), EDGELLM_STATUS_OK, NULL);
                eval_all(&tm, EDGELLM_TYPE_F32, 2, toks, N, got);
                const double d = rel_diff_ref(got, ref, nl);
                const double tol = is_quant(k_wtypes[wi]) ? TOL_REF_QUANT : TOL_REF_F32;
                printf("reference: %s %-4s %-7s rel diff %.3g (tol %.3g)\n", ci ? "qwen2" : "llama",
                       k_wtypes[wi] == EDGELLM_TYPE_F32 ? "F32" : k_wtypes[wi] == EDGELLM_TYPE_F16 ? "F16"
                       : k_wtypes[wi] == EDGELLM_TYPE_Q8_0 ? "Q8_0" : "Q4_0", edgellm_isa_name(isa), d, tol);
                CHECK(d <= tol);
            }
            tm_free(&tm);
        }
    CHECK_STATUS(edgellm_isa_select(NULL), EDGELLM_STATUS_OK, NULL);
    free(ref);
    free(got);
}

// Batched prefill == token by token; LOGITS_LAST == the last row of LOGITS_ALL; NONE then LAST.
static void test_batched_vs_single(void) {
    const edgellm_config cfg = small_config();
    enum { N = 150 };  // crosses two prefill chunks; decode past 128 splits attention in chunks
    int32_t toks[N];
    make_tokens(toks, N, cfg.vocab_size, 12);
    const size_t V = (size_t)cfg.vocab_size, nl = (size_t)N * V;
    float *all = malloc(nl * sizeof *all), *each = malloc(nl * sizeof *each), *last = malloc(V * sizeof *last);
    for (int wi = 0; wi < 4; wi++) {
        // Both cache types, each with two weight types; one thread (test_threads covers more).
        const int32_t kv_type = wi % 2 ? EDGELLM_TYPE_F16 : EDGELLM_TYPE_F32;
        tmodel tm;
        tm_build(&tm, &cfg, k_wtypes[wi], 0, 0, 200 + wi);
        eval_all(&tm, kv_type, 1, toks, N, all);
        eval_each(&tm, kv_type, 1, toks, N, each);
        const double d = rel_diff(all, each, nl);
        const double tol = is_quant(k_wtypes[wi]) ? TOL_BATCH_QUANT : TOL_BATCH;
        printf("batched vs single: type %d kv %d rel diff %.3g (tol %.3g)\n", k_wtypes[wi], kv_type, d, tol);
        CHECK(d <= tol);
        // LAST after a NONE prefix: same as the final row of ALL.
        edgellm_session *s = NULL;
        CHECK_STATUS(edgellm_session_new(tm.m, cfg.seq_len, kv_type, 2, &s), EDGELLM_STATUS_OK, NULL);
        CHECK_STATUS(edgellm_session_eval(s, toks, 40, EDGELLM_LOGITS_NONE, NULL), EDGELLM_STATUS_OK, NULL);
        CHECK_STATUS(edgellm_session_eval(s, toks + 40, N - 40, EDGELLM_LOGITS_LAST, last), EDGELLM_STATUS_OK, NULL);
        CHECK(rel_diff(last, all + (size_t)(N - 1) * V, V) <= tol);
        edgellm_session_free(s);
        tm_free(&tm);
    }
    free(all);
    free(each);
    free(last);
}

// An F16 KV cache stays close to the F32 one.
static void test_kv_f16(void) {
    const edgellm_config cfg = small_config();
    enum { N = 40 };
    int32_t toks[N];
    make_tokens(toks, N, cfg.vocab_size, 13);
    const size_t nl = (size_t)N * cfg.vocab_size;
    float *a = malloc(nl * sizeof *a), *b = malloc(nl * sizeof *b);
    tmodel tm;
    tm_build(&tm, &cfg, EDGELLM_TYPE_F32, 0, 0, 300);
    eval_all(&tm, EDGELLM_TYPE_F32, 1, toks, N, a);
    eval_all(&tm, EDGELLM_TYPE_F16, 1, toks, N, b);
    const double d = rel_diff(b, a, nl);
    printf("kv f16 vs f32: rel diff %.3g (tol %.3g)\n", d, TOL_KV_F16);
    CHECK(d <= TOL_KV_F16);
    CHECK(d > 0);  // the F16 cache really rounds
    tm_free(&tm);
    free(a);
    free(b);
}

// 1 and 3 threads give bit-identical logits (row ranges start on 32-row boundaries).
static void test_threads(void) {
    const edgellm_config cfg = small_config();
    enum { N = 33 };
    int32_t toks[N];
    make_tokens(toks, N, cfg.vocab_size, 14);
    const size_t nl = (size_t)N * cfg.vocab_size;
    float *a = malloc(nl * sizeof *a), *b = malloc(nl * sizeof *b), *c = malloc(nl * sizeof *c);
    for (int wi = 0; wi < 4; wi++) {
        tmodel tm;
        tm_build(&tm, &cfg, k_wtypes[wi], 1, 0, 400 + wi);
        eval_all(&tm, EDGELLM_TYPE_F32, 1, toks, N, a);
        eval_all(&tm, EDGELLM_TYPE_F32, 3, toks, N, b);
        CHECK(memcmp(a, b, nl * sizeof *a) == 0);
        eval_each(&tm, EDGELLM_TYPE_F32, 1, toks, N, a);
        eval_each(&tm, EDGELLM_TYPE_F32, 3, toks, N, b);
        eval_each(&tm, EDGELLM_TYPE_F32, 0, toks, N, c);  // 0 = every online CPU
        CHECK(memcmp(a, b, nl * sizeof *a) == 0);
        CHECK(memcmp(a, c, nl * sizeof *a) == 0);
        tm_free(&tm);
    }
    free(a);
    free(b);
    free(c);
}

// --------------------------------------------------------------------------
// Tests: KV cache

// truncate rewinds: re-evaluating the dropped tokens reproduces their logits, and a new turn
// after a rewind equals a fresh session fed the kept prefix plus the new turn.
static void test_truncate(void) {
    const edgellm_config cfg = small_config();
    const size_t V = (size_t)cfg.vocab_size;
    enum { N = 30, KEEP = 17 };
    int32_t toks[N], other[N];
    make_tokens(toks, N, cfg.vocab_size, 15);
    make_tokens(other, N, cfg.vocab_size, 16);
    float *all = malloc(N * V * sizeof *all), *again = malloc(N * V * sizeof *again);
    float *fresh = malloc(N * V * sizeof *fresh);
    tmodel tm;
    tm_build(&tm, &cfg, EDGELLM_TYPE_Q8_0, 0, 0, 500);
    edgellm_session *s = NULL;
    CHECK_STATUS(edgellm_session_new(tm.m, 64, EDGELLM_TYPE_F32, 2, &s), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_session_eval(s, toks, N, EDGELLM_LOGITS_ALL, all), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_session_truncate(s, KEEP), EDGELLM_STATUS_OK, NULL);
    CHECK(edgellm_session_pos(s) == KEEP);
    CHECK_STATUS(edgellm_session_eval(s, toks + KEEP, N - KEEP, EDGELLM_LOGITS_ALL, again), EDGELLM_STATUS_OK, NULL);
    CHECK(memcmp(again, all + KEEP * V, (N - KEEP) * V * sizeof *all) == 0);
    // A different second turn after the rewind.
    CHECK_STATUS(edgellm_session_truncate(s, KEEP), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_session_eval(s, other, 10, EDGELLM_LOGITS_ALL, again), EDGELLM_STATUS_OK, NULL);
    int32_t joined[KEEP + 10];
    memcpy(joined, toks, KEEP * sizeof *toks);
    memcpy(joined + KEEP, other, 10 * sizeof *toks);
    eval_all(&tm, EDGELLM_TYPE_F32, 2, joined, KEEP + 10, fresh);
    CHECK(memcmp(again, fresh + KEEP * V, 10 * V * sizeof *again) == 0);
    // truncate to 0 starts over.
    CHECK_STATUS(edgellm_session_truncate(s, 0), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_session_eval(s, toks, N, EDGELLM_LOGITS_ALL, again), EDGELLM_STATUS_OK, NULL);
    CHECK(memcmp(again, all, N * V * sizeof *all) == 0);
    CHECK_STATUS(edgellm_session_truncate(s, N + 1), EDGELLM_STATUS_ERR_INVALID_ARG, "n_keep");
    CHECK_STATUS(edgellm_session_truncate(s, -1), EDGELLM_STATUS_ERR_INVALID_ARG, "n_keep");
    CHECK(edgellm_session_pos(s) == N);
    edgellm_session_free(s);
    tm_free(&tm);
    free(all);
    free(again);
    free(fresh);
}

// Token INF_TOKEN's layer-0 value, dim 0, overflows f16 (8 * 1e4 > 65504): its embedding is
// e_0 (normalised to sqrt(dim) = 8) and W_v row 0 picks dim 0 times 1e4; no other token has
// a dim-0 component. Patches F32 weights in place.
enum { INF_TOKEN = 5 };
static void patch_inf_value(tmodel *tm) {
    ttensor *e = &tm->glob[EDGELLM_TENSOR_TOKEN_EMBD];
    ttensor *wv = &tm->lay[0][EDGELLM_TENSOR_ATTN_V];
    float *ed = e->data, *wd = wv->data;
    for (int64_t v = 0; v < e->ne1; v++) ed[v * e->ne0] = e->f[v * e->ne0] = 0.0f;
    for (int64_t i = 0; i < e->ne0; i++) ed[INF_TOKEN * e->ne0 + i] = e->f[INF_TOKEN * e->ne0 + i] = i == 0;
    for (int64_t i = 0; i < wv->ne0; i++) wd[i] = wv->f[i] = i == 0 ? 1e4f : 0.0f;
}

// Attention reads exactly positions 0..pos: a value that overflowed to inf in an F16 cache
// poisons neither earlier tokens of the same batch (the values product pads its last 32-block,
// and 0 * inf is NaN) nor anything after a truncate drops it.
static void test_overflow_isolated(void) {
    const edgellm_config cfg = small_config();
    const size_t V = (size_t)cfg.vocab_size;
    int32_t toks[8] = {1, 2, 3, 4, 6, INF_TOKEN, 7, 8};
    float *got = malloc(8 * V * sizeof *got), *want = malloc(4 * V * sizeof *want);
    tmodel tm;
    tm_build_patched(&tm, &cfg, EDGELLM_TYPE_F32, 0, 0, 1000, patch_inf_value);
    edgellm_session *s = NULL;
    CHECK_STATUS(edgellm_session_new(tm.m, 40, EDGELLM_TYPE_F16, 2, &s), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_session_eval(s, toks, 8, EDGELLM_LOGITS_ALL, got), EDGELLM_STATUS_OK, NULL);
    int finite_before = 1;
    for (size_t i = 0; i < 5 * V; i++) finite_before &= isfinite(got[i]);
    CHECK(finite_before);
    CHECK(!isfinite(got[5 * V]));  // the overflow really happened (and poisons from there on)
    CHECK_STATUS(edgellm_session_truncate(s, 3), EDGELLM_STATUS_OK, NULL);
    const int32_t turn[4] = {9, 10, 11, 12};
    CHECK_STATUS(edgellm_session_eval(s, turn, 1, EDGELLM_LOGITS_ALL, got), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_session_eval(s, turn + 1, 3, EDGELLM_LOGITS_ALL, got + V), EDGELLM_STATUS_OK, NULL);
    edgellm_session_free(s);
    CHECK_STATUS(edgellm_session_new(tm.m, 40, EDGELLM_TYPE_F16, 2, &s), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_session_eval(s, toks, 3, EDGELLM_LOGITS_NONE, NULL), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_session_eval(s, turn, 1, EDGELLM_LOGITS_ALL, want), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_session_eval(s, turn + 1, 3, EDGELLM_LOGITS_ALL, want + V), EDGELLM_STATUS_OK, NULL);
    int finite = 1;
    for (size_t i = 0; i < 4 * V; i++) finite &= isfinite(got[i]);
    CHECK(finite);
    CHECK(memcmp(got, want, 4 * V * sizeof *got) == 0);
    edgellm_session_free(s);
    tm_free(&tm);
    free(got);
    free(want);
}

// A full context refuses the eval and changes nothing; the exact remainder still fits.
static void test_context_full(void) {
    const edgellm_config cfg = small_config();
    const size_t V = (size_t)cfg.vocab_size;
    enum { CTX = 16 };
    int32_t toks[CTX + 1];
    make_tokens(toks, CTX + 1, cfg.vocab_size, 17);
    float *got = malloc(CTX * V * sizeof *got), *want = malloc(CTX * V * sizeof *want);
    tmodel tm;
    tm_build(&tm, &cfg, EDGELLM_TYPE_F32, 0, 0, 600);
    edgellm_session *s = NULL;
    CHECK_STATUS(edgellm_session_new(tm.m, CTX, EDGELLM_TYPE_F16, 2, &s), EDGELLM_STATUS_OK, NULL);
    CHECK(edgellm_session_n_ctx(s) == CTX);
    CHECK_STATUS(edgellm_session_eval(s, toks, CTX + 1, EDGELLM_LOGITS_ALL, got), EDGELLM_STATUS_ERR_CONTEXT_FULL, "n_ctx");
    CHECK(edgellm_session_pos(s) == 0);
    CHECK_STATUS(edgellm_session_eval(s, toks, 10, EDGELLM_LOGITS_ALL, got), EDGELLM_STATUS_OK, NULL);
    for (int i = 0; i < 3; i++) {
        CHECK_STATUS(edgellm_session_eval(s, toks + 10, 7, EDGELLM_LOGITS_ALL, got + 10 * V), EDGELLM_STATUS_ERR_CONTEXT_FULL, "n_ctx");
        CHECK(edgellm_session_pos(s) == 10);
    }
    CHECK_STATUS(edgellm_session_eval(s, toks + 10, 6, EDGELLM_LOGITS_ALL, got + 10 * V), EDGELLM_STATUS_OK, NULL);
    CHECK(edgellm_session_pos(s) == CTX);
    CHECK_STATUS(edgellm_session_eval(s, toks, 1, EDGELLM_LOGITS_LAST, want), EDGELLM_STATUS_ERR_CONTEXT_FULL, NULL);
    edgellm_session_free(s);
    // The same 16 tokens in one fresh session: identical logits, so the refusals changed nothing.
    CHECK_STATUS(edgellm_session_new(tm.m, CTX, EDGELLM_TYPE_F16, 2, &s), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_session_eval(s, toks, 10, EDGELLM_LOGITS_ALL, want), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_session_eval(s, toks + 10, 6, EDGELLM_LOGITS_ALL, want + 10 * V), EDGELLM_STATUS_OK, NULL);
    CHECK(memcmp(got, want, CTX * V * sizeof *got) == 0);
    edgellm_session_free(s);
    tm_free(&tm);
    free(got);
    free(want);
}

// kv_cache_bytes is exact: 2 (K, V) x n_layers x n_ctx x n_kv_heads x head_dim x element size.
static void test_kv_cache_bytes(void) {
    const edgellm_config cfg = small_config();
    tmodel tm;
    tm_build(&tm, &cfg, EDGELLM_TYPE_F32, 0, 0, 700);
    const size_t per = 2 * (size_t)cfg.n_layers * cfg.n_kv_heads * cfg.head_dim;
    CHECK(edgellm_kv_cache_bytes(tm.m, 100, EDGELLM_TYPE_F32) == per * 100 * 4);
    CHECK(edgellm_kv_cache_bytes(tm.m, cfg.seq_len, EDGELLM_TYPE_F16) == per * cfg.seq_len * 2);
    CHECK(edgellm_kv_cache_bytes(tm.m, 1, EDGELLM_TYPE_F16) == per * 2);
    CHECK(edgellm_kv_cache_bytes(tm.m, 0, EDGELLM_TYPE_F32) == 0);
    CHECK(edgellm_kv_cache_bytes(tm.m, cfg.seq_len + 1, EDGELLM_TYPE_F32) == 0);
    CHECK(strstr(edgellm_last_error(), "seq_len") != NULL);
    CHECK(edgellm_kv_cache_bytes(tm.m, 10, EDGELLM_TYPE_Q8_0) == 0);
    CHECK(edgellm_kv_cache_bytes(NULL, 10, EDGELLM_TYPE_F32) == 0);
    tm_free(&tm);
}

// --------------------------------------------------------------------------
// Tests: bad input

static void test_bad_config(void) {
    edgellm_model *m = (edgellm_model *)&m;  // must be reset to NULL on failure
    edgellm_config c = small_config();
    CHECK_STATUS(edgellm_model_new(NULL, &m), EDGELLM_STATUS_ERR_INVALID_ARG, "cfg");
    CHECK(m == NULL);
    CHECK_STATUS(edgellm_model_new(&c, NULL), EDGELLM_STATUS_ERR_INVALID_ARG, "out");
#define BAD_CFG(field, value, status, needle)                     \
    do {                                                          \
        c = small_config();                                       \
        c.field = value;                                          \
        m = (edgellm_model *)&m;                                  \
        CHECK_STATUS(edgellm_model_new(&c, &m), status, needle);  \
        CHECK(m == NULL);                                         \
    } while (0)
    BAD_CFG(dim, 0, EDGELLM_STATUS_ERR_INVALID_ARG, "dim");
    BAD_CFG(hidden_dim, -5, EDGELLM_STATUS_ERR_INVALID_ARG, "hidden_dim");
    BAD_CFG(n_layers, 0, EDGELLM_STATUS_ERR_INVALID_ARG, "n_layers");
    BAD_CFG(n_heads, 0, EDGELLM_STATUS_ERR_INVALID_ARG, "n_heads");
    BAD_CFG(n_kv_heads, 3, EDGELLM_STATUS_ERR_INVALID_ARG, "n_kv_heads");
    BAD_CFG(n_kv_heads, 0, EDGELLM_STATUS_ERR_INVALID_ARG, "n_kv_heads");
    BAD_CFG(head_dim, 0, EDGELLM_STATUS_ERR_INVALID_ARG, "head_dim");
    BAD_CFG(vocab_size, 0, EDGELLM_STATUS_ERR_INVALID_ARG, "vocab_size");
    BAD_CFG(seq_len, -1, EDGELLM_STATUS_ERR_INVALID_ARG, "seq_len");
    BAD_CFG(dim, 0x7fffffff, EDGELLM_STATUS_ERR_INVALID_ARG, "dim");
    BAD_CFG(vocab_size, 0x7fffffff, EDGELLM_STATUS_ERR_INVALID_ARG, "vocab_size");
    BAD_CFG(seq_len, 0x7fffffff, EDGELLM_STATUS_ERR_INVALID_ARG, "seq_len");
    BAD_CFG(n_layers, 100000, EDGELLM_STATUS_ERR_INVALID_ARG, "n_layers");
    BAD_CFG(rope_dim, 7, EDGELLM_STATUS_ERR_INVALID_ARG, "rope_dim");
    BAD_CFG(rope_dim, 32, EDGELLM_STATUS_ERR_INVALID_ARG, "rope_dim");
    BAD_CFG(rope_dim, 0, EDGELLM_STATUS_ERR_INVALID_ARG, "rope_dim");
    BAD_CFG(rope_base, 0.0f, EDGELLM_STATUS_ERR_INVALID_ARG, "rope_base");
    BAD_CFG(rope_scale, NAN, EDGELLM_STATUS_ERR_INVALID_ARG, "rope_scale");
    BAD_CFG(norm_eps, NAN, EDGELLM_STATUS_ERR_INVALID_ARG, "norm_eps");
    BAD_CFG(norm_eps, -1e-5f, EDGELLM_STATUS_ERR_INVALID_ARG, "norm_eps");
    BAD_CFG(arch, 7, EDGELLM_STATUS_ERR_UNSUPPORTED, "arch");
    BAD_CFG(rope_mode, 2, EDGELLM_STATUS_ERR_UNSUPPORTED, "rope_mode");
#undef BAD_CFG
}

static void test_bad_tensors(void) {
    const edgellm_config cfg = small_config();
    edgellm_model *m = NULL;
    CHECK_STATUS(edgellm_model_new(&cfg, &m), EDGELLM_STATUS_OK, NULL);
    static float buf[96 * 64 + 8];  // big enough for any tensor of small_config in F32
    const size_t wq_bytes = 64 * 64 * sizeof(float);
    CHECK_STATUS(edgellm_model_set_tensor(NULL, EDGELLM_TENSOR_ATTN_Q, 0, EDGELLM_TYPE_F32, buf, 64, 64, wq_bytes),
                 EDGELLM_STATUS_ERR_INVALID_ARG, "model");
    CHECK_STATUS(edgellm_model_set_tensor(m, -1, 0, EDGELLM_TYPE_F32, buf, 64, 64, wq_bytes),
                 EDGELLM_STATUS_ERR_INVALID_ARG, "role -1");
    CHECK_STATUS(edgellm_model_set_tensor(m, EDGELLM_TENSOR_ROLE_COUNT, 0, EDGELLM_TYPE_F32, buf, 64, 64, wq_bytes),
                 EDGELLM_STATUS_ERR_INVALID_ARG, "role 15");
    CHECK_STATUS(edgellm_model_set_tensor(m, EDGELLM_TENSOR_ATTN_Q, 2, EDGELLM_TYPE_F32, buf, 64, 64, wq_bytes),
                 EDGELLM_STATUS_ERR_INVALID_ARG, "layer 2");
    CHECK_STATUS(edgellm_model_set_tensor(m, EDGELLM_TENSOR_ATTN_Q, -1, EDGELLM_TYPE_F32, buf, 64, 64, wq_bytes),
                 EDGELLM_STATUS_ERR_INVALID_ARG, "layer -1");
    CHECK_STATUS(edgellm_model_set_tensor(m, EDGELLM_TENSOR_ATTN_Q, 0, EDGELLM_TYPE_F32, NULL, 64, 64, wq_bytes),
                 EDGELLM_STATUS_ERR_INVALID_ARG, "blk.0.attn_q.weight");
    CHECK_STATUS(edgellm_model_set_tensor(m, EDGELLM_TENSOR_ATTN_Q, 0, 3, buf, 64, 64, wq_bytes),
                 EDGELLM_STATUS_ERR_UNSUPPORTED, "type 3");
    CHECK_STATUS(edgellm_model_set_tensor(m, EDGELLM_TENSOR_ATTN_Q, 0, 12 /* Q4_K */, buf, 64, 64, wq_bytes),
                 EDGELLM_STATUS_ERR_UNSUPPORTED, "type 12");
    CHECK_STATUS(edgellm_model_set_tensor(m, EDGELLM_TENSOR_ATTN_NORM, 1, EDGELLM_TYPE_F16, buf, 64, 1, 128),
                 EDGELLM_STATUS_ERR_UNSUPPORTED, "F16");
    // Shapes: transposed, wrong rows, a vector given a second dimension.
    CHECK_STATUS(edgellm_model_set_tensor(m, EDGELLM_TENSOR_FFN_DOWN, 0, EDGELLM_TYPE_F32, buf, 64, 96, 96 * 64 * 4),
                 EDGELLM_STATUS_ERR_FORMAT, "expected shape [ne0=96, ne1=64]");
    CHECK_STATUS(edgellm_model_set_tensor(m, EDGELLM_TENSOR_ATTN_K, 0, EDGELLM_TYPE_F32, buf, 64, 64, wq_bytes),
                 EDGELLM_STATUS_ERR_FORMAT, "found [ne0=64, ne1=64]");
    CHECK_STATUS(edgellm_model_set_tensor(m, EDGELLM_TENSOR_OUTPUT_NORM, -1, EDGELLM_TYPE_F32, buf, 64, 2, 512),
                 EDGELLM_STATUS_ERR_FORMAT, "expected shape");
    // nbytes: one byte short, one block long, and for a quantised type.
    CHECK_STATUS(edgellm_model_set_tensor(m, EDGELLM_TENSOR_ATTN_Q, 0, EDGELLM_TYPE_F32, buf, 64, 64, wq_bytes - 1),
                 EDGELLM_STATUS_ERR_FORMAT, "expected 16384 bytes");
    CHECK_STATUS(edgellm_model_set_tensor(m, EDGELLM_TENSOR_ATTN_Q, 0, EDGELLM_TYPE_Q8_0, buf, 64, 64, 64 * 2 * 34 + 34),
                 EDGELLM_STATUS_ERR_FORMAT, "expected 4352 bytes");
    // Misaligned data.
    CHECK_STATUS(edgellm_model_set_tensor(m, EDGELLM_TENSOR_ATTN_Q, 0, EDGELLM_TYPE_F32, (char *)buf + 1, 64, 64, wq_bytes),
                 EDGELLM_STATUS_ERR_FORMAT, "aligned");
    // A good tensor registers.
    CHECK_STATUS(edgellm_model_set_tensor(m, EDGELLM_TENSOR_ATTN_Q, 0, EDGELLM_TYPE_F32, buf, 64, 64, wq_bytes),
                 EDGELLM_STATUS_OK, NULL);
    // Missing tensors: finalize names the first one; sessions are refused before finalize.
    CHECK_STATUS(edgellm_model_finalize(m), EDGELLM_STATUS_ERR_FORMAT, "token_embd.weight");
    edgellm_session *s = (edgellm_session *)&s;
    CHECK_STATUS(edgellm_session_new(m, 16, EDGELLM_TYPE_F32, 1, &s), EDGELLM_STATUS_ERR_STATE, "finalize");
    CHECK(s == NULL);
    CHECK_STATUS(edgellm_model_finalize(NULL), EDGELLM_STATUS_ERR_INVALID_ARG, NULL);
    edgellm_model_free(m);
    edgellm_model_free(NULL);

    // Quantised rows need whole 32-blocks: dim 48 cannot be Q4_0.
    edgellm_config c48 = small_config();
    c48.dim = 48;
    CHECK_STATUS(edgellm_model_new(&c48, &m), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_model_set_tensor(m, EDGELLM_TENSOR_ATTN_Q, 0, EDGELLM_TYPE_Q4_0, buf, 48, 64, 64 * 27),
                 EDGELLM_STATUS_ERR_FORMAT, "multiple of");
    edgellm_model_free(m);

    // A complete model minus one layer tensor: finalize names exactly that one.
    tmodel tm;
    memset(&tm, 0, sizeof tm);
    g_rng = 800;
    tm.cfg = cfg;
    tm.wtype = EDGELLM_TYPE_Q4_0;
    tm.tied = 1;
    tm.lay = calloc((size_t)cfg.n_layers, sizeof *tm.lay);
    CHECK_STATUS(edgellm_model_new(&cfg, &tm.m), EDGELLM_STATUS_OK, NULL);
    for (int32_t role = 0; role < EDGELLM_TENSOR_ATTN_NORM; role++)
        if (tm_role_present(&tm, role)) {
            tm_fill(&tm, role, -1);
            CHECK_STATUS(tm_register(&tm, role, -1), EDGELLM_STATUS_OK, NULL);
        }
    for (int32_t l = 0; l < cfg.n_layers; l++)
        for (int32_t role = EDGELLM_TENSOR_ATTN_NORM; role < EDGELLM_TENSOR_ROLE_COUNT; role++)
            if (tm_role_present(&tm, role)) {
                tm_fill(&tm, role, l);
                if (!(l == 1 && role == EDGELLM_TENSOR_FFN_UP))
                    CHECK_STATUS(tm_register(&tm, role, l), EDGELLM_STATUS_OK, NULL);
            }
    CHECK_STATUS(edgellm_model_finalize(tm.m), EDGELLM_STATUS_ERR_FORMAT, "missing tensor blk.1.ffn_up.weight");
    CHECK_STATUS(tm_register(&tm, EDGELLM_TENSOR_FFN_UP, 1), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_model_finalize(tm.m), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_model_finalize(tm.m), EDGELLM_STATUS_OK, NULL);  // idempotent
    CHECK_STATUS(tm_register(&tm, EDGELLM_TENSOR_FFN_UP, 1), EDGELLM_STATUS_ERR_STATE, "finalized");
    tm_free(&tm);
}

static void test_bad_session(void) {
    const edgellm_config cfg = small_config();
    tmodel tm;
    tm_build(&tm, &cfg, EDGELLM_TYPE_Q4_0, 0, 0, 900);
    edgellm_session *s = (edgellm_session *)&s;
    CHECK_STATUS(edgellm_session_new(NULL, 16, EDGELLM_TYPE_F32, 1, &s), EDGELLM_STATUS_ERR_INVALID_ARG, "model");
    CHECK(s == NULL);
    CHECK_STATUS(edgellm_session_new(tm.m, 16, EDGELLM_TYPE_F32, 1, NULL), EDGELLM_STATUS_ERR_INVALID_ARG, "out");
    CHECK_STATUS(edgellm_session_new(tm.m, 0, EDGELLM_TYPE_F32, 1, &s), EDGELLM_STATUS_ERR_INVALID_ARG, "n_ctx");
    CHECK_STATUS(edgellm_session_new(tm.m, cfg.seq_len + 1, EDGELLM_TYPE_F32, 1, &s), EDGELLM_STATUS_ERR_INVALID_ARG, "seq_len = 150");
    CHECK_STATUS(edgellm_session_new(tm.m, 16, EDGELLM_TYPE_Q8_0, 1, &s), EDGELLM_STATUS_ERR_UNSUPPORTED, "kv_type 8");
    CHECK_STATUS(edgellm_session_new(tm.m, 16, EDGELLM_TYPE_F32, 100000, &s), EDGELLM_STATUS_ERR_INVALID_ARG, "n_threads");
    CHECK(s == NULL);

    CHECK_STATUS(edgellm_session_new(tm.m, 16, EDGELLM_TYPE_F32, 2, &s), EDGELLM_STATUS_OK, NULL);
    float logits[96 * 4];
    int32_t toks[4] = {1, 2, 3, 4};
    CHECK_STATUS(edgellm_session_eval(NULL, toks, 4, EDGELLM_LOGITS_LAST, logits), EDGELLM_STATUS_ERR_INVALID_ARG, "session");
    CHECK_STATUS(edgellm_session_eval(s, NULL, 4, EDGELLM_LOGITS_LAST, logits), EDGELLM_STATUS_ERR_INVALID_ARG, "tokens");
    CHECK_STATUS(edgellm_session_eval(s, toks, 0, EDGELLM_LOGITS_LAST, logits), EDGELLM_STATUS_ERR_INVALID_ARG, "n_tokens");
    CHECK_STATUS(edgellm_session_eval(s, toks, -3, EDGELLM_LOGITS_LAST, logits), EDGELLM_STATUS_ERR_INVALID_ARG, "n_tokens");
    CHECK_STATUS(edgellm_session_eval(s, toks, 4, 3, logits), EDGELLM_STATUS_ERR_INVALID_ARG, "logits_mode 3");
    CHECK_STATUS(edgellm_session_eval(s, toks, 4, EDGELLM_LOGITS_ALL, NULL), EDGELLM_STATUS_ERR_INVALID_ARG, "logits");
    toks[2] = cfg.vocab_size;
    CHECK_STATUS(edgellm_session_eval(s, toks, 4, EDGELLM_LOGITS_LAST, logits), EDGELLM_STATUS_ERR_INVALID_ARG,
                 "token id 96 at position 2");
    toks[2] = -7;
    CHECK_STATUS(edgellm_session_eval(s, toks, 4, EDGELLM_LOGITS_NONE, NULL), EDGELLM_STATUS_ERR_INVALID_ARG,
                 "token id -7 at position 2");
    CHECK(edgellm_session_pos(s) == 0);
    toks[2] = 3;
    CHECK_STATUS(edgellm_session_eval(s, toks, 4, EDGELLM_LOGITS_NONE, NULL), EDGELLM_STATUS_OK, NULL);
    CHECK(edgellm_session_pos(s) == 4);
    CHECK_STATUS(edgellm_session_truncate(NULL, 0), EDGELLM_STATUS_ERR_INVALID_ARG, "session");
    CHECK(edgellm_session_pos(NULL) == 0);
    CHECK(edgellm_session_n_ctx(NULL) == 0);
    edgellm_session_free(s);
    edgellm_session_free(NULL);
    tm_free(&tm);
}

// --------------------------------------------------------------------------
// Tests: parts

// el_expf is within 2 ulp of exp over the range softmax and SiLU use, and clamps outside it.
static void test_expf(void) {
    double worst = 0;
    for (int i = 0; i <= 200000; i++) {
        const float x = -87.0f + 175.0f * (float)i / 200000.0f;
        const double want = exp((double)x);
        const double err = fabs((double)el_expf(x) - want) / want;
        worst = err > worst ? err : worst;
    }
    printf("el_expf: worst relative error %.3g on [-87, 88]\n", worst);
    CHECK(worst < 2.4e-7);  // 2 ulp of f32
    CHECK(el_expf(0.0f) == 1.0f);
    CHECK(el_expf(-1000.0f) > 0.0f && el_expf(-1000.0f) < 1e-37f);
    CHECK(isfinite(el_expf(1000.0f)) && el_expf(1000.0f) > 1e38f);
}

// Flushing denormals makes a product below FLT_MIN zero, and restoring brings them back (on
// x86 and aarch64; other targets have no such mode and the check is of the restore alone).
static void test_flush_denormals(void) {
    volatile float a = 1e-30f, b = 1e-10f;  // volatile: computed at run time, not folded
    const float before = a * b;
    const uint32_t saved = el_fp_flush_denormals();
    const float flushed = a * b;
    el_fp_restore(saved);
    const float after = a * b;
#if defined(__x86_64__) || defined(__aarch64__)
    CHECK(before > 0.0f && before < 1.2e-38f);  // a denormal
    CHECK(flushed == 0.0f);
#endif
    CHECK(after == before);
}

typedef struct {
    int hits[8];  // per thread, this region
    int nth_seen;
} pool_probe;

static void probe_task(void *arg, int ith, int nth) {
    pool_probe *p = arg;
    p->hits[ith]++;
    if (ith == 0) p->nth_seen = nth;
}

// Every thread runs every region exactly once, including after workers went to sleep.
static void test_threadpool(void) {
    for (int nth = 1; nth <= 3; nth += 2) {
        el_threadpool *pool = NULL;
        CHECK_STATUS(el_threadpool_new(nth, &pool), EDGELLM_STATUS_OK, NULL);
        CHECK(el_threadpool_size(pool) == nth);
        pool_probe p;
        memset(&p, 0, sizeof p);
        int ok = 1;
        for (int r = 0; r < 1000; r++) {
            el_threadpool_run(pool, probe_task, &p);
            for (int i = 0; i < nth; i++) ok &= p.hits[i] == r + 1;
            if (r % 250 == 249) {  // idle past the spin budget: workers sleep, then must wake
                const struct timespec ts = {0, 3000000};
                nanosleep(&ts, NULL);
            }
        }
        CHECK(ok);
        CHECK(p.nth_seen == nth);
        el_threadpool_free(pool);
    }
    CHECK_STATUS(el_threadpool_new(0, NULL), EDGELLM_STATUS_ERR_INVALID_ARG, NULL);
}

// Runs one test and prints its wall time (the suite's budget on a 2-core CI machine is small).
// --------------------------------------------------------------------------
// Tests: LoRA adapters

// The projections every test adapter covers (plus OUTPUT on untied models).
static const int32_t k_lora_roles[7] = {
    EDGELLM_TENSOR_ATTN_Q, EDGELLM_TENSOR_ATTN_K, EDGELLM_TENSOR_ATTN_V, EDGELLM_TENSOR_ATTN_OUT,
    EDGELLM_TENSOR_FFN_GATE, EDGELLM_TENSOR_FFN_UP, EDGELLM_TENSOR_FFN_DOWN};

// One random pair for a base tensor: a: (rank, n_in), b: (n_out, rank), stored as `type`.
typedef struct {
    int32_t role, layer, type;
    int64_t rank, n_in, n_out;
    float *af, *bf;   // f32 values (dequantised when type is not F32), for the reference
    void *ad, *bd;    // as registered
    size_t an, bn;    // bytes
} tpair;

static void tp_make(tpair *p, const ttensor *base, int32_t role, int32_t layer, int64_t rank,
                    int32_t type) {
    p->role = role;
    p->layer = layer;
    p->type = type;
    p->rank = rank;
    p->n_in = base->ne0;
    p->n_out = base->ne1;
    const int64_t na = rank * p->n_in, nb = p->n_out * rank;
    p->af = malloc((size_t)na * sizeof(float));
    p->bf = malloc((size_t)nb * sizeof(float));
    // B A about as large as W (~U(-1, 1)/sqrt(n_in)) at scale * alpha / rank ~ 1: a real change.
    for (int64_t i = 0; i < na; i++) p->af[i] = (float)(1.2 * rnd_uniform() / sqrt((double)p->n_in));
    for (int64_t i = 0; i < nb; i++) p->bf[i] = (float)(1.2 * rnd_uniform() / sqrt((double)rank));
    p->an = (size_t)(na / edgellm_type_block_size(type)) * edgellm_type_block_bytes(type);
    p->bn = (size_t)(nb / edgellm_type_block_size(type)) * edgellm_type_block_bytes(type);
    p->ad = malloc(p->an);
    p->bd = malloc(p->bn);
    CHECK(edgellm_quantize(type, p->af, p->ad, na) == EDGELLM_STATUS_OK);
    CHECK(edgellm_quantize(type, p->bf, p->bd, nb) == EDGELLM_STATUS_OK);
    CHECK(edgellm_dequantize(type, p->ad, p->af, na) == EDGELLM_STATUS_OK);
    CHECK(edgellm_dequantize(type, p->bd, p->bf, nb) == EDGELLM_STATUS_OK);
}

static int32_t tp_register(edgellm_adapter *a, const tpair *p) {
    int32_t st = edgellm_adapter_set_tensor(a, p->role, p->layer, EDGELLM_LORA_A, p->type, p->ad,
                                            p->n_in, p->rank, p->an);
    if (st != EDGELLM_STATUS_OK) return st;
    return edgellm_adapter_set_tensor(a, p->role, p->layer, EDGELLM_LORA_B, p->type, p->bd, p->rank,
                                      p->n_out, p->bn);
}

// base->f += factor * B A, in double: the merged weights the double reference runs.
static void tp_merge(const tpair *p, ttensor *base, double factor) {
    for (int64_t r = 0; r < p->n_out; r++)
        for (int64_t c = 0; c < p->n_in; c++) {
            double d = 0;
            for (int64_t k = 0; k < p->rank; k++)
                d += (double)p->bf[r * p->rank + k] * p->af[k * p->n_in + c];
            base->f[r * p->n_in + c] = (float)((double)base->f[r * p->n_in + c] + factor * d);
        }
}

static void tp_free(tpair *p) {
    free(p->af);
    free(p->bf);
    free(p->ad);
    free(p->bd);
}

// Pairs for every projection of tm: ranks 3..9 (shorter than any SIMD vector), 40 (more
// than one 32-row block of A) and 32; types alternate F32/F16, and the two rank-32 pairs are
// Q8_0 and Q4_0 (whole blocks). Returns the count written to ps.
static int tp_make_all(tmodel *tm, tpair *ps, int with_output, uint64_t seed) {
    g_rng = seed;
    int n = 0;
    for (int32_t l = 0; l < tm->cfg.n_layers; l++)
        for (int k = 0; k < 7; k++) {
            int64_t rank = 3 + (n % 7);
            int32_t type = n % 2 ? EDGELLM_TYPE_F16 : EDGELLM_TYPE_F32;
            if (l == 1 && k == 6) rank = 40;
            if (l == 0 && k == 4) {  // ffn_gate [64, 96]: Q8_0 blocks in A's and B's rows
                rank = 32;
                type = EDGELLM_TYPE_Q8_0;
            }
            if (l == 1 && k == 0) {  // attn_q [64, 64]: Q4_0
                rank = 32;
                type = EDGELLM_TYPE_Q4_0;
            }
            tp_make(&ps[n++], &tm->lay[l][k_lora_roles[k]], k_lora_roles[k], l, rank, type);
        }
    if (with_output) tp_make(&ps[n++], &tm->glob[EDGELLM_TENSOR_OUTPUT], EDGELLM_TENSOR_OUTPUT, -1, 5,
                             EDGELLM_TYPE_F32);
    return n;
}

// Adapted logits == the double reference on merged weights W + scale * alpha / rank * B A, for
// F32/F16/Q8_0/Q4_0 bases, every ISA, a prompt spanning two prefill chunks, and single-token
// steps; detach restores the base bit for bit; scale 0 is the base bit for bit.
static void test_lora_reference(void) {
    const edgellm_config cfg = small_config();
    enum { N = 70, NP = 2 * 7 + 1 };
    int32_t toks[N];
    make_tokens(toks, N, cfg.vocab_size, 21);
    const size_t nl = (size_t)N * cfg.vocab_size;
    double *ref = malloc(nl * sizeof *ref);
    float *got = malloc(nl * sizeof *got), *base0 = malloc(nl * sizeof *base0);
    float *base1 = malloc(nl * sizeof *base1);
    const uint32_t ok_isas = edgellm_isa_built_mask() & edgellm_isa_supported_mask();
    const float alpha = 16.0f, scale = 0.5f;
    for (int wi = 0; wi < 4; wi++) {
        tmodel tm;
        const int tied = wi % 2;  // F16 and Q4_0 bases tie the output (no output pair)
        tm_build(&tm, &cfg, k_wtypes[wi], wi == 2, tied, 500 + wi);
        eval_all(&tm, EDGELLM_TYPE_F32, 2, toks, N, base0);
        tpair ps[NP];
        const int np = tp_make_all(&tm, ps, !tied, 600 + wi);
        edgellm_adapter *ad = NULL;
        CHECK_STATUS(edgellm_adapter_new(tm.m, alpha, &ad), EDGELLM_STATUS_OK, NULL);
        for (int i = 0; i < np; i++) CHECK_STATUS(tp_register(ad, &ps[i]), EDGELLM_STATUS_OK, NULL);
        CHECK_STATUS(edgellm_adapter_finalize(ad), EDGELLM_STATUS_OK, NULL);
        CHECK(edgellm_adapter_n_pairs(ad) == np);
        CHECK_STATUS(edgellm_model_attach_adapter(tm.m, ad, scale), EDGELLM_STATUS_OK, NULL);
        // The reference runs on merged weights (the registered base data is untouched).
        for (int i = 0; i < np; i++)
            tp_merge(&ps[i], tm_get(&tm, ps[i].role, ps[i].layer), scale * alpha / (double)ps[i].rank);
        ref_forward(&tm, toks, N, ref);
        const double tol = is_quant(k_wtypes[wi]) ? TOL_REF_QUANT : TOL_REF_F32;
        for (int32_t isa = 0; isa < EDGELLM_ISA_COUNT; isa++) {
            if (!(ok_isas & (1u << isa))) continue;
            CHECK_STATUS(edgellm_isa_select(edgellm_isa_name(isa)), EDGELLM_STATUS_OK, NULL);
            eval_all(&tm, EDGELLM_TYPE_F32, 2, toks, N, got);
            const double d = rel_diff_ref(got, ref, nl);
            const double moved = rel_diff_ref(base0, ref, nl);
            printf("lora reference: type %d %-7s rel diff %.3g (tol %.3g; base vs merged %.3g)\n",
                   k_wtypes[wi], edgellm_isa_name(isa), d, tol, moved);
            CHECK(d <= tol);
            CHECK(moved > 10 * tol);  // the adapter matters: the comparison can fail
        }
        CHECK_STATUS(edgellm_isa_select(NULL), EDGELLM_STATUS_OK, NULL);
        eval_each(&tm, EDGELLM_TYPE_F32, 3, toks, N, got);  // decode steps
        CHECK(rel_diff_ref(got, ref, nl) <= tol);
        // Thread counts give identical adapted logits.
        eval_all(&tm, EDGELLM_TYPE_F32, 1, toks, N, got);
        eval_all(&tm, EDGELLM_TYPE_F32, 3, toks, N, base1);
        CHECK(memcmp(got, base1, nl * sizeof *got) == 0);
        // Scale 0 adds exact zeros; detach removes the adapter: the base logits, bit for bit.
        CHECK_STATUS(edgellm_model_attach_adapter(tm.m, ad, 0.0f), EDGELLM_STATUS_OK, NULL);
        eval_all(&tm, EDGELLM_TYPE_F32, 2, toks, N, base1);
        CHECK(memcmp(base0, base1, nl * sizeof *base0) == 0);
        CHECK_STATUS(edgellm_model_detach_adapter(tm.m), EDGELLM_STATUS_OK, NULL);
        eval_all(&tm, EDGELLM_TYPE_F32, 2, toks, N, base1);
        CHECK(memcmp(base0, base1, nl * sizeof *base0) == 0);
        edgellm_adapter_free(ad);
        for (int i = 0; i < np; i++) tp_free(&ps[i]);
        tm_free(&tm);
    }
    free(ref);
    free(got);
    free(base0);
    free(base1);
}

// Shapes, pairs, values and states an adapter must refuse, each with its status and detail;
// a refused attach leaves the attached adapter in place; a stale session cache is refused.
static void test_lora_errors(void) {
    const edgellm_config cfg = small_config();
    tmodel tm, other;
    tm_build(&tm, &cfg, EDGELLM_TYPE_F32, 0, 1, 700);  // tied: no output tensor
    tm_build(&other, &cfg, EDGELLM_TYPE_F32, 0, 0, 701);
    g_rng = 702;
    tpair q, q2;
    tp_make(&q, &tm.lay[0][EDGELLM_TENSOR_ATTN_Q], EDGELLM_TENSOR_ATTN_Q, 0, 4, EDGELLM_TYPE_F32);
    tp_make(&q2, &tm.lay[0][EDGELLM_TENSOR_ATTN_Q], EDGELLM_TENSOR_ATTN_Q, 0, 6, EDGELLM_TYPE_F32);
    const int64_t dim = cfg.dim, qd = (int64_t)cfg.n_heads * cfg.head_dim;
    edgellm_adapter *a = NULL;
    CHECK_STATUS(edgellm_adapter_new(NULL, 1.0f, &a), EDGELLM_STATUS_ERR_INVALID_ARG, "model is NULL");
    CHECK_STATUS(edgellm_adapter_new(tm.m, NAN, &a), EDGELLM_STATUS_ERR_FORMAT, "alpha");
    CHECK_STATUS(edgellm_adapter_new(tm.m, -1.0f, &a), EDGELLM_STATUS_ERR_FORMAT, "alpha");
    CHECK_STATUS(edgellm_adapter_new(tm.m, 8.0f, &a), EDGELLM_STATUS_OK, NULL);
    const int32_t A = EDGELLM_LORA_A, B = EDGELLM_LORA_B, F32 = EDGELLM_TYPE_F32;
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_ATTN_Q, 0, 2, F32, q.ad, dim, 4, q.an),
                 EDGELLM_STATUS_ERR_INVALID_ARG, "part");
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_TOKEN_EMBD, -1, A, F32, q.ad, dim, 4, q.an),
                 EDGELLM_STATUS_ERR_UNSUPPORTED, "token_embd");
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_ATTN_NORM, 0, A, F32, q.ad, dim, 4, q.an),
                 EDGELLM_STATUS_ERR_INVALID_ARG, "projection");
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_OUTPUT, -1, A, F32, q.ad, dim, 4, q.an),
                 EDGELLM_STATUS_ERR_FORMAT, "tied");
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_ATTN_Q, 2, A, F32, q.ad, dim, 4, q.an),
                 EDGELLM_STATUS_ERR_FORMAT, "layer 2");
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_ATTN_Q, 0, A, F32, q.ad, dim + 1, 4, q.an),
                 EDGELLM_STATUS_ERR_FORMAT, "does not fit");
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_ATTN_Q, 0, B, F32, q.bd, 4, qd + 32, q.bn),
                 EDGELLM_STATUS_ERR_FORMAT, "does not fit");
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_ATTN_Q, 0, A, F32, q.ad, dim, 0, 0),
                 EDGELLM_STATUS_ERR_FORMAT, "rank 0");
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_ATTN_Q, 0, A, F32, q.ad, dim, 4, q.an - 4),
                 EDGELLM_STATUS_ERR_FORMAT, "bytes");
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_ATTN_Q, 0, A, 3, q.ad, dim, 4, q.an),
                 EDGELLM_STATUS_ERR_UNSUPPORTED, "type 3");
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_ATTN_Q, 0, A, F32, NULL, dim, 4, q.an),
                 EDGELLM_STATUS_ERR_INVALID_ARG, "NULL");
    // Non-finite values: refused with the element's place, and the slot stays empty.
    ((float *)q.ad)[5] = INFINITY;
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_ATTN_Q, 0, A, F32, q.ad, dim, 4, q.an),
                 EDGELLM_STATUS_ERR_FORMAT, "element 5");
    ((float *)q.ad)[5] = 0.25f;
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_ATTN_Q, 0, A, F32, q.ad, dim, 4, q.an),
                 EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_ATTN_Q, 0, A, F32, q.ad, dim, 4, q.an),
                 EDGELLM_STATUS_ERR_FORMAT, "twice");
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_ATTN_Q, 0, B, F32, q2.bd, 6, qd, q2.bn),
                 EDGELLM_STATUS_ERR_FORMAT, "rank 6 differs");
    // A lone half fails finalize; attach needs a finalized adapter.
    CHECK_STATUS(edgellm_model_attach_adapter(tm.m, a, 1.0f), EDGELLM_STATUS_ERR_STATE, "finalized");
    CHECK_STATUS(edgellm_adapter_finalize(a), EDGELLM_STATUS_ERR_FORMAT, "lora_a but no lora_b");
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_ATTN_Q, 0, B, F32, q.bd, 4, qd, q.bn),
                 EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_adapter_finalize(a), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_adapter_set_tensor(a, EDGELLM_TENSOR_ATTN_K, 0, A, F32, q.ad, dim, 4, q.an),
                 EDGELLM_STATUS_ERR_STATE, "frozen");
    edgellm_adapter *empty = NULL;
    CHECK_STATUS(edgellm_adapter_new(tm.m, 0.0f, &empty), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_adapter_finalize(empty), EDGELLM_STATUS_ERR_FORMAT, "no tensors");
    CHECK_STATUS(edgellm_model_attach_adapter(other.m, a, 1.0f), EDGELLM_STATUS_ERR_INVALID_ARG,
                 "another model");
    CHECK_STATUS(edgellm_model_attach_adapter(tm.m, a, INFINITY), EDGELLM_STATUS_ERR_INVALID_ARG, "scale");

    // A session's cache filled before an attach is refused until truncated to 0.
    enum { N = 9 };
    int32_t toks[N];
    make_tokens(toks, N, cfg.vocab_size, 30);
    float *l0 = malloc((size_t)cfg.vocab_size * sizeof *l0), *l1 = malloc((size_t)cfg.vocab_size * sizeof *l1);
    edgellm_session *s = NULL;
    CHECK_STATUS(edgellm_session_new(tm.m, 32, EDGELLM_TYPE_F32, 2, &s), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_session_eval(s, toks, N, EDGELLM_LOGITS_LAST, l0), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_model_attach_adapter(tm.m, a, 1.0f), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_session_eval(s, toks, 1, EDGELLM_LOGITS_LAST, l1), EDGELLM_STATUS_ERR_STATE,
                 "truncate");
    CHECK(edgellm_session_pos(s) == N);
    CHECK_STATUS(edgellm_session_truncate(s, 0), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_session_eval(s, toks, N, EDGELLM_LOGITS_LAST, l1), EDGELLM_STATUS_OK, NULL);
    CHECK(memcmp(l0, l1, (size_t)cfg.vocab_size * sizeof *l0) != 0);
    // Freeing an attached adapter detaches it: the model runs the base again (after a truncate).
    edgellm_adapter_free(a);
    CHECK_STATUS(edgellm_session_truncate(s, 0), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_session_eval(s, toks, N, EDGELLM_LOGITS_LAST, l1), EDGELLM_STATUS_OK, NULL);
    CHECK(memcmp(l0, l1, (size_t)cfg.vocab_size * sizeof *l0) == 0);
    CHECK_STATUS(edgellm_model_detach_adapter(tm.m), EDGELLM_STATUS_OK, NULL);  // none: a no-op
    edgellm_session_free(s);
    // A model freed first: freeing its (attached) adapter afterwards touches nothing freed.
    edgellm_adapter *late = NULL;
    CHECK_STATUS(edgellm_adapter_new(other.m, 1.0f, &late), EDGELLM_STATUS_OK, NULL);
    g_rng = 703;
    tpair o;
    tp_make(&o, &other.lay[1][EDGELLM_TENSOR_FFN_DOWN], EDGELLM_TENSOR_FFN_DOWN, 1, 2, EDGELLM_TYPE_F16);
    CHECK_STATUS(tp_register(late, &o), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_adapter_finalize(late), EDGELLM_STATUS_OK, NULL);
    CHECK_STATUS(edgellm_model_attach_adapter(other.m, late, 1.0f), EDGELLM_STATUS_OK, NULL);
    tm_free(&other);
    edgellm_adapter_free(late);
    edgellm_adapter_free(empty);
    tp_free(&o);
    tp_free(&q);
    tp_free(&q2);
    free(l0);
    free(l1);
    tm_free(&tm);
}

static void run(const char *name, void (*fn)(void)) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    fn();
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-6;
    printf("%-26s %8.1f ms\n", name, ms);
}

int main(void) {
    run("test_expf", test_expf);
    run("test_flush_denormals", test_flush_denormals);
    run("test_threadpool", test_threadpool);
    run("test_bad_config", test_bad_config);
    run("test_bad_tensors", test_bad_tensors);
    run("test_bad_session", test_bad_session);
    run("test_kv_cache_bytes", test_kv_cache_bytes);
    run("test_reference", test_reference);
    run("test_batched_vs_single", test_batched_vs_single);
    run("test_kv_f16", test_kv_f16);
    run("test_threads", test_threads);
    run("test_truncate", test_truncate);
    run("test_overflow_isolated", test_overflow_isolated);
    run("test_context_full", test_context_full);
    run("test_lora_reference", test_lora_reference);
    run("test_lora_errors", test_lora_errors);
    printf("test_core: %d checks, %d failures\n", g_checks, g_failures);
    return g_failures != 0;
}
