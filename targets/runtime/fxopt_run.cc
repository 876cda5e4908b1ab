/*
 * fxopt-run: run a model library built by fxopt (TVM Relax VM) on this machine.
 *
 *   fxopt-run MODEL.so --input a.npy [--input b.npy ...] [--output-dir DIR] [--warmup W] [--repeat N]
 *   fxopt-run MODEL.so --check BUILD_DIR [--rtol R] [--atol A] [--output-dir DIR] [--repeat N]
 *
 * It loads MODEL.so (vm_load_executable, vm_initialization on the CPU, then `main`), reads the
 * inputs from .npy files, runs main once and writes each output as output_<i>.npy (outputs of a
 * nested tuple are numbered depth-first). --warmup W then runs W more times untimed, and
 * --repeat N times N more runs. --check reads
 * BUILD_DIR/input_<i>.npy as the inputs and compares the outputs with
 * BUILD_DIR/expected_output_<i>.npy: |a - e| <= atol * max|e| + rtol * |e| for floats, equality
 * for integers and bools.
 *
 * Exit status: 0 ok (and a check that matches), 1 a check that does not match, 2 any error
 * (usage, files, a model for another machine, a failure inside the model). Errors are one line
 * on stderr starting with "fxopt-run: error:".
 *
 * The runtime is linked into this executable and its C API (TVM*) is exported, so the model
 * library binds to it when it is dlopen'ed: a build directory needs this file and the model
 * only.
 *
 * Each timed run is bracketed by two marker system calls, syscall(kMarkSyscall, 1) before and
 * syscall(kMarkSyscall, 2) after: fxopt's qemu-user plugin (qemu_insn_plugin.cc) counts the
 * instructions between them, so an instruction count covers model execution only. Anywhere
 * else the number is an unknown system call that returns ENOSYS and does nothing.
 */
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>
#include <tvm/runtime/tensor.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

namespace {

using tvm::runtime::Tensor;
namespace ffi = tvm::ffi;

constexpr int kExitOk = 0;
constexpr int kExitMismatch = 1;
constexpr int kExitError = 2;

// The marker system call of the instruction-counting plugin (qemu_insn_plugin.cc: kDefaultMark).
// No Linux architecture has a system call of that number.
constexpr long kMarkSyscall = 0x5F0C;
constexpr long kMarkOpen = 1, kMarkClose = 2;

inline void Mark(long what) {
  long ignored = ::syscall(kMarkSyscall, what);  // -1/ENOSYS outside the plugin
  (void)ignored;
}

/*! \brief Any failure that ends the run with exit status 2; the message is one line. */
struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string BaseName(const std::string& path) {
  size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (dir.empty() || dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string OneLine(std::string text) {
  for (char& c : text) {
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
  }
  size_t begin = text.find_first_not_of(' ');
  size_t end = text.find_last_not_of(' ');
  return begin == std::string::npos ? std::string() : text.substr(begin, end - begin + 1);
}

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

// ------------------------------------------------------------------------------------------
// Machines: the model's ELF header against the architecture this runner was compiled for.

#if defined(__x86_64__)
constexpr uint16_t kSelfMachine = 62;
#elif defined(__aarch64__)
constexpr uint16_t kSelfMachine = 183;
#elif defined(__riscv)
constexpr uint16_t kSelfMachine = 243;
#elif defined(__arm__)
constexpr uint16_t kSelfMachine = 40;
#elif defined(__i386__)
constexpr uint16_t kSelfMachine = 3;
#else
constexpr uint16_t kSelfMachine = 0;  // unknown: no check
#endif
constexpr int kSelfClass = sizeof(void*) == 8 ? 2 : 1;  // ELFCLASS64 / ELFCLASS32

std::string MachineName(uint16_t machine, int elf_class) {
  switch (machine) {
    case 62:
      return "x86_64";
    case 183:
      return "aarch64";
    case 243:
      return elf_class == 2 ? "riscv64" : "riscv32";
    case 40:
      return "arm";
    case 3:
      return "i386";
    case 8:
      return "mips";
    case 21:
      return "ppc64";
    case 22:
      return "s390x";
    default:
      return "ELF machine " + std::to_string(machine);
  }
}

uint16_t Read16(const unsigned char* p, bool little) {
  return little ? static_cast<uint16_t>(p[0] | (p[1] << 8))
                : static_cast<uint16_t>((p[0] << 8) | p[1]);
}

uint32_t Read32(const unsigned char* p, bool little) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[little ? i : 3 - i]) << (8 * i);
  return v;
}

uint64_t Read64(const unsigned char* p, bool little) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[little ? i : 7 - i]) << (8 * i);
  return v;
}

/*! \brief "rv64i2p1_m2p0_..._v1p0_zicsr2p0_..." -> "rv64imafdcv": the single-letter extensions. */
std::string ShortIsa(const std::string& isa) {
  if (isa.size() < 5 || isa.compare(0, 2, "rv") != 0) return isa;
  std::string out = isa.substr(0, 4);  // rv32 / rv64
  std::stringstream parts(isa.substr(4));
  std::string part;
  while (std::getline(parts, part, '_')) {
    if (part.empty()) continue;
    // "m2p0" -> m; multi-letter extensions (zicsr2p0, ...) are left out
    if (part.size() == 1 || std::isdigit(static_cast<unsigned char>(part[1]))) out += part[0];
  }
  return out;
}

