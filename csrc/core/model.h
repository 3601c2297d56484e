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

struct edgellm_model {
    edgellm_config cfg;
    int64_t q_dim;           // n_heads * head_dim
    int64_t kv_dim;          // n_kv_heads * head_dim
    el_tensor token_embd;    // (vocab_size, dim)
    el_tensor output_norm;   // (dim) f32
    el_tensor output;        // (vocab_size, dim); data NULL = tied to token_embd
    el_layer *layers;        // (n_layers)
    int finalized;           // set by edgellm_model_finalize; tensors are frozen after it
};

// The tensor the logits come from: output, or token_embd when tied.
static inline const el_tensor *el_model_output(const edgellm_model *m) {
    return m->output.data != NULL ? &m->output : &m->token_embd;
}

#endif  // EL_MODEL_H
