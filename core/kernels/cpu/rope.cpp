// Half-split RoPE on the CPU: each row's two halves rotated by the row's angles, in fp32.
#include "core/kernels/cpu/cpu_kernels.h"

#include <ATen/cpu/vec/vec.h>

#include <type_traits>
#include <vector>

namespace moeforge::kernels::cpu {

namespace {

using Vec = at::vec::Vectorized<float>;

template <typename T>
void apply(const T* x, const T* cos, const T* sin, T* out, int64_t H, int64_t Dh, float sign, int64_t begin, int64_t end) {
  const int64_t half = Dh / 2;
  std::vector<float> xb(static_cast<size_t>(Dh)), cb(static_cast<size_t>(Dh)), sb(static_cast<size_t>(Dh)),
      ob(static_cast<size_t>(Dh));
  for (int64_t row = begin; row < end; ++row) {
    const int64_t pos = row / H;  // the token: its angles
    const float *xf, *cf, *sf;
    float* of;
    if constexpr (std::is_same_v<T, float>) {
      xf = x + row * Dh;
      cf = cos + pos * Dh;
      sf = sin + pos * Dh;
      of = out + row * Dh;
    } else {
      at::vec::convert(x + row * Dh, xb.data(), Dh);
      at::vec::convert(cos + pos * Dh, cb.data(), Dh);
      at::vec::convert(sin + pos * Dh, sb.data(), Dh);
      xf = xb.data(), cf = cb.data(), sf = sb.data(), of = ob.data();
    }
    // out[i] = x[i] cos[i] - s x[i+h] sin[i], out[i+h] = x[i+h] cos[i+h] + s x[i] sin[i+h].
    const Vec vs(sign);
    int64_t i = 0;
    for (; i + Vec::size() <= half; i += Vec::size()) {
      const Vec x1 = Vec::loadu(xf + i), x2 = Vec::loadu(xf + half + i);
      (x1 * Vec::loadu(cf + i) - vs * x2 * Vec::loadu(sf + i)).store(of + i);
      (x2 * Vec::loadu(cf + half + i) + vs * x1 * Vec::loadu(sf + half + i)).store(of + half + i);
    }
    for (; i < half; ++i) {
      const float x1 = xf[i], x2 = xf[half + i];
      of[i] = x1 * cf[i] - sign * x2 * sf[i];
      of[half + i] = x2 * cf[half + i] + sign * x1 * sf[half + i];
    }
    if constexpr (!std::is_same_v<T, float>) at::vec::convert(ob.data(), out + row * Dh, Dh);
  }
}

}  // namespace

void rope(const float* x, const float* c, const float* s, float* o, int64_t H, int64_t Dh, float sign, int64_t b, int64_t e) {
  apply(x, c, s, o, H, Dh, sign, b, e);
}
void rope(const c10::BFloat16* x, const c10::BFloat16* c, const c10::BFloat16* s, c10::BFloat16* o, int64_t H, int64_t Dh,
          float sign, int64_t b, int64_t e) {
  apply(x, c, s, o, H, Dh, sign, b, e);
}

}  // namespace moeforge::kernels::cpu