/*! \brief size bytes of a file from offset; empty when the file is shorter. */
std::vector<unsigned char> ReadAt(std::ifstream& in, uint64_t offset, uint64_t size) {
  std::vector<unsigned char> bytes;
  if (size > (uint64_t{1} << 26)) return bytes;  // no ELF header table or attributes is that big
  in.clear();
  in.seekg(static_cast<std::streamoff>(offset));
  bytes.resize(size);
  if (!in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size))) {
    bytes.clear();
  }
  return bytes;
}

/*!
 * \brief The RISC-V ISA a library was built for (Tag_RISCV_arch of its .riscv.attributes
 *  section, shortened), or "" when it has none. Used to explain an illegal instruction.
 */
std::string RiscvArchString(std::ifstream& in, const unsigned char* h) {
  if (h[4] != 2 || h[5] != 1) return "";  // 64-bit little-endian only
  uint64_t shoff = Read64(h + 0x28, true);
  uint16_t shentsize = Read16(h + 0x3A, true), shnum = Read16(h + 0x3C, true);
  uint16_t shstrndx = Read16(h + 0x3E, true);
  if (shentsize < 64 || shstrndx >= shnum) return "";
  std::vector<unsigned char> table = ReadAt(in, shoff, uint64_t{shnum} * shentsize);
  if (table.empty()) return "";
  auto section = [&](uint16_t i) { return table.data() + uint64_t{i} * shentsize; };
  std::vector<unsigned char> names =
      ReadAt(in, Read64(section(shstrndx) + 0x18, true), Read64(section(shstrndx) + 0x20, true));
  static const char kName[] = ".riscv.attributes";
  for (uint16_t i = 0; i < shnum; ++i) {
    uint32_t name = Read32(section(i), true);
    if (names.size() < sizeof(kName) || name > names.size() - sizeof(kName) ||
        std::memcmp(names.data() + name, kName, sizeof(kName)) != 0) {
      continue;
    }
    std::vector<unsigned char> attrs =
        ReadAt(in, Read64(section(i) + 0x18, true), Read64(section(i) + 0x20, true));
    // 'A', a sub-section (uint32 length, "riscv\0"), Tag_File (1) and its uint32 size, then
    // tag/value pairs: odd tags carry a string, even tags a ULEB128 number.
    const unsigned char* q = attrs.data();
    const unsigned char* end = q + attrs.size();
    if (attrs.size() < 16 || q[0] != 'A' || std::memcmp(q + 5, "riscv", 6) != 0 || q[11] != 1) {
      return "";
    }
    q += 16;
    auto uleb = [&]() {
      uint64_t v = 0;
      for (int shift = 0; q < end && shift < 64; shift += 7) {
        unsigned char b = *q++;
        v |= static_cast<uint64_t>(b & 0x7f) << shift;
        if (!(b & 0x80)) break;
      }
      return v;
    };
    while (q < end) {
      uint64_t tag = uleb();
      if (tag % 2 == 0) {
        uleb();
        continue;
      }
      const unsigned char* text = q;
      while (q < end && *q) ++q;
      if (tag == 5) return ShortIsa(std::string(reinterpret_cast<const char*>(text), q - text));
      ++q;
    }
    return "";
  }
  return "";
}

/*! \brief Refuse a model for another machine, before dlopen gives a cryptic message. */
void CheckModelMachine(const std::string& path, std::string* riscv_arch) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    throw Failure(path + " is a directory; give the model library (model.so) in it");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Failure("cannot open " + path + ": " + std::strerror(errno));
  unsigned char h[64] = {0};
  in.read(reinterpret_cast<char*>(h), sizeof(h));
  if (in.gcount() < 20 || std::memcmp(h, "\x7f" "ELF", 4) != 0) {
    throw Failure(path + " is not an ELF shared library; give the model library that "
                  "export_library wrote (model.so in the build directory)");
  }
  int elf_class = h[4];
  uint16_t machine = Read16(h + 18, h[5] == 1);
  if (kSelfMachine != 0 && (machine != kSelfMachine || elf_class != kSelfClass)) {
    std::string model_arch = MachineName(machine, elf_class);
    throw Failure(BaseName(path) + " is built for " + model_arch + ", this runner is " +
                  MachineName(kSelfMachine, kSelfClass) +
                  " (was the build directory copied to the wrong machine?); run it on " +
                  model_arch + " with the runner of its build directory, or under qemu-user");
  }
  if (machine == 243 && in.gcount() == sizeof(h)) *riscv_arch = RiscvArchString(in, h);
}

// An illegal instruction inside the model means it was built for CPU features this processor
// (or qemu's -cpu) lacks; say so instead of dying with "Illegal instruction".
char g_sigill_message[1024];

void OnIllegalInstruction(int) {
  ssize_t ignored = ::write(2, g_sigill_message, std::strlen(g_sigill_message));
  (void)ignored;
  ::_exit(kExitError);
}

