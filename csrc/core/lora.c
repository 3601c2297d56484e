// SPDX-License-Identifier: MIT
// The LoRA adapter object: low-rank pairs registered one by one, checked, then attached to a model.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "edgellm.h"
#include "kernels.h"
#include "model.h"

// Ranks above this are refused. Real adapters use 4..256; a rank above min(n_in, n_out) is
// redundant but valid (llama.cpp loads it), so the bound is fixed, not from the shapes. It
// keeps the session's LoRA scratch (chunk x 3 ranks floats) at a few MB.
#define EL_MAX_LORA_RANK 4096

// --------------------------------------------------------------------------
// Lifecycle

int32_t edgellm_adapter_new(const edgellm_model *m, float alpha, edgellm_adapter **out) {
    if (out == NULL) return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "adapter_new: out is NULL");
    *out = NULL;
    if (m == NULL) return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "adapter_new: model is NULL");
    if (!m->finalized)
        return el_set_error(EDGELLM_STATUS_ERR_STATE,
                            "adapter_new: the model is not finalized (call edgellm_model_finalize)");
    // Written as !(alpha >= 0) so NaN fails too.
    if (!(alpha >= 0.0f) || !isfinite(alpha))
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT,
                            "adapter_new: alpha = %g must be finite and >= 0", (double)alpha);
    edgellm_adapter *a = calloc(1, sizeof *a);
    if (a == NULL) return el_set_error(EDGELLM_STATUS_ERR_NOMEM, "adapter_new: %zu bytes", sizeof *a);
    a->layers = calloc((size_t)m->cfg.n_layers * EDGELLM_TENSOR_ROLE_COUNT, sizeof *a->layers);
    if (a->layers == NULL) {
        free(a);
        return el_set_error(EDGELLM_STATUS_ERR_NOMEM, "adapter_new: %d layers", m->cfg.n_layers);
    }
    a->m = m;
    a->alpha = alpha;
    *out = a;
    return EDGELLM_STATUS_OK;
}

void edgellm_adapter_free(edgellm_adapter *a) {
    if (a == NULL) return;
    if (a->attached != NULL) {
        // Freed while attached: the model runs without it from its next eval.
        a->attached->adapter = NULL;
        a->attached->adapter_epoch++;
    }
    for (int32_t i = 0; i < a->n_owned; i++) free(a->owned[i]);
    free(a->owned);
    free(a->layers);
    free(a);
}

int32_t edgellm_adapter_n_pairs(const edgellm_adapter *a) { return a == NULL ? 0 : a->n_pairs; }

// --------------------------------------------------------------------------
// Tensors

static int el_role_is_projection(int32_t role) {
    switch (role) {
        case EDGELLM_TENSOR_OUTPUT:
        case EDGELLM_TENSOR_ATTN_Q:
        case EDGELLM_TENSOR_ATTN_K:
        case EDGELLM_TENSOR_ATTN_V:
        case EDGELLM_TENSOR_ATTN_OUT:
        case EDGELLM_TENSOR_FFN_GATE:
        case EDGELLM_TENSOR_FFN_UP:
        case EDGELLM_TENSOR_FFN_DOWN: return 1;
        default: return 0;
    }
}

// Index of the first non-finite value of an F32/F16 tensor of n elements, or -1.
static int64_t el_first_non_finite(int32_t type, const void *data, int64_t n) {
    if (type == EDGELLM_TYPE_F32) {
        const float *f = data;
        for (int64_t i = 0; i < n; i++)
            if (!isfinite(f[i])) return i;
    } else {
        const uint16_t *h = data;  // f16: exponent bits all ones = Inf or NaN
        for (int64_t i = 0; i < n; i++)
            if ((h[i] & 0x7C00u) == 0x7C00u) return i;
    }
    return -1;
}

// Remembers an allocation the adapter frees.
static int32_t el_adapter_own(edgellm_adapter *a, void *p) {
    void **grown = realloc(a->owned, (size_t)(a->n_owned + 1) * sizeof *grown);
    if (grown == NULL) return el_set_error(EDGELLM_STATUS_ERR_NOMEM, "adapter: owned list");
    a->owned = grown;
    a->owned[a->n_owned++] = p;
    return EDGELLM_STATUS_OK;
}

