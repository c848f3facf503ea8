// The MoE permutation on the CPU: gathers by the sorted order, sums and dots in fp32; every output
// element is written by one task, in a fixed order (deterministic, no scatter).
#include "core/kernels/cpu/cpu_kernels.h"
#include "core/kernels/cpu/vec_util.h"

#include <ATen/cpu/vec/vec.h>

#include <cstring>
#include <type_traits>
#include <vector>

namespace moeforge::kernels::cpu {

namespace {

using Vec = at::vec::Vectorized<float>;

// out (fp32, D) += scale * row.
template <typename T>
void axpy(float scale, const T* row, float* out, int64_t D, std::vector<float>& buffer) {
  const float* r;
  if constexpr (std::is_same_v<T, float>) {
    r = row;
  } else {
    buffer.resize(static_cast<size_t>(D));
    at::vec::convert(row, buffer.data(), D);
    r = buffer.data();
  }
  int64_t i = 0;
  for (; i + Vec::size() <= D; i += Vec::size()) at::vec::fmadd(Vec(scale), Vec::loadu(r + i), Vec::loadu(out + i)).store(out + i);
  for (; i < D; ++i) out[i] += scale * r[i];
}

template <typename T>
float dot(const T* a, const T* b, int64_t D, std::vector<float>& ab, std::vector<float>& bb) {
  const float *x, *y;
  if constexpr (std::is_same_v<T, float>) {
    x = a, y = b;
  } else {
    ab.resize(static_cast<size_t>(D)), bb.resize(static_cast<size_t>(D));
    at::vec::convert(a, ab.data(), D);
    at::vec::convert(b, bb.data(), D);
    x = ab.data(), y = bb.data();
  }
  Vec acc(0.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= D; i += Vec::size()) acc = at::vec::fmadd(Vec::loadu(x + i), Vec::loadu(y + i), acc);
  float s = at::vec::vec_reduce_all<float>([](const Vec& p, const Vec& q) { return p + q; }, acc);
  for (; i < D; ++i) s += x[i] * y[i];
  return s;
}

}  // namespace

template <typename T>
void moe_permute(const T* x_TD, const int64_t* slot_of_row, T* x_ND, int64_t D, int64_t K, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    std::memcpy(x_ND + n * D, x_TD + (slot_of_row[n] / K) * D, static_cast<size_t>(D) * sizeof(T));
  }
}

namespace {

// out_TD[t] = sum_k weight(t K + k) rows_ND[row_of_slot[t K + k]] in fp32, slots in order (dropped
// slots skipped): the permutation's backward (unit weights) and the combine.
template <typename T, typename Weight>
void sum_slots(const T* rows_ND, const int64_t* row_of_slot, const Weight& weight, T* out_TD, int64_t D, int64_t K,
               int64_t begin, int64_t end) {
  std::vector<float> acc(static_cast<size_t>(D)), buffer;
  for (int64_t t = begin; t < end; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t row = row_of_slot[t * K + k];
      if (row >= 0) axpy(weight(t * K + k), rows_ND + row * D, acc.data(), D, buffer);
    }
    store_floats(acc.data(), out_TD + t * D, D);
  }
}

}  // namespace

template <typename T>
void moe_permute_backward(const T* dx_ND, const int64_t* row_of_slot, T* dx_TD, int64_t D, int64_t K, int64_t begin,
                          int64_t end) {
  sum_slots(dx_ND, row_of_slot, [](int64_t) { return 1.0f; }, dx_TD, D, K, begin, end);
}

template <typename T>
void moe_combine(const T* y_ND, const int64_t* row_of_slot, const T* w_A, T* y_TD, int64_t D, int64_t K, int64_t begin,
                 int64_t end) {
  sum_slots(y_ND, row_of_slot, [w_A](int64_t s) { return static_cast<float>(w_A[s]); }, y_TD, D, K, begin, end);
}

template <typename T>
void moe_combine_backward_rows(const T* dy_TD, const int64_t* slot_of_row, const T* w_A, T* dy_ND, int64_t D, int64_t K,
                               int64_t begin, int64_t end) {
  std::vector<float> acc(static_cast<size_t>(D)), buffer;
  for (int64_t n = begin; n < end; ++n) {
    const int64_t s = slot_of_row[n];
    std::fill(acc.begin(), acc.end(), 0.0f);
    axpy(static_cast<float>(w_A[s]), dy_TD + (s / K) * D, acc.data(), D, buffer);
    store_floats(acc.data(), dy_ND + n * D, D);
  }
}

template <typename T>
void moe_combine_backward_weights(const T* dy_TD, const T* y_ND, const int64_t* row_of_slot, T* dw_A, int64_t D,
                                  int64_t K, int64_t begin, int64_t end) {
  std::vector<float> a, b;
  for (int64_t s = begin; s < end; ++s) {
    const int64_t row = row_of_slot[s];
    dw_A[s] = static_cast<T>(row >= 0 ? dot(dy_TD + (s / K) * D, y_ND + row * D, D, a, b) : 0.0f);
  }
}

#define MOEFORGE_INSTANTIATE(T)                                                                                          \
  template void moe_permute<T>(const T*, const int64_t*, T*, int64_t, int64_t, int64_t, int64_t);                        \
  template void moe_permute_backward<T>(const T*, const int64_t*, T*, int64_t, int64_t, int64_t, int64_t);               \
  template void moe_combine<T>(const T*, const int64_t*, const T*, T*, int64_t, int64_t, int64_t, int64_t);              \
  template void moe_combine_backward_rows<T>(const T*, const int64_t*, const T*, T*, int64_t, int64_t, int64_t, int64_t); \
  template void moe_combine_backward_weights<T>(const T*, const T*, const int64_t*, T*, int64_t, int64_t, int64_t, int64_t);
MOEFORGE_INSTANTIATE(float)
MOEFORGE_INSTANTIATE(c10::BFloat16)
#undef MOEFORGE_INSTANTIATE

}  // namespace moeforge::kernels::cpu
