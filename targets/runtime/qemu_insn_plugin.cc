/*
 * fxopt's instruction-counting plugin for qemu-user (TCG plugin API version 1: qemu 7.2 to 8.x).
 *
 *   qemu-riscv64 -plugin file=libfxopt_insn.so,out=COUNTS.txt[,mark=NUM] PROGRAM ...
 *
 * Counts the guest instructions executed between pairs of marker system calls that the program
 * issues itself: syscall(NUM, 1) opens an interval, syscall(NUM, 2) closes it. fxopt-run puts
 * one pair around each timed run of the model, so each interval is one inference and nothing of
 * process start-up, file reading or dynamic loading is in it (a whole-process count of the
 * runner can vary by tens of instructions from run to run; the intervals do not, with
 * TVM_NUM_THREADS=1). NUM
 * defaults to the runner's kMarkSyscall; outside this plugin the number is an unknown system
 * call, which returns ENOSYS and does nothing.
 *
 * At exit the plugin writes COUNTS.txt:
 *   fxopt-insn-count 1
 *   total <instructions of the whole process>
 *   intervals <K>
 *   <instructions of interval 1>
 *   ...
 *
 * Why a plugin of fxopt's own, and why these declarations instead of qemu's header: Debian's
 * qemu-user is built with plugin support but ships neither plugins nor <qemu/qemu-plugin.h>,
 * and getting the header means a deb-src entry and a 23 MB source download on every clean CI
 * machine. The plugin uses six functions of the API, declared below as qemu 7.2 declares them;
 * qemu resolves them from its own executable when it loads the plugin, and refuses a plugin
 * whose qemu_plugin_version it does not support (so a newer qemu says so instead of crashing).
 *
 * Counting: when a translation block is translated, an inline "add the block's instruction
 * count to a 64-bit counter" is attached to it, so counting costs one add per executed block
 * (a tight loop under qemu runs 1.3x slower than without the plugin; an execution callback
 * per block made it 6x). Version 2 of the API (qemu 9) replaced this inline add by per-vCPU
 * scoreboards. The add is not atomic: with several guest threads running at once, adds can
 * be lost; fxopt counts with one thread (TVM_NUM_THREADS=1), where counts with more threads
 * would vary anyway with the pool's spin-waits.
 *
 * A block is counted whole when it starts; one that ends early (a fault inside it) would count
 * instructions that did not run, and a model does not fault. RVV and other vector instructions
 * count 1 each whatever the vector length, so counts compare builds for the same ISA only.
 */
#include <cerrno>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

extern "C" {

// --- QEMU plugin API, version 1 (the subset used here) ------------------------------------------

#define FXOPT_PLUGIN_EXPORT __attribute__((visibility("default")))

typedef uint64_t qemu_plugin_id_t;

typedef struct qemu_info_t {
  const char* target_name;
  struct {
    int min;
    int cur;
  } version;
  bool system_emulation;
  union {
    struct {
      int smp_vcpus;
      int max_vcpus;
    } system;
  };
} qemu_info_t;

struct qemu_plugin_tb;

enum qemu_plugin_op {
  QEMU_PLUGIN_INLINE_ADD_U64,
};

typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void* userdata);
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb* tb);
typedef void (*qemu_plugin_vcpu_syscall_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index,
                                              int64_t num, uint64_t a1, uint64_t a2, uint64_t a3,
                                              uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7,
                                              uint64_t a8);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb* tb, enum qemu_plugin_op op,
                                              void* ptr, uint64_t imm);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb* tb);
void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_syscall_cb_t cb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void* userdata);
void qemu_plugin_outs(const char* string);

FXOPT_PLUGIN_EXPORT extern int qemu_plugin_version;
FXOPT_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t* info, int argc,
                                            char** argv);

// --- the plugin ---------------------------------------------------------------------------------

FXOPT_PLUGIN_EXPORT int qemu_plugin_version = 1;

}  // extern "C"