int32_t edgellm_adapter_set_tensor(edgellm_adapter *a, int32_t role, int32_t layer, int32_t part,
                                   int32_t type, const void *data, int64_t ne0, int64_t ne1,
                                   size_t nbytes) {
    if (a == NULL) return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "adapter_set_tensor: adapter is NULL");
    if (a->finalized)
        return el_set_error(EDGELLM_STATUS_ERR_STATE,
                            "adapter_set_tensor: the adapter is finalized; its tensors are frozen");
    if (part != EDGELLM_LORA_A && part != EDGELLM_LORA_B)
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                            "adapter_set_tensor: part %d is not LORA_A (0) or LORA_B (1)", part);
    if (role == EDGELLM_TENSOR_TOKEN_EMBD)
        return el_set_error(EDGELLM_STATUS_ERR_UNSUPPORTED,
                            "adapter_set_tensor: token_embd.weight adapters are not supported");
    if (!el_role_is_projection(role))
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                            "adapter_set_tensor: role %d is not a projection (attn_q/k/v/output, "
                            "ffn_gate/up/down, output)", role);
    const edgellm_model *m = a->m;
    if (role != EDGELLM_TENSOR_OUTPUT && (layer < 0 || layer >= m->cfg.n_layers))
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT,
                            "adapter_set_tensor: layer %d is outside the model's [0, %d)", layer,
                            m->cfg.n_layers);
    if (role == EDGELLM_TENSOR_OUTPUT) layer = -1;
    char name[80];
    el_tensor_name(name, sizeof name - 8, role, layer);
    strcat(name, part == EDGELLM_LORA_A ? ".lora_a" : ".lora_b");
    const el_tensor *base = el_model_tensor(m, role, layer);
    if (base == NULL || base->data == NULL)
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT,
                            "adapter_set_tensor: %s: the base model has no such tensor%s", name,
                            role == EDGELLM_TENSOR_OUTPUT ? " (its output is tied to token_embd)" : "");
    if (data == NULL)
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "adapter_set_tensor: %s: data is NULL", name);
    const int64_t bs = edgellm_type_block_size(type);
    const size_t bb = edgellm_type_block_bytes(type);
    if (el_weight_kind(type) < 0 || bs <= 0 || bb == 0)
        return el_set_error(EDGELLM_STATUS_ERR_UNSUPPORTED,
                            "adapter_set_tensor: %s: tensor type %d is not supported (F32, F16, Q8_0, "
                            "Q4_0)", name, type);
    // Shapes against the base: A is [n_in, rank], B is [rank, n_out] (ne0 first).
    const int64_t n_in = base->ne0, n_out = base->ne1;
    const int64_t rank = part == EDGELLM_LORA_A ? ne1 : ne0;
    const int64_t want0 = part == EDGELLM_LORA_A ? n_in : rank;
    const int64_t want1 = part == EDGELLM_LORA_A ? rank : n_out;
    if (ne0 != want0 || ne1 != want1)
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT,
                            "adapter_set_tensor: %s: shape [ne0=%lld, ne1=%lld] does not fit the base "
                            "tensor [ne0=%lld, ne1=%lld] (want [%s])",
                            name, (long long)ne0, (long long)ne1, (long long)n_in, (long long)n_out,
                            part == EDGELLM_LORA_A ? "n_in, rank" : "rank, n_out");
    if (rank < 1 || rank > EL_MAX_LORA_RANK)
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT,
                            "adapter_set_tensor: %s: rank %lld is outside [1, %d]", name,
                            (long long)rank, EL_MAX_LORA_RANK);
    el_lora *lo = (el_lora *)el_adapter_lora(a, role, layer);
    if (lo == NULL)  // not adapted yet: the slot itself
        lo = role == EDGELLM_TENSOR_OUTPUT
                 ? &a->output
                 : &a->layers[(size_t)layer * EDGELLM_TENSOR_ROLE_COUNT + (size_t)role];
    el_tensor *slot = part == EDGELLM_LORA_A ? &lo->a : &lo->b;
    const el_tensor *other = part == EDGELLM_LORA_A ? &lo->b : &lo->a;
    if (slot->data != NULL)
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT, "adapter_set_tensor: %s is given twice", name);
    const int64_t other_rank = part == EDGELLM_LORA_A ? other->ne0 : other->ne1;
    if (other->data != NULL && other_rank != rank)
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT,
                            "adapter_set_tensor: %s: rank %lld differs from its pair's rank %lld",
                            name, (long long)rank, (long long)other_rank);
    if (ne0 % bs != 0)
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT,
                            "adapter_set_tensor: %s: row length ne0=%lld is not a multiple of %s's "
                            "block size %lld", name, (long long)ne0, el_type_name(type), (long long)bs);
    // rank <= n_in, n_out keeps this far below 2^63 (the config bounds them).
    const size_t row_bytes = (size_t)(ne0 / bs) * bb;
    const uint64_t want_bytes = (uint64_t)row_bytes * (uint64_t)ne1;
    if ((uint64_t)nbytes != want_bytes)
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT,
                            "adapter_set_tensor: %s: expected %llu bytes for [%lld, %lld] %s, found %zu",
                            name, (unsigned long long)want_bytes, (long long)ne0, (long long)ne1,
                            el_type_name(type), nbytes);
    const uintptr_t align = type == EDGELLM_TYPE_F32 ? 4 : 2;
    if ((uintptr_t)data % align != 0)
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT,
                            "adapter_set_tensor: %s: data at %p is not %u-byte aligned", name, data,
                            (unsigned)align);
    const int64_t n = ne0 * ne1;
    const void *use = data;
    int32_t use_type = type;
    float *copy = NULL;
    if (type == EDGELLM_TYPE_Q8_0 || type == EDGELLM_TYPE_Q4_0 || part == EDGELLM_LORA_B) {
        // A runs on the f32/f16 matmul kernels (quantised A becomes f32 once, here). B's rows
        // are only rank long, too short for the kernels' vectors: it is kept transposed in f32.
        copy = malloc((size_t)n * sizeof(float));
        if (copy == NULL)
            return el_set_error(EDGELLM_STATUS_ERR_NOMEM, "adapter_set_tensor: %s: %lld floats", name,
                                (long long)n);
        edgellm_dequantize(type, data, copy, n);
        use = copy;
        use_type = EDGELLM_TYPE_F32;
    }
    const int64_t bad = el_first_non_finite(use_type, use, n);
    if (bad >= 0) {
        free(copy);
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT,
                            "adapter_set_tensor: %s: element %lld (row %lld, column %lld) is not finite",
                            name, (long long)bad, (long long)(bad / ne0), (long long)(bad % ne0));
    }
    if (part == EDGELLM_LORA_B) {
        // (n_out, rank) -> (rank, n_out), in place through a second buffer.
        float *bt = malloc((size_t)n * sizeof(float));
        if (bt == NULL) {
            free(copy);
            return el_set_error(EDGELLM_STATUS_ERR_NOMEM, "adapter_set_tensor: %s: %lld floats",
                                name, (long long)n);
        }
        for (int64_t r = 0; r < ne1; r++)
            for (int64_t j = 0; j < ne0; j++) bt[j * ne1 + r] = copy[r * ne0 + j];
        free(copy);
        copy = bt;
        lo->bt = bt;
        use = data;  // b keeps the caller's pointer: only its shape and presence are read
        use_type = type;
    }
    if (copy != NULL) {
        const int32_t st = el_adapter_own(a, copy);
        if (st != EDGELLM_STATUS_OK) {
            free(copy);
            if (part == EDGELLM_LORA_B) lo->bt = NULL;
            return st;
        }
    }
    slot->data = use;
    slot->type = use_type;
    slot->kind = el_weight_kind(use_type);
    slot->ne0 = ne0;
    slot->ne1 = ne1;
    slot->row_bytes = use_type == EDGELLM_TYPE_F32 || use_type == EDGELLM_TYPE_F16
                          ? (size_t)ne0 * (use_type == EDGELLM_TYPE_F32 ? sizeof(float) : sizeof(uint16_t))
                          : row_bytes;
    return EDGELLM_STATUS_OK;
}