void InstallSigillMessage(const std::string& model, const std::string& riscv_arch) {
  std::string msg = "fxopt-run: error: illegal instruction while running " + BaseName(model) +
                    ": it uses CPU features this processor does not have";
  if (!riscv_arch.empty()) msg += " (it was built for " + riscv_arch + ")";
  msg += "; build for a target that matches this CPU, or under qemu-user give -cpu with those "
         "features (e.g. -cpu rv64,v=true,vlen=128 for RVV)\n";
  std::snprintf(g_sigill_message, sizeof(g_sigill_message), "%s", msg.c_str());
  std::signal(SIGILL, OnIllegalInstruction);
}

// ------------------------------------------------------------------------------------------
// .npy files (format 1.0 to 3.0, little-endian, C order).

struct NpyType {
  const char* descr;
  DLDataType dtype;
  const char* name;
};

const NpyType kNpyTypes[] = {
    {"f4", {kDLFloat, 32, 1}, "float32"}, {"f2", {kDLFloat, 16, 1}, "float16"},
    {"f8", {kDLFloat, 64, 1}, "float64"}, {"i8", {kDLInt, 64, 1}, "int64"},
    {"i4", {kDLInt, 32, 1}, "int32"},     {"i2", {kDLInt, 16, 1}, "int16"},
    {"i1", {kDLInt, 8, 1}, "int8"},       {"u1", {kDLUInt, 8, 1}, "uint8"},
    {"u2", {kDLUInt, 16, 1}, "uint16"},   {"u4", {kDLUInt, 32, 1}, "uint32"},
    {"u8", {kDLUInt, 64, 1}, "uint64"},   {"b1", {kDLBool, 8, 1}, "bool"},
};

bool SameType(DLDataType a, DLDataType b) {
  return a.code == b.code && a.bits == b.bits && a.lanes == b.lanes;
}

bool IsBool(DLDataType t) {
  return t.lanes == 1 && ((t.code == kDLBool && t.bits == 8) || (t.code == kDLUInt && t.bits == 1));
}

const NpyType* FindNpyType(DLDataType dtype) {
  if (IsBool(dtype)) dtype = DLDataType{kDLBool, 8, 1};
  for (const NpyType& t : kNpyTypes) {
    if (SameType(t.dtype, dtype)) return &t;
  }
  return nullptr;
}

std::string DTypeName(DLDataType dtype) {
  if (const NpyType* t = FindNpyType(dtype)) return t->name;
  return std::string(ffi::DLDataTypeToString(dtype));
}

size_t ElementBytes(DLDataType dtype) { return (dtype.bits * dtype.lanes + 7) / 8; }

int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

struct HostArray {
  DLDataType dtype;
  std::vector<int64_t> shape;
  std::vector<char> data;
};

/*! \brief The value text of `'key': value` in a .npy header dict, up to the next ',' or ')'. */
std::string NpyHeaderField(const std::string& header, const std::string& key,
                           const std::string& path) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw Failure(path + ": .npy header has no '" + key + "'");
  size_t colon = header.find(':', at);
  if (colon == std::string::npos) throw Failure(path + ": malformed .npy header");
  size_t begin = header.find_first_not_of(' ', colon + 1);
  if (begin == std::string::npos) throw Failure(path + ": malformed .npy header");
  size_t end = header[begin] == '(' ? header.find(')', begin) + 1 : header.find(',', begin);
  if (end == std::string::npos || end == 0) throw Failure(path + ": malformed .npy header");
  return header.substr(begin, end - begin);
}

HostArray ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Failure("cannot open " + path + ": " + std::strerror(errno));
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) {
    throw Failure(path + " is not a .npy file (save arrays with numpy.save)");
  }
  int major = static_cast<unsigned char>(magic[6]);
  uint32_t header_len = 0;
  unsigned char len_bytes[4] = {0, 0, 0, 0};
  if (major == 1) {
    in.read(reinterpret_cast<char*>(len_bytes), 2);
    header_len = Read16(len_bytes, true);
  } else if (major == 2 || major == 3) {
    in.read(reinterpret_cast<char*>(len_bytes), 4);
    header_len = Read32(len_bytes, true);
  } else {
    throw Failure(path + ": .npy format version " + std::to_string(major) + " is not supported");
  }
  std::string header(header_len, '\0');
  if (!in || !in.read(header.data(), header_len)) throw Failure(path + ": truncated .npy header");

  std::string descr = NpyHeaderField(header, "descr", path);
  if (descr.size() < 2 || (descr.front() != '\'' && descr.front() != '"')) {
    throw Failure(path + ": dtype " + descr + " is not supported (structured arrays are not)");
  }
  descr = descr.substr(1, descr.size() - 2);
  if (descr.size() != 3) throw Failure(path + ": dtype '" + descr + "' is not supported");
  char order = descr[0];
  std::string code = descr.substr(1);
  const NpyType* type = nullptr;
  for (const NpyType& t : kNpyTypes) {
    if (code == t.descr) type = &t;
  }
  if (type == nullptr) {
    throw Failure(path + ": dtype '" + descr +
                  "' is not supported; use float32/float16/float64, (u)int8-64 or bool");
  }
  if (order == '>' && type->dtype.bits > 8) {
    throw Failure(path + " is big-endian ('" + descr + "'); save it little-endian, e.g. "
                  "numpy.save(path, a.astype(a.dtype.newbyteorder('<')))");
  }
  if (order != '<' && order != '|' && order != '=' && order != '>') {
    throw Failure(path + ": dtype '" + descr + "' is not supported");
  }
  if (NpyHeaderField(header, "fortran_order", path).rfind("False", 0) != 0) {
    throw Failure(path + " is in Fortran order; save a C-ordered array "
                  "(numpy.save(path, numpy.ascontiguousarray(a)))");
  }
  std::string shape_text = NpyHeaderField(header, "shape", path);
  HostArray array;
  array.dtype = type->dtype;
  for (size_t i = 1; i + 1 < shape_text.size();) {
    size_t j = shape_text.find_first_of(",)", i);
    std::string item = OneLine(shape_text.substr(i, j - i));
    if (!item.empty()) {
      char* stop = nullptr;
      long long d = std::strtoll(item.c_str(), &stop, 10);
      if (*stop != '\0' && *stop != 'L') throw Failure(path + ": bad shape " + shape_text);
      array.shape.push_back(d);
    }
    i = j + 1;
  }
  size_t nbytes = static_cast<size_t>(NumElements(array.shape)) * ElementBytes(array.dtype);
  array.data.resize(nbytes);
  if (nbytes != 0 && !in.read(array.data.data(), nbytes)) {
    throw Failure(path + ": the data is shorter than its shape " + ShapeText(array.shape) +
                  " says");
  }
  return array;
}

