// SPDX-License-Identifier: MIT
// The model object: a validated config plus tensor views registered one by one, then frozen.
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

// Upper bounds on the config. They sit well above every released llama-family model
// (405B: dim 16384, hidden 53248, 126 layers; vocabularies up to 256k) and keep every size
// derived from them (tensor bytes, KV cache bytes, scratch) far below 2^63.
#define EL_MAX_DIM (1 << 16)
#define EL_MAX_HIDDEN (1 << 18)
#define EL_MAX_LAYERS 1024
#define EL_MAX_HEADS 1024
#define EL_MAX_HEAD_DIM 1024
#define EL_MAX_VOCAB (1 << 22)
#define EL_MAX_SEQ (1 << 22)

// --------------------------------------------------------------------------
// Names (GGUF's, so a detail message points at the file's tensor)

static const char *const el_role_names[EDGELLM_TENSOR_ROLE_COUNT] = {
    "token_embd.weight",  "output_norm.weight", "output.weight",     "attn_norm.weight",
    "attn_q.weight",      "attn_k.weight",      "attn_v.weight",     "attn_output.weight",
    "attn_q.bias",        "attn_k.bias",        "attn_v.bias",       "ffn_norm.weight",
    "ffn_gate.weight",    "ffn_up.weight",      "ffn_down.weight",
};

static int el_role_is_layer(int32_t role) {
    return role >= EDGELLM_TENSOR_ATTN_NORM && role < EDGELLM_TENSOR_ROLE_COUNT;
}

// Norms and biases are added or multiplied element-wise in f32; llama.cpp keeps them f32 too.
static int el_role_is_vector(int32_t role) {
    switch (role) {
        case EDGELLM_TENSOR_OUTPUT_NORM:
        case EDGELLM_TENSOR_ATTN_NORM:
        case EDGELLM_TENSOR_ATTN_Q_BIAS:
        case EDGELLM_TENSOR_ATTN_K_BIAS:
        case EDGELLM_TENSOR_ATTN_V_BIAS:
        case EDGELLM_TENSOR_FFN_NORM: return 1;
        default: return 0;
    }
}

// "blk.3.attn_q.weight" or "token_embd.weight" into buf.
const char *el_tensor_name(char *buf, size_t n, int32_t role, int32_t layer) {
    if (el_role_is_layer(role)) snprintf(buf, n, "blk.%d.%s", layer, el_role_names[role]);
    else snprintf(buf, n, "%s", el_role_names[role]);
    return buf;
}

const char *el_type_name(int32_t type) {
    switch (type) {
        case EDGELLM_TYPE_F32: return "F32";
        case EDGELLM_TYPE_F16: return "F16";
        case EDGELLM_TYPE_Q4_0: return "Q4_0";
        case EDGELLM_TYPE_Q8_0: return "Q8_0";
        default: return "unknown";
    }
}

// --------------------------------------------------------------------------
// Config

static int32_t el_check_range(const char *name, int64_t v, int64_t hi) {
    if (v < 1 || v > hi)
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "config: %s = %lld is outside [1, %lld]",
                            name, (long long)v, (long long)hi);
    return EDGELLM_STATUS_OK;
}

