/*
 * fxopt replacement for <tvm/support/io.h>, which the runtime sources of the apache-tvm wheel
 * include but the wheel does not ship.
 *
 * A Stream reads and writes raw bytes (the two virtual functions); the template members
 * read/write typed values through tvm::support::Serializer<T> (serializer.h). The byte layout is
 * TVM's: values little-endian, sequences as a uint64 count followed by the elements, so the
 * runtime reads executables and tensors written by the TVM compiler.
 */
#ifndef TVM_SUPPORT_IO_H_
#define TVM_SUPPORT_IO_H_

#include <tvm/ffi/endian.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace tvm {
namespace support {

class Stream;

/*! \brief How values of type T go through a Stream; specialized in serializer.h and elsewhere. */
template <typename T, typename Enable = void>
struct Serializer;

/*! \brief True for types whose serialized form is their own bytes (little-endian). */
template <typename T>
inline constexpr bool kIsRawSerialized = std::is_arithmetic_v<T> || std::is_enum_v<T>;

class Stream {
 public:
  virtual ~Stream() = default;
  /*! \brief Read up to size bytes into ptr; returns the number of bytes read. */
  virtual size_t Read(void* ptr, size_t size) = 0;
  /*! \brief Write size bytes from ptr; returns the number of bytes written. */
  virtual size_t Write(const void* ptr, size_t size) = 0;

  /*! \brief Write one value. */
  template <typename T>
  void Write(const T& value);
  /*! \brief Read one value; false when the stream ends first. */
  template <typename T>
  bool Read(T* out);
  /*! \brief Write n values, with no count in front. */
  template <typename T>
  void WriteArray(const T* data, size_t n);
  /*! \brief Read n values written by WriteArray; false when the stream ends first. */
  template <typename T>
  bool ReadArray(T* data, size_t n);
};

}  // namespace support
}  // namespace tvm

#include <tvm/support/serializer.h>

namespace tvm {
namespace support {

template <typename T>
inline void Stream::Write(const T& value) {
  static_assert(Serializer<T>::enabled, "tvm::support::Serializer has no case for this type");
  Serializer<T>::Write(this, value);
}

template <typename T>
inline bool Stream::Read(T* out) {
  static_assert(Serializer<T>::enabled, "tvm::support::Serializer has no case for this type");
  return Serializer<T>::Read(this, out);
}

template <typename T>
inline void Stream::WriteArray(const T* data, size_t n) {
  if constexpr (kIsRawSerialized<T> && TVM_FFI_IO_NO_ENDIAN_SWAP) {
    if (n != 0) Write(static_cast<const void*>(data), n * sizeof(T));
  } else {
    for (size_t i = 0; i < n; ++i) Write(data[i]);
  }
}

template <typename T>
inline bool Stream::ReadArray(T* data, size_t n) {
  if constexpr (kIsRawSerialized<T> && TVM_FFI_IO_NO_ENDIAN_SWAP) {
    return n == 0 || Read(static_cast<void*>(data), n * sizeof(T)) == n * sizeof(T);
  } else {
    for (size_t i = 0; i < n; ++i) {
      if (!Read(&data[i])) return false;
    }
    return true;
  }
}

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_IO_H_