void WriteNpy(const std::string& path, const HostArray& array) {
  const NpyType* type = FindNpyType(array.dtype);
  if (type == nullptr) {
    throw Failure("output dtype " + DTypeName(array.dtype) + " has no .npy form");
  }
  std::ostringstream dict;
  dict << "{'descr': '" << (ElementBytes(array.dtype) == 1 ? '|' : '<') << type->descr
       << "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < array.shape.size(); ++i) dict << (i ? ", " : "") << array.shape[i];
  dict << (array.shape.size() == 1 ? ",), }" : "), }");
  std::string header = dict.str();
  size_t total = 10 + header.size() + 1;  // magic, version, length, dict, '\n'
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw Failure("cannot write " + path + ": " + std::strerror(errno));
  unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                          static_cast<unsigned char>(header.size() >> 8)};
  out.write("\x93NUMPY\x01\x00", 8);
  out.write(reinterpret_cast<const char*>(len), 2);
  out << header;
  out.write(array.data.data(), static_cast<std::streamsize>(array.data.size()));
  if (!out.flush()) throw Failure("cannot write " + path + ": " + std::strerror(errno));
}

// ------------------------------------------------------------------------------------------
// Values as doubles, for the comparison.

double HalfToDouble(uint16_t h) {
  int sign = (h >> 15) & 1, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  double v;
  if (exponent == 0) {
    v = std::ldexp(mantissa, -24);
  } else if (exponent == 31) {
    v = mantissa ? std::numeric_limits<double>::quiet_NaN()
                 : std::numeric_limits<double>::infinity();
  } else {
    v = std::ldexp(mantissa + 1024, exponent - 25);
  }
  return sign ? -v : v;
}

double ValueAt(const HostArray& a, size_t i) {
  const char* p = a.data.data() + i * ElementBytes(a.dtype);
  auto load = [p](auto tag) {
    decltype(tag) v;
    std::memcpy(&v, p, sizeof(v));
    return static_cast<double>(v);
  };
  switch (a.dtype.code) {
    case kDLFloat:
      if (a.dtype.bits == 16) return HalfToDouble(static_cast<uint16_t>(load(uint16_t{})));
      return a.dtype.bits == 32 ? load(float{}) : load(double{});
    case kDLInt:
      switch (a.dtype.bits) {
        case 8: return load(int8_t{});
        case 16: return load(int16_t{});
        case 32: return load(int32_t{});
        default: return load(int64_t{});
      }
    default:  // unsigned and bool
      switch (a.dtype.bits) {
        case 1:
        case 8: return load(uint8_t{});
        case 16: return load(uint16_t{});
        case 32: return load(uint32_t{});
        default: return load(uint64_t{});
      }
  }
}

struct Comparison {
  bool ok = true;
  double max_abs_error = 0;
  double scale = 0;  // max |expected| over finite values
  size_t bad = 0;
  size_t worst = 0;  // index of the largest violation
  std::string problem;  // shape or dtype mismatch
};