// --------------------------------------------------------------------------
// Finalize

// Checks one slot's pair; adds its rank to *stage and counts it. Returns a status.
static int32_t el_check_pair(edgellm_adapter *a, el_lora *lo, int32_t role, int32_t layer,
                             int64_t *stage) {
    if (lo->a.data == NULL && lo->b.data == NULL) return EDGELLM_STATUS_OK;
    char name[64];
    el_tensor_name(name, sizeof name, role, layer);
    if (lo->a.data == NULL || lo->b.data == NULL)
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT, "adapter_finalize: %s has %s but no %s", name,
                            lo->a.data != NULL ? "lora_a" : "lora_b",
                            lo->a.data != NULL ? "lora_b" : "lora_a");
    const int64_t rank = lo->a.ne1;
    lo->alpha_r = a->alpha != 0.0f ? a->alpha / (float)rank : 1.0f;
    a->n_pairs++;
    *stage += rank;
    return EDGELLM_STATUS_OK;
}

int32_t edgellm_adapter_finalize(edgellm_adapter *a) {
    if (a == NULL) return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "adapter_finalize: adapter is NULL");
    if (a->finalized) return EDGELLM_STATUS_OK;
    // Projections sharing one forward stage (their A products run in one region).
    static const int32_t stages[4][3] = {
        {EDGELLM_TENSOR_ATTN_Q, EDGELLM_TENSOR_ATTN_K, EDGELLM_TENSOR_ATTN_V},
        {EDGELLM_TENSOR_ATTN_OUT, -1, -1},
        {EDGELLM_TENSOR_FFN_GATE, EDGELLM_TENSOR_FFN_UP, -1},
        {EDGELLM_TENSOR_FFN_DOWN, -1, -1},
    };
    int32_t st;
    int64_t max_stage = 0;
    a->n_pairs = 0;
    for (int32_t l = 0; l < a->m->cfg.n_layers; l++)
        for (int si = 0; si < 4; si++) {
            int64_t stage = 0;
            for (int k = 0; k < 3 && stages[si][k] >= 0; k++) {
                const int32_t role = stages[si][k];
                el_lora *lo = &a->layers[(size_t)l * EDGELLM_TENSOR_ROLE_COUNT + (size_t)role];
                if ((st = el_check_pair(a, lo, role, l, &stage)) != EDGELLM_STATUS_OK) return st;
            }
            max_stage = stage > max_stage ? stage : max_stage;
        }
    int64_t stage = 0;
    if ((st = el_check_pair(a, &a->output, EDGELLM_TENSOR_OUTPUT, -1, &stage)) != EDGELLM_STATUS_OK)
        return st;
    max_stage = stage > max_stage ? stage : max_stage;
    if (a->n_pairs == 0)
        return el_set_error(EDGELLM_STATUS_ERR_FORMAT, "adapter_finalize: the adapter has no tensors");
    a->stage_rank = (int32_t)max_stage;  // <= 3 * dim
    a->finalized = 1;
    return EDGELLM_STATUS_OK;
}

