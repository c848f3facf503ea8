// The MoE permutation on CUDA: gathers by the sorted order; every output element written by one
// thread, sums over a token's K slots in slot order (deterministic, no atomics).
#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/cuda_kernels.h"

namespace moeforge::kernels::cuda {

namespace {

#define GRID_STRIDE(i, n)                                                                                 \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

template <typename T>
__global__ void permute_kernel(const T* __restrict__ x, const int64_t* __restrict__ slot_of_row, T* __restrict__ out,
                               int64_t N, int64_t D, int64_t K) {
  GRID_STRIDE(i, N * D) {
    const int64_t n = i / D, d = i - n * D;
    out[i] = x[(slot_of_row[n] / K) * D + d];
  }
}

// out[t, d] = sum over k of (w ? w[t K + k] : 1) * rows[row_of_slot[t K + k], d].
template <typename T>
__global__ void gather_sum_kernel(const T* __restrict__ rows, const int64_t* __restrict__ row_of_slot,
                                  const T* __restrict__ w, T* __restrict__ out, int64_t T_, int64_t D, int64_t K) {
  GRID_STRIDE(i, T_ * D) {
    const int64_t t = i / D, d = i - t * D;
    float acc = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = row_of_slot[t * K + k];
      if (r >= 0) acc += (w ? to_float(w[t * K + k]) : 1.0f) * to_float(rows[r * D + d]);
    }
    out[i] = from_float<T>(acc);
  }
}

template <typename T>
__global__ void combine_rows_kernel(const T* __restrict__ dy_TD, const int64_t* __restrict__ slot_of_row,
                                    const T* __restrict__ w, T* __restrict__ dy_ND, int64_t N, int64_t D, int64_t K) {
  GRID_STRIDE(i, N * D) {
    const int64_t n = i / D, d = i - n * D, s = slot_of_row[n];
    dy_ND[i] = from_float<T>(to_float(w[s]) * to_float(dy_TD[(s / K) * D + d]));
  }
}

template <typename T>
__global__ void combine_weights_kernel(const T* __restrict__ dy_TD, const T* __restrict__ y_ND,
                                       const int64_t* __restrict__ row_of_slot, T* __restrict__ dw, int64_t D, int64_t K) {
  const int64_t s = blockIdx.x, r = row_of_slot[s], t = s / K;
  float acc = 0.0f;
  if (r >= 0) {
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) acc += to_float(dy_TD[t * D + d]) * to_float(y_ND[r * D + d]);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) dw[s] = from_float<T>(acc);
}

#undef GRID_STRIDE

template <typename T>
int permute(const void* x, const int64_t* sor, void* out, int64_t N, int64_t D, int64_t K, cudaStream_t s) {
  permute_kernel<<<grid_for(N * D), 256, 0, s>>>(static_cast<const T*>(x), sor, static_cast<T*>(out), N, D, K);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int gather_sum(const void* rows, const int64_t* ros, const void* w, void* out, int64_t T_, int64_t D, int64_t K,
               cudaStream_t s) {
  gather_sum_kernel<<<grid_for(T_ * D), 256, 0, s>>>(static_cast<const T*>(rows), ros, static_cast<const T*>(w),
                                                      static_cast<T*>(out), T_, D, K);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int combine_backward(const void* dy_TD, const void* y_ND, const int64_t* sor, const int64_t* ros, const void* w,
                     void* dy_ND, void* dw, int64_t N, int64_t T_, int64_t D, int64_t K, cudaStream_t s) {
  if (N > 0) {
    combine_rows_kernel<<<grid_for(N * D), 256, 0, s>>>(static_cast<const T*>(dy_TD), sor, static_cast<const T*>(w),
                                                         static_cast<T*>(dy_ND), N, D, K);
  }
  if (T_ * K > 0) {
    combine_weights_kernel<<<static_cast<unsigned>(T_ * K), 128, 0, s>>>(static_cast<const T*>(dy_TD),
                                                                          static_cast<const T*>(y_ND), ros,
                                                                          static_cast<T*>(dw), D, K);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int moe_permute(const void* x, const int64_t* sor, void* out, int64_t N, int64_t D, int64_t K, bool bf16, void* stream) {
  if (N * D == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  return bf16 ? permute<__nv_bfloat16>(x, sor, out, N, D, K, s) : permute<float>(x, sor, out, N, D, K, s);
}

int moe_permute_backward(const void* dx_ND, const int64_t* ros, void* dx_TD, int64_t T, int64_t D, int64_t K, bool bf16,
                         void* stream) {
  if (T * D == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  return bf16 ? gather_sum<__nv_bfloat16>(dx_ND, ros, nullptr, dx_TD, T, D, K, s)
              : gather_sum<float>(dx_ND, ros, nullptr, dx_TD, T, D, K, s);
}

int moe_combine(const void* y_ND, const int64_t* ros, const void* w, void* y_TD, int64_t T, int64_t D, int64_t K, bool bf16,
                void* stream) {
  if (T * D == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  return bf16 ? gather_sum<__nv_bfloat16>(y_ND, ros, w, y_TD, T, D, K, s) : gather_sum<float>(y_ND, ros, w, y_TD, T, D, K, s);
}

int moe_combine_backward(const void* dy_TD, const void* y_ND, const int64_t* sor, const int64_t* ros, const void* w,
                         void* dy_ND, void* dw, int64_t N, int64_t T, int64_t D, int64_t K, bool bf16, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return bf16 ? combine_backward<__nv_bfloat16>(dy_TD, y_ND, sor, ros, w, dy_ND, dw, N, T, D, K, s)
              : combine_backward<float>(dy_TD, y_ND, sor, ros, w, dy_ND, dw, N, T, D, K, s);
}

}  // namespace moeforge::kernels::cuda