Comparison Compare(const HostArray& got, const HostArray& expected, double rtol, double atol) {
  Comparison c;
  bool got_bool = IsBool(got.dtype), exp_bool = IsBool(expected.dtype);
  if (got.shape != expected.shape) {
    c.ok = false;
    c.problem = "shape " + ShapeText(got.shape) + ", expected " + ShapeText(expected.shape);
    return c;
  }
  if (!SameType(got.dtype, expected.dtype) && !(got_bool && exp_bool)) {
    c.ok = false;
    c.problem = "dtype " + DTypeName(got.dtype) + ", expected " + DTypeName(expected.dtype);
    return c;
  }
  const bool exact = got.dtype.code != kDLFloat;
  const size_t n = static_cast<size_t>(NumElements(got.shape));
  for (size_t i = 0; i < n; ++i) {
    double e = ValueAt(expected, i);
    if (std::isfinite(e)) c.scale = std::max(c.scale, std::fabs(e));
  }
  double worst_excess = -1;
  for (size_t i = 0; i < n; ++i) {
    double a = ValueAt(got, i), e = ValueAt(expected, i);
    bool good;
    double excess = 0;
    if (std::isnan(a) || std::isnan(e)) {
      good = std::isnan(a) && std::isnan(e);
      excess = std::numeric_limits<double>::infinity();
    } else if (std::isinf(a) || std::isinf(e)) {
      good = a == e;
      excess = std::numeric_limits<double>::infinity();
    } else {
      double err = std::fabs(a - e);
      c.max_abs_error = std::max(c.max_abs_error, err);
      double bound = exact ? 0.0 : atol * c.scale + rtol * std::fabs(e);
      good = err <= bound;
      excess = err - bound;
    }
    if (!good) {
      ++c.bad;
      if (excess > worst_excess) {
        worst_excess = excess;
        c.worst = i;
      }
    }
  }
  c.ok = c.bad == 0;
  return c;
}

std::string FormatDouble(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.3g", v);
  return buf;
}

// ------------------------------------------------------------------------------------------
// The model: load, check inputs, run, collect outputs.

Tensor ToDevice(const HostArray& array) {
  Tensor t = Tensor::Empty(ffi::Shape(array.shape), array.dtype, DLDevice{kDLCPU, 0});
  if (!array.data.empty()) t.CopyFromBytes(array.data.data(), array.data.size());
  return t;
}

HostArray ToHost(const Tensor& t) {
  HostArray a;
  a.dtype = t->dtype;
  a.shape.assign(t->shape, t->shape + t->ndim);
  a.data.resize(static_cast<size_t>(NumElements(a.shape)) * ElementBytes(a.dtype));
  if (!a.data.empty()) t.CopyToBytes(a.data.data(), a.data.size());
  return a;
}

template <typename T>
HostArray Scalar(T value, DLDataType dtype, std::vector<int64_t> shape = {}) {
  HostArray a;
  a.dtype = dtype;
  a.shape = std::move(shape);
  a.data.resize(sizeof(T));
  std::memcpy(a.data.data(), &value, sizeof(T));
  return a;
}

/*! \brief Outputs of main in order: nested tuples depth-first; tensors, shapes and scalars. */
void Flatten(const ffi::Any& value, std::vector<HostArray>* out) {
  if (auto arr = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *arr) Flatten(item, out);
  } else if (auto tensor = value.as<Tensor>()) {
    out->push_back(ToHost(*tensor));
  } else if (auto shape = value.as<ffi::Shape>()) {
    HostArray a;
    a.dtype = DLDataType{kDLInt, 64, 1};
    a.shape = {static_cast<int64_t>(shape->size())};
    a.data.resize(shape->size() * sizeof(int64_t));
    if (shape->size()) std::memcpy(a.data.data(), shape->data(), a.data.size());
    out->push_back(std::move(a));
  } else if (auto b = value.as<bool>()) {
    out->push_back(Scalar<uint8_t>(*b ? 1 : 0, DLDataType{kDLBool, 8, 1}));
  } else if (auto i = value.as<int64_t>()) {
    out->push_back(Scalar<int64_t>(*i, DLDataType{kDLInt, 64, 1}));
  } else if (auto f = value.as<double>()) {
    out->push_back(Scalar<double>(*f, DLDataType{kDLFloat, 64, 1}));
  } else {
    throw Failure("main returned a " + std::string(value.GetTypeKey()) +
                  ", which fxopt-run cannot write as .npy");
  }
}

struct InputSpec {
  std::string name;
  std::optional<std::vector<std::optional<int64_t>>> shape;  // nullopt: unknown
  std::string dtype;                                          // "" unknown
};

/*!
 * \brief Input names, shapes and dtypes the model declares: from the VM (names, count) and, for
 *  libraries built by fxopt, from their `fxopt_signature` function (a JSON document).
 */
std::vector<InputSpec> InputSpecs(const ffi::Module& vm) {
  std::vector<InputSpec> specs;
  auto arity = vm->GetFunction("get_function_arity");
  auto param_name = vm->GetFunction("get_function_param_name");
  if (!arity || !param_name) return specs;
  int64_t n = (*arity)("main").cast<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    specs.push_back({(*param_name)("main", i).cast<ffi::String>(), std::nullopt, ""});
  }
  auto signature = vm->GetFunction("fxopt_signature");
  if (!signature) return specs;
  try {
    ffi::Any value = (*signature)();
    if (auto arr = value.as<ffi::Array<ffi::Any>>()) {
      if (arr->size() == 1) value = (*arr)[0];
    }
    auto tensor = value.as<Tensor>();
    if (!tensor) return specs;
    HostArray bytes = ToHost(*tensor);
    ffi::Any doc = ffi::json::Parse(ffi::String(bytes.data.data(), bytes.data.size()));
    auto inputs =
        doc.cast<ffi::Map<ffi::Any, ffi::Any>>().at("inputs").cast<ffi::Array<ffi::Any>>();
    if (static_cast<int64_t>(inputs.size()) != n) return specs;
    for (int64_t i = 0; i < n; ++i) {
      auto item = inputs[i].cast<ffi::Map<ffi::Any, ffi::Any>>();
      if (auto dtype = item.Get("dtype")) specs[i].dtype = dtype->cast<ffi::String>();
      if (specs[i].dtype == "tuple") specs[i].dtype.clear();  // not an .npy input anyway
      if (auto name = item.Get("name")) specs[i].name = name->cast<ffi::String>();
      if (auto dims = item.Get("shape"); dims && dims->as<ffi::Array<ffi::Any>>()) {
        std::vector<std::optional<int64_t>> shape;
        for (const ffi::Any& d : dims->cast<ffi::Array<ffi::Any>>()) {
          if (auto v = d.as<int64_t>()) {
            shape.push_back(*v);
          } else {
            shape.push_back(std::nullopt);
          }
        }
        specs[i].shape = std::move(shape);
      }
    }
  } catch (const std::exception&) {
    // A signature this runner does not understand: the VM still checks the inputs itself.
  }
  return specs;
}