// --------------------------------------------------------------------------
// Attach and detach

int32_t edgellm_model_attach_adapter(edgellm_model *m, edgellm_adapter *a, float scale) {
    if (m == NULL || a == NULL)
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "attach_adapter: model or adapter is NULL");
    if (!a->finalized)
        return el_set_error(EDGELLM_STATUS_ERR_STATE,
                            "attach_adapter: the adapter is not finalized (call edgellm_adapter_finalize)");
    if (a->m != m)
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG,
                            "attach_adapter: the adapter was built for another model");
    if (!isfinite(scale))
        return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "attach_adapter: scale = %g is not finite",
                            (double)scale);
    if (m->adapter != NULL && m->adapter != a) m->adapter->attached = NULL;
    m->adapter = a;
    m->adapter_scale = scale;
    m->adapter_epoch++;
    a->attached = m;
    return EDGELLM_STATUS_OK;
}

int32_t edgellm_model_detach_adapter(edgellm_model *m) {
    if (m == NULL) return el_set_error(EDGELLM_STATUS_ERR_INVALID_ARG, "detach_adapter: model is NULL");
    if (m->adapter == NULL) return EDGELLM_STATUS_OK;
    m->adapter->attached = NULL;
    m->adapter = NULL;
    m->adapter_epoch++;
    return EDGELLM_STATUS_OK;
}
