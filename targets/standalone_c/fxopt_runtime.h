/* fxopt standalone runtime: what TVM's kernels need from a host, without the TVM runtime.
 *
 * The types are the stable ABI of DLPack (DLTensor) and tvm-ffi (TVMFFIAny, the packed-call
 * argument); the functions are the callbacks TVM-generated kernels call: error reporting,
 * workspace allocation (a LIFO allocator over a region of the model's static arena) and
 * parallel launch (serial: one task does all the work). C99, no OS, no heap.
 */
#ifndef FXOPT_RUNTIME_H_
#define FXOPT_RUNTIME_H_
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- DLPack ---- */
#ifndef DLPACK_VERSION
typedef enum { kDLCPU = 1 } DLDeviceType;
typedef struct { int32_t device_type; int32_t device_id; } DLDevice;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DLDataType;
typedef struct {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
} DLTensor;
#endif

/* ---- tvm-ffi packed calls ---- */
enum { kFxoptFFIInt = 1, kFxoptFFIFloat = 3, kFxoptFFIDLTensorPtr = 7 };
typedef struct {
  int32_t type_index;
  uint32_t zero_padding;
  union { int64_t v_int64; double v_float64; void* v_ptr; };
} TVMFFIAny;
typedef int32_t (*TVMFFISafeCallType)(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result);

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(sizeof(TVMFFIAny) == 16, "TVMFFIAny is 16 bytes in tvm-ffi's ABI");
#endif

#define FXOPT_ARG_TENSOR(ptr) {kFxoptFFIDLTensorPtr, 0, {.v_ptr = (void*)(ptr)}}
#define FXOPT_ARG_INT(v) {kFxoptFFIInt, 0, {.v_int64 = (v)}}
#define FXOPT_ARG_FLOAT(v) {kFxoptFFIFloat, 0, {.v_float64 = (v)}}
#define FXOPT_KERNEL(name) extern int32_t __tvm_ffi_##name(void*, const TVMFFIAny*, int32_t, TVMFFIAny*)
#define FXOPT_CALL(name, args, n)                                                   \
  do {                                                                              \
    if (__tvm_ffi_##name(NULL, (args), (n), &result) != 0) return fxopt_runtime_failed(#name); \
  } while (0)

/* Where the model's arena goes: override (e.g. a linker section of fast RAM) with
 * -DFXOPT_ARENA_ATTRIBUTES='__attribute__((aligned(64), section(".sram")))' */
#ifndef FXOPT_ARENA_ATTRIBUTES
#define FXOPT_ARENA_ATTRIBUTES __attribute__((aligned(64)))
#endif

/* ---- the shim (fxopt_runtime.c) ---- */
void fxopt_runtime_begin(void);
void fxopt_runtime_workspace(uint8_t* workspace, size_t workspace_bytes);
int fxopt_runtime_aligned(const void* input, int index);
int fxopt_runtime_failed(const char* kernel);
void fxopt_runtime_error(const char* message);

/* callbacks of TVM-generated code */
typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message);
void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t num_parts);
void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                               int dtype_bits_hint);
int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr);
int TVMBackendParallelLaunch(FTVMParallelLambda flambda, void* cdata, int num_task);
int TVMBackendParallelBarrier(int task_id, TVMParallelGroupEnv* penv);

#ifdef __cplusplus
}
#endif
#endif /* FXOPT_RUNTIME_H_ */