void CheckInputs(const std::vector<InputSpec>& specs, const std::vector<HostArray>& inputs,
                 const std::vector<std::string>& files, const std::string& model) {
  if (specs.empty()) return;
  if (specs.size() != inputs.size()) {
    std::string names;
    for (const InputSpec& s : specs) names += (names.empty() ? "" : ", ") + s.name;
    throw Failure(BaseName(model) + " takes " + std::to_string(specs.size()) + " input" +
                  (specs.size() == 1 ? "" : "s") + " (" + names + "), got " +
                  std::to_string(inputs.size()));
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    const InputSpec& s = specs[i];
    const HostArray& a = inputs[i];
    bool shape_ok = !s.shape || s.shape->size() == a.shape.size();
    for (size_t d = 0; shape_ok && s.shape && d < a.shape.size(); ++d) {
      shape_ok = !(*s.shape)[d] || *(*s.shape)[d] == a.shape[d];
    }
    bool dtype_ok = s.dtype.empty() || s.dtype == DTypeName(a.dtype);
    if (shape_ok && dtype_ok) continue;
    std::string want;
    if (s.shape) {
      want = "[";
      for (size_t d = 0; d < s.shape->size(); ++d) {
        want += (d ? ", " : "") + ((*s.shape)[d] ? std::to_string(*(*s.shape)[d]) : "?");
      }
      want += "]";
    }
    throw Failure("input " + std::to_string(i) + " (" + s.name + "): " + files[i] + " is " +
                  DTypeName(a.dtype) + " " + ShapeText(a.shape) + ", the model expects " +
                  (s.dtype.empty() ? "" : s.dtype + " ") + want);
  }
}

// ------------------------------------------------------------------------------------------
// Command line

const char kUsage[] =
    "usage: fxopt-run MODEL.so --input A.npy [--input B.npy ...] [--output-dir DIR] [--warmup W]\n"
    "                 [--repeat N]\n"
    "       fxopt-run MODEL.so --check BUILD_DIR [--rtol R] [--atol A] [--output-dir DIR] "
    "[--repeat N]\n"
    "\n"
    "Runs the model library MODEL.so (TVM Relax VM, CPU) on .npy inputs.\n"
    "  --input FILE       an input, in the order of the model's parameters (repeat it)\n"
    "  --output-dir DIR   write the outputs there as output_0.npy, output_1.npy ...\n"
    "                     (default: the current directory; with --check: not written)\n"
    "  --warmup W         after the first run, run W more times untimed\n"
    "  --repeat N         then time N more runs; print median and min\n"
    "  --check BUILD_DIR  inputs BUILD_DIR/input_<i>.npy; compare the outputs with\n"
    "                     BUILD_DIR/expected_output_<i>.npy: |a-e| <= atol*max|e| + rtol*|e|\n"
    "  --rtol R, --atol A tolerances of --check (default 1e-4 each)\n"
    "Exit status: 0 ok, 1 the check does not match, 2 an error.\n";

struct Options {
  std::string model;
  std::vector<std::string> inputs;
  std::string output_dir;
  bool output_dir_given = false;
  std::string check_dir;
  int repeat = 0;
  int warmup = 0;
  double rtol = 1e-4;
  double atol = 1e-4;
};

double ParseNumber(const std::string& option, const std::string& text) {
  char* stop = nullptr;
  errno = 0;
  double v = std::strtod(text.c_str(), &stop);
  if (text.empty() || *stop != '\0' || errno != 0 || !(v >= 0)) {
    throw Failure(option + " needs a non-negative number, got '" + text + "'");
  }
  return v;
}

