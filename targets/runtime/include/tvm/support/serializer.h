/*
 * fxopt replacement for <tvm/support/serializer.h> (not shipped in the apache-tvm wheel).
 *
 * Serializer<T> has static Write(Stream*, const T&) and Read(Stream*, T*) -> bool, and
 * `enabled = true`. Cases here: numbers and enums (their little-endian bytes), DLDataType,
 * DLDevice, std::string and ffi::String (uint64 length + bytes), std::vector<T> and
 * ffi::Array<T> (uint64 count + elements). The runtime adds its own cases (VMFuncInfo,
 * FunctionInfo) as explicit specializations.
 */
#ifndef TVM_SUPPORT_SERIALIZER_H_
#define TVM_SUPPORT_SERIALIZER_H_

#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/endian.h>
#include <tvm/ffi/string.h>
#include <tvm/support/io.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace tvm {
namespace support {

template <typename T, typename Enable>
struct Serializer {
  static constexpr bool enabled = false;
};

// Numbers and enums: their bytes, little-endian on the wire.
template <typename T>
struct Serializer<T, std::enable_if_t<kIsRawSerialized<T>>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const T& value) {
    if constexpr (TVM_FFI_IO_NO_ENDIAN_SWAP) {
      strm->Write(static_cast<const void*>(&value), sizeof(T));
    } else {
      T copy = value;
      ffi::ByteSwap(&copy, sizeof(T), 1);
      strm->Write(static_cast<const void*>(&copy), sizeof(T));
    }
  }
  static bool Read(Stream* strm, T* out) {
    if (strm->Read(static_cast<void*>(out), sizeof(T)) != sizeof(T)) return false;
    if constexpr (!TVM_FFI_IO_NO_ENDIAN_SWAP) ffi::ByteSwap(out, sizeof(T), 1);
    return true;
  }
};

template <>
struct Serializer<DLDataType> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const DLDataType& dtype) {
    strm->Write(dtype.code);
    strm->Write(dtype.bits);
    strm->Write(dtype.lanes);
  }
  static bool Read(Stream* strm, DLDataType* dtype) {
    return strm->Read(&dtype->code) && strm->Read(&dtype->bits) && strm->Read(&dtype->lanes);
  }
};

template <>
struct Serializer<DLDevice> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const DLDevice& dev) {
    strm->Write(static_cast<int32_t>(dev.device_type));
    strm->Write(static_cast<int32_t>(dev.device_id));
  }
  static bool Read(Stream* strm, DLDevice* dev) {
    int32_t type, id;
    if (!strm->Read(&type) || !strm->Read(&id)) return false;
    dev->device_type = static_cast<DLDeviceType>(type);
    dev->device_id = id;
    return true;
  }
};

namespace detail {
inline void WriteBytes(Stream* strm, const char* data, size_t size) {
  strm->Write(static_cast<uint64_t>(size));
  if (size != 0) strm->Write(static_cast<const void*>(data), size);
}
inline bool ReadBytes(Stream* strm, std::string* out) {
  uint64_t size;
  if (!strm->Read(&size)) return false;
  out->resize(static_cast<size_t>(size));
  return size == 0 || strm->Read(out->data(), out->size()) == out->size();
}
}  // namespace detail

template <>
struct Serializer<std::string> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::string& s) {
    detail::WriteBytes(strm, s.data(), s.size());
  }
  static bool Read(Stream* strm, std::string* s) { return detail::ReadBytes(strm, s); }
};

template <>
struct Serializer<ffi::String> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const ffi::String& s) {
    detail::WriteBytes(strm, s.data(), s.size());
  }
  static bool Read(Stream* strm, ffi::String* s) {
    std::string tmp;
    if (!detail::ReadBytes(strm, &tmp)) return false;
    *s = ffi::String(std::move(tmp));
    return true;
  }
};

template <typename T>
struct Serializer<std::vector<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const std::vector<T>& v) {
    strm->Write(static_cast<uint64_t>(v.size()));
    strm->WriteArray(v.data(), v.size());
  }
  static bool Read(Stream* strm, std::vector<T>* v) {
    uint64_t size;
    if (!strm->Read(&size)) return false;
    v->resize(static_cast<size_t>(size));
    return strm->ReadArray(v->data(), v->size());
  }
};

template <typename T>
struct Serializer<ffi::Array<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* strm, const ffi::Array<T>& a) {
    strm->Write(static_cast<uint64_t>(a.size()));
    for (const T& item : a) strm->Write(item);
  }
  static bool Read(Stream* strm, ffi::Array<T>* a) {
    uint64_t size;
    if (!strm->Read(&size)) return false;
    ffi::Array<T> items;
    for (uint64_t i = 0; i < size; ++i) {
      T item;
      if (!strm->Read(&item)) return false;
      items.push_back(std::move(item));
    }
    *a = std::move(items);
    return true;
  }
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_SERIALIZER_H_
