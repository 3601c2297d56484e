// SPDX-License-Identifier: MIT
// edgellm's public C API: opaque handles, status codes and sized integers; Python sees nothing else.
#ifndef EDGELLM_H
#define EDGELLM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Symbols are hidden by default (-fvisibility=hidden); only EDGELLM_API ones are exported.
#if defined(__GNUC__)
#define EDGELLM_API __attribute__((visibility("default")))
#else
#define EDGELLM_API
#endif

// Bumped whenever a signature or an enum value below changes; _native.py checks it at import.
#define EDGELLM_ABI_VERSION 1

// --------------------------------------------------------------------------
// Status codes: every public call that can fail returns one.

typedef enum {
    EDGELLM_STATUS_OK = 0,
    EDGELLM_STATUS_ERR_INVALID_ARG = 1,   // a bad argument (NULL, size out of range)
    EDGELLM_STATUS_ERR_FORMAT = 2,        // tensor data or shapes inconsistent with the config
    EDGELLM_STATUS_ERR_UNSUPPORTED = 3,   // a tensor type or feature this build does not run
    EDGELLM_STATUS_ERR_NOMEM = 4,         // an allocation failed
    EDGELLM_STATUS_ERR_ISA = 5,           // a requested ISA is not built in or not supported by this CPU
    EDGELLM_STATUS_ERR_CONTEXT_FULL = 6,  // the session's KV cache has no room for the tokens
    EDGELLM_STATUS_ERR_STATE = 7,         // a call made in the wrong state (model not finalized, ...)
} edgellm_status;

// Static text for a status code; never NULL.
EDGELLM_API const char *edgellm_status_str(int32_t status);
// Detail of the last failing call on this thread (offset, expected vs found); "" when none.
EDGELLM_API const char *edgellm_last_error(void);

EDGELLM_API uint32_t edgellm_abi_version(void);
// "version=...;compiler=...;isas=generic,avx2,..." : what this library was built with.
EDGELLM_API const char *edgellm_build_info(void);

// --------------------------------------------------------------------------
// Tensor types: values equal ggml's type ids, so a GGUF type goes straight through.

typedef enum {
    EDGELLM_TYPE_F32 = 0,
    EDGELLM_TYPE_F16 = 1,
    EDGELLM_TYPE_Q4_0 = 2,
    EDGELLM_TYPE_Q8_0 = 8,
} edgellm_type;

// Elements per block (1 for F32/F16, 32 for Q4_0/Q8_0); 0 for an unknown type.
EDGELLM_API int64_t edgellm_type_block_size(int32_t type);
// Bytes of one block (4, 2, 18, 34); 0 for an unknown type.
EDGELLM_API size_t edgellm_type_block_bytes(int32_t type);

// x: [n] f32 -> out: [n / block] blocks of `type`. n must be a multiple of the block size.
// Q8_0/Q4_0 rounding is byte-identical to ggml's reference quantizer and the gguf package.
EDGELLM_API int32_t edgellm_quantize(int32_t type, const float *x, void *out, int64_t n);
// x: [n / block] blocks of `type` -> out: [n] f32.
EDGELLM_API int32_t edgellm_dequantize(int32_t type, const void *x, float *out, int64_t n);

// --------------------------------------------------------------------------
// Instruction sets and kernel tables.

typedef enum {
    EDGELLM_ISA_GENERIC = 0,
    EDGELLM_ISA_AVX2 = 1,          // AVX2 + FMA + F16C
    EDGELLM_ISA_AVX512 = 2,        // AVX-512 F/BW/VL/DQ + VNNI
    EDGELLM_ISA_NEON = 3,          // Armv8-A Advanced SIMD
    EDGELLM_ISA_NEON_DOTPROD = 4,  // Armv8.2-A SDOT/UDOT
    EDGELLM_ISA_COUNT = 5,
} edgellm_isa;

// Lower-case name of an ISA ("generic", "avx2", ...); NULL for an out-of-range value.
EDGELLM_API const char *edgellm_isa_name(int32_t isa);
// Bit (1 << isa) set when that ISA's kernels are compiled into this library.
EDGELLM_API uint32_t edgellm_isa_built_mask(void);
// Bit (1 << isa) set when the running CPU (and OS) can execute that ISA.
EDGELLM_API uint32_t edgellm_isa_supported_mask(void);
// Space-separated CPU features detected at run time ("avx2 fma f16c avx512f ...").
EDGELLM_API const char *edgellm_cpu_features(void);
// Choose the active kernel table: name NULL or "" = the best built and supported one;
// otherwise exactly that ISA or EDGELLM_STATUS_ERR_ISA (never a silent fallback).
EDGELLM_API int32_t edgellm_isa_select(const char *name);
// The active table's ISA (selects the best one first if none was chosen yet).
EDGELLM_API int32_t edgellm_isa_active(void);