Options ParseArgs(int argc, char** argv) {
  Options opt;
  bool help = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i], value;
    bool has_value = false;
    if (arg.rfind("--", 0) == 0 && arg.find('=') != std::string::npos) {
      value = arg.substr(arg.find('=') + 1);
      arg = arg.substr(0, arg.find('='));
      has_value = true;
    }
    auto take = [&]() -> std::string {
      if (has_value) return value;
      if (i + 1 >= argc) throw Failure(arg + " needs a value (see fxopt-run --help)");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      help = true;
    } else if (arg == "--input") {
      opt.inputs.push_back(take());
    } else if (arg == "--output-dir") {
      opt.output_dir = take();
      opt.output_dir_given = true;
    } else if (arg == "--check") {
      opt.check_dir = take();
    } else if (arg == "--repeat" || arg == "--warmup") {
      std::string option = arg, text = take();
      double v = ParseNumber(option, text);
      if (v != std::floor(v) || v > 1e9) {
        throw Failure(option + " needs a count, got '" + text + "'");
      }
      (option == "--repeat" ? opt.repeat : opt.warmup) = static_cast<int>(v);
    } else if (arg == "--rtol") {
      opt.rtol = ParseNumber("--rtol", take());
    } else if (arg == "--atol") {
      opt.atol = ParseNumber("--atol", take());
    } else if (arg.size() > 1 && arg[0] == '-') {
      throw Failure("unknown option " + arg + " (see fxopt-run --help)");
    } else if (opt.model.empty()) {
      opt.model = arg;
    } else {
      throw Failure("unexpected argument '" + arg + "': give the inputs with --input FILE");
    }
  }
  if (help) {
    std::fputs(kUsage, stdout);
    std::exit(kExitOk);
  }
  if (opt.model.empty()) throw Failure("no model library given (see fxopt-run --help)");
  if (!opt.check_dir.empty() && !opt.inputs.empty()) {
    throw Failure(
        "--check reads the inputs from BUILD_DIR/input_<i>.npy; do not also give --input");
  }
  if (opt.check_dir.empty() && opt.inputs.empty()) {
    throw Failure("no inputs: give --input FILE for each model input, or --check BUILD_DIR");
  }
  if (!opt.output_dir_given && opt.check_dir.empty()) opt.output_dir = ".";
  return opt;
}

void MakeDirs(const std::string& dir) {
  std::string prefix;
  std::stringstream parts(dir);
  std::string part;
  if (!dir.empty() && dir[0] == '/') prefix = "/";
  while (std::getline(parts, part, '/')) {
    if (part.empty()) continue;
    prefix += part + "/";
    if (::mkdir(prefix.c_str(), 0777) != 0 && errno != EEXIST) {
      throw Failure("cannot create " + dir + ": " + std::strerror(errno));
    }
  }
}

/*! \brief BUILD_DIR/<stem>0.npy, <stem>1.npy ... while they exist. */
std::vector<std::string> NumberedFiles(const std::string& dir, const std::string& stem) {
  std::vector<std::string> files;
  for (int i = 0;; ++i) {
    std::string path = JoinPath(dir, stem + std::to_string(i) + ".npy");
    if (!FileExists(path)) break;
    files.push_back(path);
  }
  return files;
}