namespace {

constexpr int64_t kDefaultMark = 0x5F0C;  // fxopt_run.cc: kMarkSyscall
constexpr uint64_t kOpen = 1, kClose = 2;

int64_t g_mark = kDefaultMark;
const char* g_out = nullptr;
uint64_t g_total = 0;         // instructions so far (inline adds by the translated code)
uint64_t g_start = 0;         // g_total when the open interval began
bool g_open = false;          // marks come from one thread: plain variables suffice
uint64_t* g_intervals = nullptr;
size_t g_count = 0, g_capacity = 0;
bool g_out_of_memory = false;

void OnTranslate(qemu_plugin_id_t /*id*/, struct qemu_plugin_tb* tb) {
  qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &g_total,
                                           qemu_plugin_tb_n_insns(tb));
}

void OnSyscall(qemu_plugin_id_t /*id*/, unsigned int /*vcpu*/, int64_t num, uint64_t a1,
               uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t) {
  if (num != g_mark) return;
  uint64_t now = __atomic_load_n(&g_total, __ATOMIC_RELAXED);  // the guest thread's own adds
  if (a1 == kOpen) {
    g_start = now;
    g_open = true;
  } else if (a1 == kClose && g_open) {
    g_open = false;
    if (g_count == g_capacity) {
      size_t capacity = g_capacity ? 2 * g_capacity : 64;
      void* grown = std::realloc(g_intervals, capacity * sizeof(uint64_t));
      if (grown == nullptr) {
        g_out_of_memory = true;
        return;
      }
      g_intervals = static_cast<uint64_t*>(grown);
      g_capacity = capacity;
    }
    g_intervals[g_count++] = now - g_start;
  }
}

void OnExit(qemu_plugin_id_t /*id*/, void* /*userdata*/) {
  FILE* f = std::fopen(g_out, "w");
  if (f == nullptr) {
    char msg[512];
    std::snprintf(msg, sizeof(msg), "fxopt insn plugin: cannot write %s: %s\n", g_out,
                  std::strerror(errno));
    qemu_plugin_outs(msg);
    return;
  }
  std::fprintf(f, "fxopt-insn-count 1\ntotal %" PRIu64 "\nintervals %zu\n", g_total, g_count);
  for (size_t i = 0; i < g_count; ++i) std::fprintf(f, "%" PRIu64 "\n", g_intervals[i]);
  if (g_out_of_memory) std::fprintf(f, "error out of memory: intervals after %zu lost\n", g_count);
  std::fclose(f);
}

}  // namespace

extern "C" FXOPT_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id,
                                                       const qemu_info_t* /*info*/, int argc,
                                                       char** argv) {
  for (int i = 0; i < argc; ++i) {
    const char* arg = argv[i];
    if (std::strncmp(arg, "out=", 4) == 0) {
      g_out = arg + 4;  // argv lives as long as the plugin
    } else if (std::strncmp(arg, "mark=", 5) == 0) {
      char* end = nullptr;
      g_mark = std::strtoll(arg + 5, &end, 0);
      if (end == arg + 5 || *end != '\0') {
        std::fprintf(stderr, "fxopt insn plugin: mark= needs a number, got '%s'\n", arg + 5);
        return 1;
      }
    } else {
      std::fprintf(stderr, "fxopt insn plugin: unknown argument '%s' (out=FILE, mark=NUM)\n", arg);
      return 1;
    }
  }
  if (g_out == nullptr || *g_out == '\0') {
    std::fprintf(stderr, "fxopt insn plugin: give the output file as out=FILE\n");
    return 1;
  }
  qemu_plugin_register_vcpu_tb_trans_cb(id, OnTranslate);
  qemu_plugin_register_vcpu_syscall_cb(id, OnSyscall);
  qemu_plugin_register_atexit_cb(id, OnExit, nullptr);
  return 0;
}