static int32_t el_check_config(const edgellm_config *c) {
    int32_t st;
    if (c->arch != EDGELLM_ARCH_LLAMA && c->arch != EDGELLM_ARCH_QWEN2)
        return el_set_error(EDGELLM_STATUS_ERR_UNSUPPORTED,
                            "config: arch %d is not supported (llama=%d, qwen2=%d)", c->arch,
                            EDGELLM_ARCH_LLAMA, EDGELLM_ARCH_QWEN2);
    if ((st = el_check_range("dim", c->dim, EL_MAX_DIM)) ||
        (st = el_check_range("hidden_dim", c->hidden_dim, EL_MAX_HIDDEN)) ||
        (st = el_check_range("n_layers", c->n_layers, EL_MAX_LAYERS)) ||
        (st = el_check_range("n_heads", c->n_heads, EL_MAX_HEADS)) ||
        (st = el_check_range("n_kv_heads", c->n_kv_heads, EL_MAX_HEADS)) ||
        (st = el_check_range("head_dim", c->head_dim, EL_MAX_HEAD_DIM)) ||
        (st = el_check_range("vocab_size", c->vocab_size, EL_MAX_VOCAB)) ||
        (st = el_check_range("seq_len", c->seq_len, EL_MAX_SEQ)) ||
        (st = el_check_range("n_heads * head_dim", (int64_t)c->n_heads * c->head_dim, EL_MAX_DIM)))
        return st;
    if (c->n_heads % c->n_kv_heads != 0)
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                            "config: n_heads (%d) is not a multiple of n_kv_heads (%d)",
                            c->n_heads, c->n_kv_heads);
    if (c->rope_mode != EDGELLM_ROPE_NORM && c->rope_mode != EDGELLM_ROPE_NEOX)
        return el_set_error(EDGELLM_STATUS_ERR_UNSUPPORTED,
                            "config: rope_mode %d is not supported (norm=%d, neox=%d)",
                            c->rope_mode, EDGELLM_ROPE_NORM, EDGELLM_ROPE_NEOX);
    if (c->rope_dim < 2 || c->rope_dim > c->head_dim || c->rope_dim % 2 != 0)
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                            "config: rope_dim = %d must be even and in [2, head_dim = %d]",
                            c->rope_dim, c->head_dim);
    // Written as !(v > 0) so NaN fails too.
    if (!(c->rope_base > 0.0f) || !isfinite(c->rope_base))
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                            "config: rope_base = %g must be finite and > 0", (double)c->rope_base);
    if (!(c->rope_scale > 0.0f) || !isfinite(c->rope_scale))
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                            "config: rope_scale = %g must be finite and > 0", (double)c->rope_scale);
    if (!(c->norm_eps > 0.0f) || !(c->norm_eps < 1.0f))
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "config: norm_eps = %g must be in (0, 1)",
                            (double)c->norm_eps);
    return EDGELLM_STATUS_OK;
}

int32_t edgellm_model_new(const edgellm_config *cfg, edgellm_model **out) {
    if (out == NULL) return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "model_new: out is NULL");
    *out = NULL;
    if (cfg == NULL) return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "model_new: cfg is NULL");
    const int32_t st = el_check_config(cfg);
    if (st != EDGELLM_STATUS_OK) return st;
    edgellm_model *m = calloc(1, sizeof *m);
    if (m == NULL) return el_set_error(EDGELLM_STATUS_ERR_NOMEM, "model_new: %zu bytes", sizeof *m);
    m->layers = calloc((size_t)cfg->n_layers, sizeof *m->layers);
    if (m->layers == NULL) {
        free(m);
        return el_set_error(EDGELLM_STATUS_ERR_NOMEM, "model_new: %d layers", cfg->n_layers);
    }
    m->cfg = *cfg;
    m->q_dim = (int64_t)cfg->n_heads * cfg->head_dim;
    m->kv_dim = (int64_t)cfg->n_kv_heads * cfg->head_dim;
    *out = m;
    return EDGELLM_STATUS_OK;
}

void edgellm_model_free(edgellm_model *m) {
    if (m == NULL) return;
    if (m->adapter != NULL) m->adapter->attached = NULL;  // the adapter may be freed later
    free(m->layers);
    free(m);
}

// --------------------------------------------------------------------------
// Tensors

