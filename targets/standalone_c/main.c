/* fxopt standalone model: example program.
 *
 * Reads input_<i>.bin (raw little-endian tensors, the sizes in fxopt_model.h) from the current
 * directory, runs the model, writes output_<i>.bin and prints the stack the run used. On a
 * microcontroller under qemu-system the files are the host's, through semihosting (picolibc's
 * stdio with --oslib=semihost); on Linux they are ordinary files. Replace the file I/O with your
 * sensor and your actuator: the model itself is fxopt_model_run() (fxopt_model.h).
 *
 *   ./model [REPEAT]      Linux: REPEAT more runs after the first, each bracketed by the marker
 *                         system calls of fxopt's qemu instruction-counting plugin
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fxopt_model.h"

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define FXOPT_MARK(what) ((void)syscall(0x5F0C, (long)(what))) /* fxopt's qemu-insn plugin */
#else
#define FXOPT_MARK(what) ((void)0)
#endif

#ifndef FXOPT_STACK_PROBE_BYTES
#define FXOPT_STACK_PROBE_BYTES 16384 /* stack measured below main's frame; less than the stack */
#endif
#define FXOPT_PAINT 0xA5u

static uint8_t input_data[FXOPT_MODEL_NUM_INPUTS > 0 ? FXOPT_MODEL_NUM_INPUTS : 1]
    [(FXOPT_MODEL_IO_MAX_BYTES + 63u) & ~63u] __attribute__((aligned(64)));
static uint8_t output_data[FXOPT_MODEL_NUM_OUTPUTS][(FXOPT_MODEL_IO_MAX_BYTES + 63u) & ~63u]
    __attribute__((aligned(64)));

/* Stack measurement: paint an area below this frame, run, and find how much of it was written. */
static __attribute__((noinline)) void paint_stack(void) {
  volatile uint8_t area[FXOPT_STACK_PROBE_BYTES];
  for (size_t i = 0; i < sizeof(area); ++i) area[i] = FXOPT_PAINT;
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized" /* reading what paint_stack and the model left is the point */
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
static __attribute__((noinline)) size_t stack_used(void) {
  volatile uint8_t area[FXOPT_STACK_PROBE_BYTES];
  size_t untouched = 0;
  while (untouched < sizeof(area) && area[untouched] == FXOPT_PAINT) ++untouched;
  return sizeof(area) - untouched;
}
#pragma GCC diagnostic pop

static int io(const char* kind, int index, void* data, size_t bytes, int write) {
  char name[32];
  snprintf(name, sizeof(name), "%s_%d.bin", kind, index);
  FILE* f = fopen(name, write ? "wb" : "rb");
  if (!f) { printf("fxopt: cannot open %s\n", name); return 0; }
  size_t done = write ? fwrite(data, 1, bytes, f) : fread(data, 1, bytes, f);
  fclose(f);
  if (done != bytes) { printf("fxopt: %s %s: %u of %u bytes\n", write ? "writing" : "reading", name,
                              (unsigned)done, (unsigned)bytes); return 0; }
  return 1;
}

int main(int argc, char** argv) {
  const void* inputs[FXOPT_MODEL_NUM_INPUTS > 0 ? FXOPT_MODEL_NUM_INPUTS : 1];
  void* outputs[FXOPT_MODEL_NUM_OUTPUTS];
  int repeat = argc > 1 ? atoi(argv[1]) : 0;
  for (int i = 0; i < FXOPT_MODEL_NUM_INPUTS; ++i) {
    if (!io("input", i, input_data[i], fxopt_model_input_bytes[i], 0)) return 2;
    inputs[i] = input_data[i];
  }
  for (int i = 0; i < FXOPT_MODEL_NUM_OUTPUTS; ++i) outputs[i] = output_data[i];
  paint_stack();
  int status = fxopt_model_run(inputs, outputs);
  size_t stack = stack_used();
  if (status != 0) { printf("fxopt: model failed: %s\n", fxopt_model_last_error()); return 3; }
  for (int r = 0; r < repeat; ++r) {
    FXOPT_MARK(1);
    status = fxopt_model_run(inputs, outputs);
    FXOPT_MARK(2);
    if (status != 0) { printf("fxopt: model failed: %s\n", fxopt_model_last_error()); return 3; }
  }
  for (int i = 0; i < FXOPT_MODEL_NUM_OUTPUTS; ++i)
    if (!io("output", i, output_data[i], fxopt_model_output_bytes[i], 1)) return 2;
  printf("fxopt: ok stack %u workspace %u\n", (unsigned)stack, (unsigned)fxopt_model_workspace_peak());
  return 0;
}
