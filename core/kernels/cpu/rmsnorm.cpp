// RMSNorm on the CPU: a row at a time in fp32 (bf16 rows converted into a buffer), 8-wide vectors.
#include "core/kernels/cpu/cpu_kernels.h"

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace moeforge::kernels::cpu {

namespace {

using Vec = at::vec::Vectorized<float>;

template <typename T>
const float* row_as_float(const T* src, std::vector<float>& buffer, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    buffer.resize(static_cast<size_t>(n));
    at::vec::convert(src, buffer.data(), n);
    return buffer.data();
  }
}

float sum_of_squares(const float* x, int64_t n) {
  Vec acc(0.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec v = Vec::loadu(x + i);
    acc = at::vec::fmadd(v, v, acc);
  }
  float s = at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, acc);
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

template <typename T>
void forward(const T* x, const T* w, T* y, float* r, int64_t D, float eps, int64_t begin, int64_t end) {
  std::vector<float> xb, wb, yb(std::is_same_v<T, float> ? 0 : static_cast<size_t>(D));
  const float* wf = row_as_float(w, wb, D);
  for (int64_t row = begin; row < end; ++row) {
    const float* xf = row_as_float(x + row * D, xb, D);
    const float rr = 1.0f / std::sqrt(sum_of_squares(xf, D) / static_cast<float>(D) + eps);
    r[row] = rr;
    if constexpr (std::is_same_v<T, float>) {
      float* out = y + row * D;
      int64_t i = 0;
      for (; i + Vec::size() <= D; i += Vec::size()) (Vec::loadu(wf + i) * (Vec::loadu(xf + i) * Vec(rr))).store(out + i);
      for (; i < D; ++i) out[i] = wf[i] * (xf[i] * rr);
    } else {
      // The reference rounds the normalized row to bf16, then multiplies by the weight in bf16.
      for (int64_t i = 0; i < D; ++i) {
        yb[static_cast<size_t>(i)] = wf[i] * static_cast<float>(c10::BFloat16(xf[i] * rr));
      }
      at::vec::convert(yb.data(), y + row * D, D);
    }
  }
}

template <typename T>
void backward(const T* x, const T* w, const float* r, const T* dy, T* dx, float* dw_acc, int64_t D, int64_t begin,
              int64_t end) {
  std::vector<float> xb, wb, db, dxb(static_cast<size_t>(D));
  const float* wf = row_as_float(w, wb, D);
  const float inv_d = 1.0f / static_cast<float>(D);
  for (int64_t row = begin; row < end; ++row) {
    const float* xf = row_as_float(x + row * D, xb, D);
    const float* df = row_as_float(dy + row * D, db, D);
    const float rr = r[row];
    // n = x r, dn = dy w: dx = r (dn - n mean(dn n)), dw += dy n.
    Vec acc(0.0f);
    int64_t i = 0;
    for (; i + Vec::size() <= D; i += Vec::size()) {
      const Vec n = Vec::loadu(xf + i) * Vec(rr), dn = Vec::loadu(df + i) * Vec::loadu(wf + i);
      acc = at::vec::fmadd(dn, n, acc);
      (Vec::loadu(dw_acc + i) + Vec::loadu(df + i) * n).store(dw_acc + i);
    }
    float dot = at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, acc);
    for (; i < D; ++i) {
      const float n = xf[i] * rr;
      dot += df[i] * wf[i] * n;
      dw_acc[i] += df[i] * n;
    }
    const float c = dot * inv_d;
    float* out = std::is_same_v<T, float> ? reinterpret_cast<float*>(dx + row * D) : dxb.data();
    i = 0;
    for (; i + Vec::size() <= D; i += Vec::size()) {
      const Vec n = Vec::loadu(xf + i) * Vec(rr), dn = Vec::loadu(df + i) * Vec::loadu(wf + i);
      (Vec(rr) * (dn - n * Vec(c))).store(out + i);
    }
    for (; i < D; ++i) out[i] = rr * (df[i] * wf[i] - xf[i] * rr * c);
    if constexpr (!std::is_same_v<T, float>) at::vec::convert(dxb.data(), dx + row * D, D);
  }
}

}  // namespace

void rmsnorm_forward(const float* x, const float* w, float* y, float* r, int64_t D, float eps, int64_t b, int64_t e) {
  forward(x, w, y, r, D, eps, b, e);
}
void rmsnorm_forward(const c10::BFloat16* x, const c10::BFloat16* w, c10::BFloat16* y, float* r, int64_t D, float eps,
                     int64_t b, int64_t e) {
  forward(x, w, y, r, D, eps, b, e);
}
void rmsnorm_backward(const float* x, const float* w, const float* r, const float* dy, float* dx, float* dw, int64_t D,
                      int64_t b, int64_t e) {
  backward(x, w, r, dy, dx, dw, D, b, e);
}
void rmsnorm_backward(const c10::BFloat16* x, const c10::BFloat16* w, const float* r, const c10::BFloat16* dy,
                      c10::BFloat16* dx, float* dw, int64_t D, int64_t b, int64_t e) {
  backward(x, w, r, dy, dx, dw, D, b, e);
}

}  // namespace moeforge::kernels::cpu
