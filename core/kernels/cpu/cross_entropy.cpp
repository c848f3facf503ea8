// Cross-entropy over rows of logits on the CPU: one read for the row's max and sum of
// exponentials together (the running sum rescaled when the max grows), one pass writing the
// gradient in place; fp32 math in 8-wide vectors (Sleef's exp), converted from and to bf16.
#include "core/kernels/cpu/cpu_kernels.h"
#include "core/kernels/cpu/vec_util.h"

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace moeforge::kernels::cpu {

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVocabBlock = 512;  // fp32 elements per block, on the stack

float vec_max(const Vec& v) { return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, v); }
float vec_sum(const Vec& v) { return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, v); }

// log(sum(exp(row))) in one read.
template <typename T>
float logsumexp(const T* row, int64_t V) {
  alignas(64) float buffer[kVocabBlock];
  float m = -std::numeric_limits<float>::infinity(), s = 0.0f;
  for (int64_t at = 0; at < V; at += kVocabBlock) {
    const int64_t n = std::min(kVocabBlock, V - at);
    const float* x = as_float(row + at, buffer, n);
    float bm = -std::numeric_limits<float>::infinity();
    int64_t i = 0;
    if (n >= Vec::size()) {
      Vec mv = Vec::loadu(x);
      for (i = Vec::size(); i + Vec::size() <= n; i += Vec::size()) mv = at::vec::maximum(mv, Vec::loadu(x + i));
      bm = vec_max(mv);
    }
    for (; i < n; ++i) bm = std::max(bm, x[i]);
    if (bm > m) {
      s *= std::exp(m - bm);
      m = bm;
    }
    Vec sv(0.0f);
    const Vec mv(m);
    for (i = 0; i + Vec::size() <= n; i += Vec::size()) sv = sv + (Vec::loadu(x + i) - mv).exp();
    s += vec_sum(sv);
    for (; i < n; ++i) s += std::exp(x[i] - m);
  }
  return m + std::log(s);
}

}  // namespace

template <typename T>
void cross_entropy_rows(T* logits, int64_t V, const int64_t* labels, const float* scale, float* loss, bool grad,
                        int64_t begin, int64_t end) {
  alignas(64) float buffer[kVocabBlock], out[kVocabBlock];
  for (int64_t r = begin; r < end; ++r) {
    T* row = logits + r * V;
    const int64_t label = labels[r];
    const float lse = logsumexp(row, V);
    loss[r] = label >= 0 && label < V ? lse - static_cast<float>(row[label]) : std::numeric_limits<float>::quiet_NaN();
    if (!grad) continue;
    const Vec lv(lse), sv(scale[r]);
    for (int64_t at = 0; at < V; at += kVocabBlock) {
      const int64_t n = std::min(kVocabBlock, V - at);
      const float* x = as_float(row + at, buffer, n);
      float* y = std::is_same_v<T, float> ? reinterpret_cast<float*>(row + at) : out;
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) ((Vec::loadu(x + i) - lv).exp() * sv).store(y + i);
      for (; i < n; ++i) y[i] = std::exp(x[i] - lse) * scale[r];
      if (label >= at && label < at + n) y[label - at] -= scale[r];
      if constexpr (!std::is_same_v<T, float>) at::vec::convert(out, row + at, n);
    }
  }
}

template void cross_entropy_rows<float>(float*, int64_t, const int64_t*, const float*, float*, bool, int64_t, int64_t);
template void cross_entropy_rows<c10::BFloat16>(c10::BFloat16*, int64_t, const int64_t*, const float*, float*, bool, int64_t,
                                                int64_t);

}  // namespace moeforge::kernels::cpu