// y: [n_tokens, rows] = x: [n_tokens, cols] f32 . w: [rows, cols] of `wtype`, transposed.
// Activations are quantised to Q8_0 first for Q4_0/Q8_0 weights, as the model does.
// isa < 0 uses the active table; otherwise that ISA's table (EDGELLM_STATUS_ERR_ISA if unusable).
EDGELLM_API int32_t edgellm_matmul(int32_t isa, int32_t wtype, const void *w, int64_t rows,
                                   int64_t cols, const float *x, int64_t n_tokens, float *y);
// Like edgellm_matmul, with activations already Q8_0: xq: [n_tokens, cols / 32] blocks.
// Only for Q4_0/Q8_0 weights; lets tests compare integer dot products bit for bit.
EDGELLM_API int32_t edgellm_matmul_q8(int32_t isa, int32_t wtype, const void *w, int64_t rows,
                                      int64_t cols, const void *xq, int64_t n_tokens, float *y);

// --------------------------------------------------------------------------
// Model: a config plus tensor pointers into memory the caller keeps mapped (never copied).

typedef enum {
    EDGELLM_ARCH_LLAMA = 0,
    EDGELLM_ARCH_QWEN2 = 1,
} edgellm_arch;

typedef enum {
    EDGELLM_ROPE_NORM = 0,  // rotate adjacent pairs (x[2i], x[2i+1]): llama.cpp "llama"
    EDGELLM_ROPE_NEOX = 1,  // rotate halves (x[i], x[i + rope_dim/2]): llama.cpp "qwen2"
} edgellm_rope_mode;

typedef struct {
    int32_t arch;         // edgellm_arch
    int32_t dim;          // model width
    int32_t hidden_dim;   // feed-forward width
    int32_t n_layers;
    int32_t n_heads;
    int32_t n_kv_heads;   // < n_heads for grouped-query attention
    int32_t head_dim;     // usually dim / n_heads
    int32_t vocab_size;
    int32_t seq_len;      // trained context length (upper bound for n_ctx)
    int32_t rope_mode;    // edgellm_rope_mode
    int32_t rope_dim;     // dims of each head that rotate (usually head_dim)
    float rope_base;      // theta, e.g. 10000
    float rope_scale;     // linear scaling: positions are divided by it (1 = none)
    float norm_eps;       // RMSNorm epsilon
} edgellm_config;

typedef enum {
    EDGELLM_TENSOR_TOKEN_EMBD = 0,   // [vocab_size, dim]
    EDGELLM_TENSOR_OUTPUT_NORM = 1,  // [dim] f32
    EDGELLM_TENSOR_OUTPUT = 2,       // [vocab_size, dim]; absent = tied to TOKEN_EMBD
    EDGELLM_TENSOR_ATTN_NORM = 3,    // per layer [dim] f32
    EDGELLM_TENSOR_ATTN_Q = 4,       // per layer [n_heads * head_dim, dim]
    EDGELLM_TENSOR_ATTN_K = 5,       // per layer [n_kv_heads * head_dim, dim]
    EDGELLM_TENSOR_ATTN_V = 6,       // per layer [n_kv_heads * head_dim, dim]
    EDGELLM_TENSOR_ATTN_OUT = 7,     // per layer [dim, n_heads * head_dim]
    EDGELLM_TENSOR_ATTN_Q_BIAS = 8,  // per layer [n_heads * head_dim] f32 (qwen2)
    EDGELLM_TENSOR_ATTN_K_BIAS = 9,  // per layer [n_kv_heads * head_dim] f32 (qwen2)
    EDGELLM_TENSOR_ATTN_V_BIAS = 10, // per layer [n_kv_heads * head_dim] f32 (qwen2)
    EDGELLM_TENSOR_FFN_NORM = 11,    // per layer [dim] f32
    EDGELLM_TENSOR_FFN_GATE = 12,    // per layer [hidden_dim, dim]
    EDGELLM_TENSOR_FFN_UP = 13,      // per layer [hidden_dim, dim]
    EDGELLM_TENSOR_FFN_DOWN = 14,    // per layer [dim, hidden_dim]
    EDGELLM_TENSOR_ROLE_COUNT = 15,
} edgellm_tensor_role;

typedef struct edgellm_model edgellm_model;

// Validates cfg (positive sizes, head_dim * n_heads consistent, n_heads % n_kv_heads == 0, ...).
EDGELLM_API int32_t edgellm_model_new(const edgellm_config *cfg, edgellm_model **out);
// Registers one tensor. Shapes use GGUF order: ne0 = columns (innermost), ne1 = rows (1 for
// vectors). data must stay valid until edgellm_model_free; nbytes is checked against the shape.
// layer is ignored (pass -1) for the non-layer roles.
EDGELLM_API int32_t edgellm_model_set_tensor(edgellm_model *m, int32_t role, int32_t layer,
                                             int32_t type, const void *data, int64_t ne0,
                                             int64_t ne1, size_t nbytes);
// Checks that every required tensor is present; after it, sessions may be created.
EDGELLM_API int32_t edgellm_model_finalize(edgellm_model *m);
EDGELLM_API void edgellm_model_free(edgellm_model *m);