double Ms(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

int Run(const Options& opt) {
  // Inputs first: a missing file is reported before the model is loaded.
  std::vector<std::string> input_files = opt.inputs;
  std::vector<std::string> expected_files;
  if (!opt.check_dir.empty()) {
    struct stat st;
    if (::stat(opt.check_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
      throw Failure("--check " + opt.check_dir + ": no such build directory");
    }
    input_files = NumberedFiles(opt.check_dir, "input_");
    expected_files = NumberedFiles(opt.check_dir, "expected_output_");
    if (input_files.empty()) throw Failure(opt.check_dir + " has no input_0.npy");
    if (expected_files.empty()) throw Failure(opt.check_dir + " has no expected_output_0.npy");
  }
  std::vector<HostArray> inputs;
  for (const std::string& f : input_files) inputs.push_back(ReadNpy(f));

  // The model, after checking that it is for this machine.
  std::string riscv_arch;
  CheckModelMachine(opt.model, &riscv_arch);
  // dlopen searches the library path for a name without '/': make it a path.
  std::string model = opt.model.find('/') == std::string::npos ? "./" + opt.model : opt.model;
  auto t0 = std::chrono::steady_clock::now();
  ffi::Module lib = [&]() {
    try {
      return ffi::Module::LoadFromFile(model);
    } catch (const ffi::Error& e) {
      throw Failure("cannot load " + opt.model + ": " + OneLine(e.message()));
    }
  }();
  auto load_exec = lib->GetFunction("vm_load_executable");
  if (!load_exec) {
    throw Failure(opt.model + " has no Relax VM executable (vm_load_executable); give a library "
                  "compiled with tvm.compile / fxopt for a CPU target");
  }
  ffi::Module vm = (*load_exec)().cast<ffi::Module>();
  const int kPooledAllocator = 2;  // tvm::runtime::memory::AllocatorType::kPooled
  // (device type, id, allocator) of the device, then of the host: both the CPU here.
  (*vm->GetFunction("vm_initialization"))(static_cast<int>(kDLCPU), 0, kPooledAllocator,
                                          static_cast<int>(kDLCPU), 0, kPooledAllocator);
  auto main_func = vm->GetFunction("main");
  if (!main_func) throw Failure(opt.model + " has no function 'main'");
  ffi::Function fmain = main_func.value();
  auto t1 = std::chrono::steady_clock::now();
  CheckInputs(InputSpecs(vm), inputs, input_files, opt.model);

  std::vector<Tensor> tensors;
  for (const HostArray& a : inputs) tensors.push_back(ToDevice(a));
  std::vector<ffi::AnyView> args(tensors.begin(), tensors.end());
  auto call = [&]() {
    ffi::Any rv;
    try {
      fmain.CallPacked(ffi::PackedArgs(args.data(), static_cast<int>(args.size())), &rv);
    } catch (const ffi::Error& e) {
      throw Failure("main failed: " + std::string(e.kind()) + ": " + OneLine(e.message()));
    }
    return rv;
  };

  InstallSigillMessage(model, riscv_arch);
  auto t2 = std::chrono::steady_clock::now();
  ffi::Any result = call();
  auto t3 = std::chrono::steady_clock::now();
  std::vector<HostArray> outputs;
  Flatten(result, &outputs);
  result = ffi::Any();

  for (int i = 0; i < opt.warmup; ++i) call();
  std::vector<double> times;
  for (int i = 0; i < opt.repeat; ++i) {
    ffi::Any rv;
    auto a = std::chrono::steady_clock::now();
    Mark(kMarkOpen);
    rv = call();
    Mark(kMarkClose);
    auto b = std::chrono::steady_clock::now();
    times.push_back(Ms(a, b));
  }

  std::printf("model: %s (%s), %zu input%s, %zu output%s, load %.4g ms, first run %.4g ms\n",
              opt.model.c_str(), MachineName(kSelfMachine, kSelfClass).c_str(), inputs.size(),
              inputs.size() == 1 ? "" : "s", outputs.size(), outputs.size() == 1 ? "" : "s",
              Ms(t0, t1), Ms(t2, t3));
  if (!times.empty()) {
    std::vector<double> sorted = times;
    std::sort(sorted.begin(), sorted.end());
    size_t n = sorted.size();
    double median = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
    std::printf("time: median %.4g ms, min %.4g ms over %zu runs\n", median, sorted[0], n);
  }
  if (!opt.output_dir.empty()) {
    MakeDirs(opt.output_dir);
    for (size_t i = 0; i < outputs.size(); ++i) {
      std::string path = JoinPath(opt.output_dir, "output_" + std::to_string(i) + ".npy");
      WriteNpy(path, outputs[i]);
      std::printf("output_%zu: %s %s -> %s\n", i, DTypeName(outputs[i].dtype).c_str(),
                  ShapeText(outputs[i].shape).c_str(), path.c_str());
    }
  } else {
    for (size_t i = 0; i < outputs.size(); ++i) {
      std::printf("output_%zu: %s %s\n", i, DTypeName(outputs[i].dtype).c_str(),
                  ShapeText(outputs[i].shape).c_str());
    }
  }
  if (opt.check_dir.empty()) return kExitOk;

  bool all_ok = true;
  if (expected_files.size() != outputs.size()) {
    std::printf("check: MISMATCH: the model returned %zu output%s, %s has %zu "
                "expected_output_<i>.npy\n",
                outputs.size(), outputs.size() == 1 ? "" : "s", opt.check_dir.c_str(),
                expected_files.size());
    return kExitMismatch;
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    HostArray expected = ReadNpy(expected_files[i]);
    Comparison c = Compare(outputs[i], expected, opt.rtol, opt.atol);
    all_ok = all_ok && c.ok;
    if (!c.problem.empty()) {
      std::printf("check output_%zu: MISMATCH: %s\n", i, c.problem.c_str());
      continue;
    }
    double rel = c.scale > 0 ? c.max_abs_error / c.scale : c.max_abs_error;
    std::printf("check output_%zu: max abs error %s, max error / output scale %s",
                i, FormatDouble(c.max_abs_error).c_str(), FormatDouble(rel).c_str());
    if (c.ok) {
      std::printf(": ok\n");
    } else {
      std::printf(": MISMATCH: %zu of %lld values out of tolerance (worst at flat index %zu: "
                  "got %s, expected %s)\n",
                  c.bad, static_cast<long long>(NumElements(outputs[i].shape)), c.worst,
                  FormatDouble(ValueAt(outputs[i], c.worst)).c_str(),
                  FormatDouble(ValueAt(expected, c.worst)).c_str());
    }
  }
  std::printf("check: %s (rtol %s, atol %s)\n", all_ok ? "ok" : "MISMATCH",
              FormatDouble(opt.rtol).c_str(), FormatDouble(opt.atol).c_str());
  return all_ok ? kExitOk : kExitMismatch;
}

}  // namespace

int main(int argc, char** argv) {
  // TVM's thread pool defaults to half the hardware threads on x86 (it assumes SMT): one thread
  // on a 2-core machine. Use every core unless the user said otherwise.
  if (std::getenv("TVM_NUM_THREADS") == nullptr) {
    unsigned cores = std::thread::hardware_concurrency();
    if (cores > 0) setenv("TVM_NUM_THREADS", std::to_string(cores).c_str(), 0);
  }
  try {
    return Run(ParseArgs(argc, argv));
  } catch (const ffi::Error& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "fxopt-run: error: %s: %s\n", std::string(e.kind()).c_str(),
                 OneLine(e.message()).c_str());
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "fxopt-run: error: %s\n", OneLine(e.what()).c_str());
  }
  return kExitError;
}
