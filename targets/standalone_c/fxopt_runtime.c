/* fxopt standalone runtime shim: the few callbacks TVM-generated kernels need, for a model
 * compiled to plain C by fxopt (fxopt_model.c). No heap, no threads, no OS.
 *
 * - errors: kernels report a failed check (wrong shape, NULL data) through
 *   TVMFFIErrorSetRaisedFromCStr[Parts]; the message is kept for fxopt_model_last_error().
 * - workspace: TVMBackendAllocWorkspace takes 64-byte aligned blocks, last in first out (TVM frees
 *   in reverse order of allocation), from the region of the static arena that fxopt_model.c gives
 *   each kernel call that needs one (sized from the lowered TIR, placed where no live tensor is).
 * - parallel loops: TVMBackendParallelLaunch runs the loop body once as the only task.
 */
#include "fxopt_runtime.h"

#include <string.h>

#ifndef FXOPT_ERROR_BYTES
#define FXOPT_ERROR_BYTES 160
#endif
#ifndef FXOPT_WORKSPACE_DEPTH
#define FXOPT_WORKSPACE_DEPTH 16 /* workspace blocks one kernel may hold at once */
#endif

static char fxopt_error[FXOPT_ERROR_BYTES];
static size_t fxopt_error_len;

static void fxopt_error_clear(void) { fxopt_error_len = 0; fxopt_error[0] = '\0'; }

static void fxopt_error_append(const char* text) {
  while (text && *text && fxopt_error_len + 1 < FXOPT_ERROR_BYTES) fxopt_error[fxopt_error_len++] = *text++;
  fxopt_error[fxopt_error_len] = '\0';
}

static void fxopt_error_number(size_t value) {
  char digits[24];
  int n = 0;
  do { digits[n++] = (char)('0' + value % 10); value /= 10; } while (value && n < 23);
  char text[24];
  for (int i = 0; i < n; ++i) text[i] = digits[n - 1 - i];
  text[n] = '\0';
  fxopt_error_append(text);
}

const char* fxopt_model_last_error(void) { return fxopt_error; }

void fxopt_runtime_error(const char* message) {
  fxopt_error_clear();
  fxopt_error_append(message);
}

void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message) {
  fxopt_error_clear();
  fxopt_error_append(kind);
  fxopt_error_append(": ");
  fxopt_error_append(message);
}

void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t num_parts) {
  fxopt_error_clear();
  fxopt_error_append(kind);
  fxopt_error_append(": ");
  for (int32_t i = 0; i < num_parts; ++i) fxopt_error_append(parts[i]);
}

int fxopt_runtime_failed(const char* kernel) {
  char message[FXOPT_ERROR_BYTES];
  memcpy(message, fxopt_error, fxopt_error_len + 1);
  fxopt_error_clear();
  fxopt_error_append("kernel ");
  fxopt_error_append(kernel);
  fxopt_error_append(" failed: ");
  fxopt_error_append(message[0] ? message : "(no message)");
  return -1;
}

int fxopt_runtime_aligned(const void* input, int index) {
  if (((uintptr_t)input & 63u) == 0 && input != NULL) return 1;
  fxopt_error_clear();
  fxopt_error_append("input ");
  fxopt_error_number((size_t)index);
  fxopt_error_append(input ? " is not 64-byte aligned (the kernels assume it)" : " is NULL");
  return 0;
}

/* ---- workspace ---- */
static uint8_t* fxopt_ws_base;
static size_t fxopt_ws_size, fxopt_ws_used, fxopt_ws_peak;
static size_t fxopt_ws_stack[FXOPT_WORKSPACE_DEPTH]; /* offset of each block held */
static int fxopt_ws_depth;

size_t fxopt_model_workspace_peak(void) { return fxopt_ws_peak; }

void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                               int dtype_bits_hint) {
  (void)device_type; (void)device_id; (void)dtype_code_hint; (void)dtype_bits_hint;
  size_t size = (size_t)((nbytes + 63u) & ~(uint64_t)63u);
  if (fxopt_ws_depth == FXOPT_WORKSPACE_DEPTH || size > fxopt_ws_size - fxopt_ws_used) {
    fxopt_error_clear();
    fxopt_error_append("workspace exhausted: a kernel asked for ");
    fxopt_error_number((size_t)nbytes);
    fxopt_error_append(" bytes with ");
    fxopt_error_number(fxopt_ws_size - fxopt_ws_used);
    fxopt_error_append(" free");
    return NULL;
  }
  fxopt_ws_stack[fxopt_ws_depth++] = fxopt_ws_used;
  void* block = fxopt_ws_base + fxopt_ws_used;
  fxopt_ws_used += size;
  if (fxopt_ws_used > fxopt_ws_peak) fxopt_ws_peak = fxopt_ws_used;
  return block;
}

int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr) {
  (void)device_type; (void)device_id;
  if (fxopt_ws_depth == 0 || (uint8_t*)ptr != fxopt_ws_base + fxopt_ws_stack[fxopt_ws_depth - 1]) {
    fxopt_runtime_error("workspace freed out of order");
    return -1;
  }
  fxopt_ws_used = fxopt_ws_stack[--fxopt_ws_depth];
  return 0;
}

/* ---- parallel loops: serial ---- */
int TVMBackendParallelLaunch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  (void)num_task;
  TVMParallelGroupEnv env = {NULL, 1};
  return flambda(0, &env, cdata);
}

int TVMBackendParallelBarrier(int task_id, TVMParallelGroupEnv* penv) {
  (void)task_id; (void)penv;
  return 0;
}

/* LLVM-generated kernels call the backend through function-pointer slots that the TVM loader
 * fills; here fxopt_runtime_begin fills them (weak: C kernels call the functions directly). */
extern void* __TVMBackendAllocWorkspace __attribute__((weak));
extern void* __TVMBackendFreeWorkspace __attribute__((weak));
extern void* __TVMBackendParallelLaunch __attribute__((weak));
extern void* __TVMBackendParallelBarrier __attribute__((weak));

void fxopt_runtime_begin(void) {
  if (&__TVMBackendAllocWorkspace) __TVMBackendAllocWorkspace = (void*)TVMBackendAllocWorkspace;
  if (&__TVMBackendFreeWorkspace) __TVMBackendFreeWorkspace = (void*)TVMBackendFreeWorkspace;
  if (&__TVMBackendParallelLaunch) __TVMBackendParallelLaunch = (void*)TVMBackendParallelLaunch;
  if (&__TVMBackendParallelBarrier) __TVMBackendParallelBarrier = (void*)TVMBackendParallelBarrier;
  fxopt_runtime_workspace(NULL, 0);
  fxopt_error_clear();
}

/* The workspace of the next kernel call: a region of the arena that no tensor alive during the
 * call occupies (fxopt plans it with the tensors' storages). */
void fxopt_runtime_workspace(uint8_t* workspace, size_t workspace_bytes) {
  fxopt_ws_base = workspace;
  fxopt_ws_size = workspace_bytes;
  fxopt_ws_used = 0;
  fxopt_ws_depth = 0;
}
