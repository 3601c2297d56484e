/* SPDX-License-Identifier: MIT */
/* A TFLite delegate plugin that claims no nodes: the interpreter calls Prepare, then runs
   every op on its own kernels. tests/test_tflite.py builds it to check that edgellm loads a
   delegate a board names when it is present. Layout of TfLiteDelegate from
   tensorflow/lite/core/c/common.h; tflite_plugin_* is the external-delegate entry point
   that load_delegate() calls. */
#include <stddef.h>
#include <stdint.h>
typedef struct TfLiteDelegate {
  void *data_;
  int (*Prepare)(void *context, struct TfLiteDelegate *delegate);
  int (*CopyFromBufferHandle)(void *, struct TfLiteDelegate *, int, void *);
  int (*CopyToBufferHandle)(void *, struct TfLiteDelegate *, int, void *);
  void (*FreeBufferHandle)(void *, struct TfLiteDelegate *, int *);
  int64_t flags;
  void *opaque_delegate_builder;
} TfLiteDelegate;
static int prepare_calls;
static int prepare(void *context, TfLiteDelegate *delegate) { (void)context; (void)delegate; prepare_calls++; return 0; }
static TfLiteDelegate delegate = {NULL, prepare, NULL, NULL, NULL, 0, NULL};
TfLiteDelegate *tflite_plugin_create_delegate(char **keys, char **values, size_t n, void (*err)(const char *)) {
  (void)keys; (void)values; (void)n; (void)err; return &delegate;
}
void tflite_plugin_destroy_delegate(TfLiteDelegate *d) { (void)d; }
int noop_delegate_prepare_calls(void) { return prepare_calls; }
