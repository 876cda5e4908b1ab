/*
 * fxopt replacement for TVM's src/support/base64.h (not shipped in the apache-tvm wheel):
 * Streams that encode to / decode from base64 (RFC 4648 alphabet, '=' padding) on top of
 * another Stream. The runtime uses them for tensors inside JSON.
 */
#ifndef TVM_SUPPORT_BASE64_H_
#define TVM_SUPPORT_BASE64_H_

#include <tvm/ffi/error.h>
#include <tvm/support/io.h>

#include <cctype>
#include <cstdint>
#include <string>

namespace tvm {
namespace support {

namespace base64 {
inline constexpr char kAlphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/*! \brief Value of a base64 digit, or -1 for any other character. */
inline int DigitValue(int c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}
}  // namespace base64

/*! \brief Encodes what is written to it; call Finish() once at the end to flush and pad. */
class Base64OutStream : public Stream {
 public:
  using Stream::Read;
  using Stream::Write;

  explicit Base64OutStream(Stream* out) : out_(out) {}

  size_t Write(const void* ptr, size_t size) final {
    const auto* bytes = static_cast<const uint8_t*>(ptr);
    for (size_t i = 0; i < size; ++i) {
      group_[ngroup_++] = bytes[i];
      if (ngroup_ == 3) EmitGroup();
    }
    if (text_.size() >= kFlushAt) Flush();
    return size;
  }
  size_t Read(void*, size_t) final {
    TVM_FFI_THROW(InternalError) << "Base64OutStream is write-only";
    return 0;
  }
  /*! \brief Encode the last partial group with '=' padding and pass all text on. */
  void Finish() {
    if (ngroup_ != 0) EmitGroup();
    Flush();
  }

 private:
  static constexpr size_t kFlushAt = 4096;

  void EmitGroup() {
    uint32_t v = 0;
    for (int i = 0; i < 3; ++i) v = (v << 8) | (i < ngroup_ ? group_[i] : 0);
    for (int i = 0; i < 4; ++i) {
      text_.push_back(i <= ngroup_ ? base64::kAlphabet[(v >> (18 - 6 * i)) & 63] : '=');
    }
    ngroup_ = 0;
  }
  void Flush() {
    if (!text_.empty()) out_->Write(static_cast<const void*>(text_.data()), text_.size());
    text_.clear();
  }

  Stream* out_;
  uint8_t group_[3] = {0, 0, 0};
  int ngroup_ = 0;
  std::string text_;
};

/*!
 * \brief Decodes base64 text read from another stream. Call InitPosition() first (it skips
 *  leading white space); decoding stops at '=' padding, the end of the input, or any character
 *  that is neither a base64 digit nor white space.
 */
class Base64InStream : public Stream {
 public:
  using Stream::Read;
  using Stream::Write;

  explicit Base64InStream(Stream* in) : in_(in) {}

  void InitPosition() {
    int c;
    while ((c = PeekChar()) != kEnd && std::isspace(c)) ++text_pos_;
  }

  size_t Read(void* ptr, size_t size) final {
    auto* out = static_cast<uint8_t*>(ptr);
    size_t n = 0;
    while (n < size) {
      if (pos_ == nbytes_ && !DecodeGroup()) break;
      out[n++] = bytes_[pos_++];
    }
    return n;
  }
  size_t Write(const void*, size_t) final {
    TVM_FFI_THROW(InternalError) << "Base64InStream is read-only";
    return 0;
  }

 private:
  static constexpr int kEnd = -1;

  int PeekChar() {
    if (text_pos_ == text_.size()) {
      text_.resize(4096);
      text_.resize(in_->Read(text_.data(), text_.size()));
      text_pos_ = 0;
      if (text_.empty()) return kEnd;
    }
    return static_cast<unsigned char>(text_[text_pos_]);
  }
  /*! \brief Next base64 digit's value, or -1 at the end of the encoded text. */
  int NextDigit() {
    if (done_) return -1;
    for (;;) {
      int c = PeekChar();
      if (c == kEnd) break;
      ++text_pos_;
      if (std::isspace(c)) continue;
      int v = base64::DigitValue(c);
      if (v >= 0) return v;
      break;
    }
    done_ = true;
    return -1;
  }
  bool DecodeGroup() {
    uint32_t v = 0;
    int ndigits = 0;
    for (; ndigits < 4; ++ndigits) {
      int d = NextDigit();
      if (d < 0) break;
      v = (v << 6) | static_cast<uint32_t>(d);
    }
    if (ndigits < 2) return false;  // 0 or 1 digits carry no whole byte
    v <<= 6 * (4 - ndigits);
    nbytes_ = static_cast<size_t>(ndigits - 1);
    for (size_t i = 0; i < nbytes_; ++i) bytes_[i] = static_cast<uint8_t>(v >> (16 - 8 * i));
    pos_ = 0;
    return true;
  }

  Stream* in_;
  std::string text_;
  size_t text_pos_ = 0;
  bool done_ = false;
  uint8_t bytes_[3] = {0, 0, 0};
  size_t nbytes_ = 0;
  size_t pos_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_BASE64_H_
