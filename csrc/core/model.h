// SPDX-License-Identifier: MIT
// The model object shared by model.c (config, tensor registry) and session.c (the forward).
#ifndef EL_MODEL_H
#define EL_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "edgellm.h"

// One registered tensor: a view into caller memory, never copied.
typedef struct {
    const void *data;  // (ne1, ne0) rows of `type`; NULL when not registered
    int32_t type;      // edgellm_type
    int32_t kind;      // EL_WK_* of type (indexes the kernel table)
    int64_t ne0;       // columns (innermost)
    int64_t ne1;       // rows (1 for vectors)
    size_t row_bytes;  // bytes of one row
} el_tensor;

// One transformer block's tensors.
typedef struct {
    el_tensor attn_norm;  // (dim) f32
    el_tensor wq;         // (q_dim, dim)
    el_tensor wk;         // (kv_dim, dim)
    el_tensor wv;         // (kv_dim, dim)
    el_tensor wo;         // (dim, q_dim)
    el_tensor bq;         // (q_dim) f32, optional
    el_tensor bk;         // (kv_dim) f32, optional
    el_tensor bv;         // (kv_dim) f32, optional
    el_tensor ffn_norm;   // (dim) f32
    el_tensor w_gate;     // (hidden_dim, dim)
    el_tensor w_up;       // (hidden_dim, dim)
    el_tensor w_down;     // (dim, hidden_dim)
} el_layer;

// One adapted projection of a LoRA adapter: y += scale * B (A x).
typedef struct {
    el_tensor a;       // (rank, n_in) F32 or F16: the down projection; data NULL = not adapted
    el_tensor b;       // (n_out, rank) as registered (shape and "is set" only)
    const float *bt;   // (rank, n_out) B transposed in f32, owned: the forward adds
                       // sum_j t_j * bt row j, vector-wide over output rows for any rank
    float alpha_r;     // alpha / rank, or 1 when the adapter's alpha is 0 (llama.cpp's rule)
} el_lora;

struct edgellm_adapter {
    const edgellm_model *m;   // the model it was built for (must outlive the adapter)
    float alpha;              // adapter.lora.alpha (0: no alpha/rank scaling)
    el_lora output;           // the output projection (untied models only)
    el_lora *layers;          // (n_layers, EDGELLM_TENSOR_ROLE_COUNT) indexed by role
    void **owned;             // (n_owned) f32 copies of dequantised Q8_0/Q4_0 tensors
    int32_t n_owned;
    int32_t n_pairs;          // adapted projections (set by finalize)
    int32_t stage_rank;       // most ranks summed over one forward stage (q+k+v, gate+up, ...)
    int finalized;
    edgellm_model *attached;  // the model it is attached to, NULL when detached
};

struct edgellm_model {
    edgellm_config cfg;
    int64_t q_dim;           // n_heads * head_dim
    int64_t kv_dim;          // n_kv_heads * head_dim
    el_tensor token_embd;    // (vocab_size, dim)
    el_tensor output_norm;   // (dim) f32
    el_tensor output;        // (vocab_size, dim); data NULL = tied to token_embd
    el_layer *layers;        // (n_layers)
    int finalized;           // set by edgellm_model_finalize; tensors are frozen after it
    // The attached LoRA adapter (NULL: none); changed only between evals (edgellm.h says so).
    edgellm_adapter *adapter;
    float adapter_scale;     // the user's scale given to attach
    uint32_t adapter_epoch;  // bumped by every attach and detach; sessions compare it
};

// The tensor the logits come from: output, or token_embd when tied.
static inline const el_tensor *el_model_output(const edgellm_model *m) {
    return m->output.data != NULL ? &m->output : &m->token_embd;
}

// The LoRA pair of (role, layer) in an adapter, or NULL when that projection is not adapted.
static inline const el_lora *el_adapter_lora(const edgellm_adapter *a, int32_t role, int32_t layer) {
    const el_lora *lo = role == EDGELLM_TENSOR_OUTPUT
                            ? &a->output
                            : &a->layers[(size_t)layer * EDGELLM_TENSOR_ROLE_COUNT + (size_t)role];
    return lo->a.data != NULL ? lo : NULL;
}

// Internal helpers of model.c shared with lora.c.
// "blk.3.attn_q.weight" or "output.weight" into buf.
const char *el_tensor_name(char *buf, size_t n, int32_t role, int32_t layer);
const char *el_type_name(int32_t type);
// The registered base tensor of (role, layer); NULL for an unknown role or layer.
const el_tensor *el_model_tensor(const edgellm_model *m, int32_t role, int32_t layer);

#endif  // EL_MODEL_H
