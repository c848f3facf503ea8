// defines: as_float, store_floats: what the CPU kernels share (compiled for AVX2 + FMA with them)
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace moeforge::kernels::cpu {

// n elements of src as fp32: src itself for float, else converted into buffer (n floats).
template <typename T>
const float* as_float(const T* src, float* buffer, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    (void)buffer;
    (void)n;
    return src;
  } else {
    at::vec::convert(src, buffer, n);
    return buffer;
  }
}

// n fp32 values from src into dst of type T (converted, or copied for float; src may be dst).
template <typename T>
void store_floats(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (src != dst) std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

}  // namespace moeforge::kernels::cpu