// The slot a role fills, and its expected shape (ne0 = columns, ne1 = rows).
static el_tensor *el_slot(edgellm_model *m, int32_t role, int32_t layer, int64_t *ne0,
                          int64_t *ne1) {
    const edgellm_config *c = &m->cfg;
    el_layer *L = el_role_is_layer(role) ? &m->layers[layer] : NULL;
    *ne1 = 1;
    switch (role) {
        case EDGELLM_TENSOR_TOKEN_EMBD: *ne0 = c->dim; *ne1 = c->vocab_size; return &m->token_embd;
        case EDGELLM_TENSOR_OUTPUT_NORM: *ne0 = c->dim; return &m->output_norm;
        case EDGELLM_TENSOR_OUTPUT: *ne0 = c->dim; *ne1 = c->vocab_size; return &m->output;
        case EDGELLM_TENSOR_ATTN_NORM: *ne0 = c->dim; return &L->attn_norm;
        case EDGELLM_TENSOR_ATTN_Q: *ne0 = c->dim; *ne1 = m->q_dim; return &L->wq;
        case EDGELLM_TENSOR_ATTN_K: *ne0 = c->dim; *ne1 = m->kv_dim; return &L->wk;
        case EDGELLM_TENSOR_ATTN_V: *ne0 = c->dim; *ne1 = m->kv_dim; return &L->wv;
        case EDGELLM_TENSOR_ATTN_OUT: *ne0 = m->q_dim; *ne1 = c->dim; return &L->wo;
        case EDGELLM_TENSOR_ATTN_Q_BIAS: *ne0 = m->q_dim; return &L->bq;
        case EDGELLM_TENSOR_ATTN_K_BIAS: *ne0 = m->kv_dim; return &L->bk;
        case EDGELLM_TENSOR_ATTN_V_BIAS: *ne0 = m->kv_dim; return &L->bv;
        case EDGELLM_TENSOR_FFN_NORM: *ne0 = c->dim; return &L->ffn_norm;
        case EDGELLM_TENSOR_FFN_GATE: *ne0 = c->dim; *ne1 = c->hidden_dim; return &L->w_gate;
        case EDGELLM_TENSOR_FFN_UP: *ne0 = c->dim; *ne1 = c->hidden_dim; return &L->w_up;
        case EDGELLM_TENSOR_FFN_DOWN: *ne0 = c->hidden_dim; *ne1 = c->dim; return &L->w_down;
        default: return NULL;
    }
}

const el_tensor *el_model_tensor(const edgellm_model *m, int32_t role, int32_t layer) {
    if (role < 0 || role >= EDGELLM_TENSOR_ROLE_COUNT) return NULL;
    if (el_role_is_layer(role) && (layer < 0 || layer >= m->cfg.n_layers)) return NULL;
    int64_t ne0, ne1;
    return el_slot((edgellm_model *)m, role, layer, &ne0, &ne1);  // el_slot only takes the address
}

