// AdamW on the CPU: 8-wide vectors, the same fused multiply-adds in the scalar tail, so every
// element gets the same bits wherever its tensor is cut.
#include "core/kernels/cpu/cpu_kernels.h"

#include <ATen/cpu/vec/vec.h>

#include <cmath>

namespace moeforge::kernels::cpu {

namespace {

using Vec = at::vec::Vectorized<float>;

inline float fmadd(float a, float b, float c) { return std::fma(a, b, c); }
inline Vec fmadd(const Vec& a, const Vec& b, const Vec& c) { return at::vec::fmadd(a, b, c); }
inline float sqrt_of(float x) { return std::sqrt(x); }
inline Vec sqrt_of(const Vec& x) { return x.sqrt(); }

// One element (or vector of them): returns the new w; m and v updated in place.
template <typename V>
inline V update(V w, V g, V& m, V& v, const AdamWScalars& s) {
  w = w * V(s.decay_factor);
  m = fmadd(V(s.one_minus_beta1), g - m, m);
  v = fmadd(V(s.one_minus_beta2) * g, g, v * V(s.beta2));
  const V denom = sqrt_of(v) / V(s.bias2_sqrt) + V(s.eps);
  return fmadd(V(s.step_size), m / denom, w);
}

}  // namespace

void adamw(float* w, const float* g, float* m, float* v, c10::BFloat16* copy, int64_t n, const AdamWScalars& s) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec mv = Vec::loadu(m + i), vv = Vec::loadu(v + i);
    const Vec wv = update(Vec::loadu(w + i), Vec::loadu(g + i), mv, vv, s);
    wv.store(w + i);
    mv.store(m + i);
    vv.store(v + i);
    if (copy) at::vec::convert(w + i, copy + i, Vec::size());
  }
  for (; i < n; ++i) {
    w[i] = update(w[i], g[i], m[i], v[i], s);
    if (copy) copy[i] = c10::BFloat16(w[i]);
  }
}

}  // namespace moeforge::kernels::cpu
