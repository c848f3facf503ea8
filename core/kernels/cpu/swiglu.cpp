// SwiGLU on the CPU: blocks of a row converted to fp32 (a no-op for fp32), the math in 8-wide
// fp32 vectors (Sleef's exp, 1 ulp), converted back.
#include "core/kernels/cpu/cpu_kernels.h"
#include "core/kernels/cpu/vec_util.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace moeforge::kernels::cpu {

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kWidthBlock = 256;  // fp32 elements per block, on the stack

inline Vec sigmoid(const Vec& x) { return Vec(1.0f) / (Vec(1.0f) + x.neg().exp()); }
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

template <typename T>
void forward(const T* gate, const T* up, int64_t ld, T* y, int64_t F, int64_t begin, int64_t end) {
  alignas(64) float gb[kWidthBlock], ub[kWidthBlock], yb[kWidthBlock];
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t at = 0; at < F; at += kWidthBlock) {
      const int64_t n = std::min(kWidthBlock, F - at);
      const float* g = as_float(gate + r * ld + at, gb, n);
      const float* u = as_float(up + r * ld + at, ub, n);
      float* out = std::is_same_v<T, float> ? reinterpret_cast<float*>(y + r * F + at) : yb;
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) {
        const Vec gv = Vec::loadu(g + i);
        (gv * sigmoid(gv) * Vec::loadu(u + i)).store(out + i);
      }
      for (; i < n; ++i) out[i] = g[i] * sigmoid(g[i]) * u[i];
      store_floats(out, y + r * F + at, n);
    }
  }
}

template <typename T>
void backward(const T* gate, const T* up, int64_t ld, const T* dy, T* d_gate, T* d_up, int64_t F, int64_t begin,
              int64_t end) {
  alignas(64) float gb[kWidthBlock], ub[kWidthBlock], db[kWidthBlock], dgb[kWidthBlock], dub[kWidthBlock];
  const Vec one(1.0f);
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t at = 0; at < F; at += kWidthBlock) {
      const int64_t n = std::min(kWidthBlock, F - at);
      const float* g = as_float(gate + r * ld + at, gb, n);
      const float* u = as_float(up + r * ld + at, ub, n);
      const float* d = as_float(dy + r * F + at, db, n);
      float* dg = std::is_same_v<T, float> ? reinterpret_cast<float*>(d_gate + r * ld + at) : dgb;
      float* du = std::is_same_v<T, float> ? reinterpret_cast<float*>(d_up + r * ld + at) : dub;
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) {
        const Vec gv = Vec::loadu(g + i), uv = Vec::loadu(u + i), dv = Vec::loadu(d + i);
        const Vec s = sigmoid(gv);
        (dv * uv * s * (one + gv * (one - s))).store(dg + i);
        (dv * gv * s).store(du + i);
      }
      for (; i < n; ++i) {
        const float s = sigmoid(g[i]);
        dg[i] = d[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
        du[i] = d[i] * g[i] * s;
      }
      store_floats(dg, d_gate + r * ld + at, n);
      store_floats(du, d_up + r * ld + at, n);
    }
  }
}

}  // namespace

void swiglu_forward(const float* g, const float* u, int64_t ld, float* y, int64_t F, int64_t b, int64_t e) {
  forward(g, u, ld, y, F, b, e);
}
void swiglu_forward(const c10::BFloat16* g, const c10::BFloat16* u, int64_t ld, c10::BFloat16* y, int64_t F, int64_t b,
                    int64_t e) {
  forward(g, u, ld, y, F, b, e);
}
void swiglu_backward(const float* g, const float* u, int64_t ld, const float* dy, float* dg, float* du, int64_t F,
                     int64_t b, int64_t e) {
  backward(g, u, ld, dy, dg, du, F, b, e);
}
void swiglu_backward(const c10::BFloat16* g, const c10::BFloat16* u, int64_t ld, const c10::BFloat16* dy,
                     c10::BFloat16* dg, c10::BFloat16* du, int64_t F, int64_t b, int64_t e) {
  backward(g, u, ld, dy, dg, du, F, b, e);
}

}  // namespace moeforge::kernels::cpu