int32_t edgellm_model_set_tensor(edgellm_model *m, int32_t role, int32_t layer, int32_t type,
                                 const void *data, int64_t ne0, int64_t ne1, size_t nbytes) {
    if (m == NULL) return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "set_tensor: model is NULL");
    if (m->finalized)
        return el_set_error(EDGELLM_STATUS_ERR_STATE,
                            "set_tensor: the model is finalized; its tensors are frozen");
    if (role < 0 || role >= EDGELLM_TENSOR_ROLE_COUNT)
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                            "set_tensor: unknown tensor role %d (valid: 0..%d)", role,
                            EDGELLM_TENSOR_ROLE_COUNT - 1);
    if (el_role_is_layer(role) && (layer < 0 || layer >= m->cfg.n_layers))
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                            "set_tensor: %s: layer %d is outside [0, %d)", el_role_names[role],
                            layer, m->cfg.n_layers);
    char name[64];
    el_tensor_name(name, sizeof name, role, layer);
    if (data == NULL)
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "set_tensor: %s: data is NULL", name);
    const int kind = el_weight_kind(type);
    const int64_t bs = edgellm_type_block_size(type);
    const size_t bb = edgellm_type_block_bytes(type);
    if (kind < 0 || bs <= 0 || bb == 0)
        return el_set_error(EDGELLM_STATUS_ERR_UNSUPPORTED,
                            "set_tensor: %s: tensor type %d is not supported (F32, F16, Q4_0, Q8_0)",
                            name, type);
    if (el_role_is_vector(role) && type != EDGELLM_TYPE_F32)
        return el_set_error(EDGELLM_STATUS_ERR_UNSUPPORTED,
                            "set_tensor: %s: type %s is not supported for norms and biases (F32 only)",
                            name, el_type_name(type));
    int64_t want0, want1;
    el_tensor *slot = el_slot(m, role, layer, &want0, &want1);
    if (ne0 != want0 || ne1 != want1)
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT,
                            "set_tensor: %s: expected shape [ne0=%lld, ne1=%lld] from the config, "
                            "found [ne0=%lld, ne1=%lld]",
                            name, (long long)want0, (long long)want1, (long long)ne0, (long long)ne1);
    if (ne0 % bs != 0)
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT,
                            "set_tensor: %s: row length ne0=%lld is not a multiple of %s's block "
                            "size %lld",
                            name, (long long)ne0, el_type_name(type), (long long)bs);
    // The config bounds keep this product below 2^48.
    const size_t row_bytes = (size_t)(ne0 / bs) * bb;
    const uint64_t want_bytes = (uint64_t)row_bytes * (uint64_t)ne1;
    if ((uint64_t)nbytes != want_bytes)
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT,
                            "set_tensor: %s: expected %llu bytes for [%lld, %lld] %s, found %zu",
                            name, (unsigned long long)want_bytes, (long long)ne0, (long long)ne1,
                            el_type_name(type), nbytes);
    // f32 loads need 4-byte alignment, f16 scales 2 (GGUF aligns tensor data to 32).
    const uintptr_t align = type == EDGELLM_TYPE_F32 ? 4 : 2;
    if ((uintptr_t)data % align != 0)
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT,
                            "set_tensor: %s: data at %p is not %u-byte aligned", name, data,
                            (unsigned)align);
    slot->data = data;
    slot->type = type;
    slot->kind = kind;
    slot->ne0 = ne0;
    slot->ne1 = ne1;
    slot->row_bytes = row_bytes;
    return EDGELLM_STATUS_OK;
}

// --------------------------------------------------------------------------
// Finalize

static int el_role_required(int32_t role) {
    switch (role) {
        case EDGELLM_TENSOR_OUTPUT:  // tied to token_embd when absent
        case EDGELLM_TENSOR_ATTN_Q_BIAS:
        case EDGELLM_TENSOR_ATTN_K_BIAS:
        case EDGELLM_TENSOR_ATTN_V_BIAS: return 0;
        default: return 1;
    }
}

int32_t edgellm_model_finalize(edgellm_model *m) {
    if (m == NULL) return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "finalize: model is NULL");
    if (m->finalized) return EDGELLM_STATUS_OK;
    int64_t ne0, ne1;
    char name[64];
    for (int32_t role = 0; role < EDGELLM_TENSOR_ATTN_NORM; role++)
        if (el_role_required(role) && el_slot(m, role, -1, &ne0, &ne1)->data == NULL)
            return el_set_error(EDGELLM_STATUS_ERR_FORMAT, "finalize: missing tensor %s",
                                el_tensor_name(name, sizeof name, role, -1));
    for (int32_t l = 0; l < m->cfg.n_layers; l++)
        for (int32_t role = EDGELLM_TENSOR_ATTN_NORM; role < EDGELLM_TENSOR_ROLE_COUNT; role++)
            if (el_role_required(role) && el_slot(m, role, l, &ne0, &ne1)->data == NULL)
                return el_set_error(EDGELLM_STATUS_ERR_FORMAT, "finalize: missing tensor %s",
                                    el_tensor_name(name, sizeof name, role, l));
    m->finalized = 1;
    return EDGELLM_STATUS_OK;
}