// --------------------------------------------------------------------------
// LoRA adapters: low-rank updates of a model's projections, attached without reloading it.
// The forward adds scale * (alpha / rank) * B (A x) to each adapted projection's output
// (alpha 0: scale * B (A x), as llama.cpp does). Tensors follow llama.cpp's GGUF adapter
// layout: for a base tensor W of shape [ne0 = n_in, ne1 = n_out], "<W>.lora_a" is
// [ne0 = n_in, ne1 = rank] and "<W>.lora_b" is [ne0 = rank, ne1 = n_out]. Q/K rows follow
// the base weight's row order (llama.cpp's converters permute them the same way).

typedef struct edgellm_adapter edgellm_adapter;

typedef enum {
    EDGELLM_LORA_A = 0,  // the down projection, [ne0 = n_in, ne1 = rank]
    EDGELLM_LORA_B = 1,  // the up projection, [ne0 = rank, ne1 = n_out]
} edgellm_lora_part;

// A new, empty adapter for the finalized model m, which must outlive it. alpha: the
// adapter.lora.alpha value (0 = none); must be finite and >= 0.
EDGELLM_API int32_t edgellm_adapter_new(const edgellm_model *m, float alpha, edgellm_adapter **out);
// Registers one half of the pair of a projection role (ATTN_Q/K/V/OUT, FFN_GATE/UP/DOWN, or
// OUTPUT on an untied model; layer -1 for OUTPUT). Types: F32 and F16 are used in place (data
// must stay valid until edgellm_adapter_free), Q8_0 and Q4_0 are dequantised into a copy.
// Refused: a shape that does not fit the base tensor, a rank outside [1, 4096],
// a part already set, a non-finite value (EDGELLM_STATUS_ERR_FORMAT names the element).
EDGELLM_API int32_t edgellm_adapter_set_tensor(edgellm_adapter *a, int32_t role, int32_t layer,
                                               int32_t part, int32_t type, const void *data,
                                               int64_t ne0, int64_t ne1, size_t nbytes);
// Checks that every projection has both parts with equal ranks and that there is at least one.
EDGELLM_API int32_t edgellm_adapter_finalize(edgellm_adapter *a);
// Adapted projections (pairs) of a finalized adapter; 0 before.
EDGELLM_API int32_t edgellm_adapter_n_pairs(const edgellm_adapter *a);
// Detaches it first when it is attached.
EDGELLM_API void edgellm_adapter_free(edgellm_adapter *a);

// Attaches a finalized adapter built for m to every session of m, replacing the one attached
// (scale: the user's multiplier, finite). Detach removes it. Both must be called between evals:
// never while a session of m is inside edgellm_session_eval. A session whose KV cache was filled
// under another adapter (or none) refuses to append (EDGELLM_STATUS_ERR_STATE) until it is
// truncated to 0, so a cache never mixes two adapters.
EDGELLM_API int32_t edgellm_model_attach_adapter(edgellm_model *m, edgellm_adapter *a, float scale);
EDGELLM_API int32_t edgellm_model_detach_adapter(edgellm_model *m);

// --------------------------------------------------------------------------
// Session: a KV cache, scratch buffers and a thread pool for one conversation.
// A session handle is single-threaded: one call at a time.

typedef struct edgellm_session edgellm_session;

// Bytes the KV cache of a session with n_ctx positions and kv_type (F32 or F16) takes.
EDGELLM_API size_t edgellm_kv_cache_bytes(const edgellm_model *m, int32_t n_ctx, int32_t kv_type);
EDGELLM_API int32_t edgellm_session_new(const edgellm_model *m, int32_t n_ctx, int32_t kv_type,
                                        int32_t n_threads, edgellm_session **out);
EDGELLM_API void edgellm_session_free(edgellm_session *s);

typedef enum {
    EDGELLM_LOGITS_NONE = 0,  // logits may be NULL
    EDGELLM_LOGITS_LAST = 1,  // logits: [vocab_size] for the last token
    EDGELLM_LOGITS_ALL = 2,   // logits: [n_tokens, vocab_size]
} edgellm_logits_mode;

// Appends tokens: [n_tokens] at the current position (batched prefill when n_tokens > 1).
// EDGELLM_STATUS_ERR_CONTEXT_FULL (and no change) when pos + n_tokens > n_ctx.
EDGELLM_API int32_t edgellm_session_eval(edgellm_session *s, const int32_t *tokens,
                                         int32_t n_tokens, int32_t logits_mode, float *logits);
// Number of positions held in the KV cache.
EDGELLM_API int32_t edgellm_session_pos(const edgellm_session *s);
EDGELLM_API int32_t edgellm_session_n_ctx(const edgellm_session *s);
// Keeps the first n_keep positions (rewind for multi-turn reuse); n_keep <= pos.
EDGELLM_API int32_t edgellm_session_truncate(edgellm_session *s, int32_t n_keep);

#ifdef __cplusplus
}
#endif
#endif  // EDGELLM_H
