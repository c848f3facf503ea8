// RMSNorm on CUDA: a block per row (sum of squares by block reduction); the backward's dw as
// per-row-block partial sums (deterministic, no atomics).
#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/cuda_kernels.h"

namespace moeforge::kernels::cuda {

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, float* __restrict__ r,
                               int64_t D, float eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * D;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float v = to_float(xr[i]);
    ss += v * v;
  }
  const float rr = rsqrtf(block_sum(ss) / static_cast<float>(D) + eps);
  if (threadIdx.x == 0) r[row] = rr;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    // As the reference: the normalized value in the input dtype, then times the weight.
    y[row * D + i] = from_float<T>(to_float(w[i]) * to_float(from_float<T>(to_float(xr[i]) * rr)));
  }
}

template <typename T>
__global__ void backward_dx_kernel(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ r,
                                   const T* __restrict__ dy, T* __restrict__ dx, int64_t D) {
  const int64_t row = blockIdx.x;
  const float rr = r[row];
  float dot = 0.0f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    dot += to_float(dy[row * D + i]) * to_float(w[i]) * to_float(x[row * D + i]) * rr;
  }
  const float c = block_sum(dot) / static_cast<float>(D);
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    const float n = to_float(x[row * D + i]) * rr, dn = to_float(dy[row * D + i]) * to_float(w[i]);
    dx[row * D + i] = from_float<T>(rr * (dn - n * c));
  }
}

// dw_partial[b, i] = sum over rows of block b of dy * x * r.
template <typename T>
__global__ void backward_dw_kernel(const T* __restrict__ x, const float* __restrict__ r, const T* __restrict__ dy,
                                   float* __restrict__ partial, int64_t rows, int64_t D, int64_t row_block) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= D) return;
  const int64_t first = blockIdx.y * row_block, last = first + row_block < rows ? first + row_block : rows;
  float acc = 0.0f;
  for (int64_t row = first; row < last; ++row) acc += to_float(dy[row * D + i]) * to_float(x[row * D + i]) * r[row];
  partial[blockIdx.y * D + i] = acc;
}

template <typename T>
int forward(const void* x, const void* w, void* y, float* r, int64_t rows, int64_t D, float eps, cudaStream_t s) {
  forward_kernel<<<static_cast<unsigned>(rows), kThreads, 0, s>>>(static_cast<const T*>(x), static_cast<const T*>(w),
                                                                  static_cast<T*>(y), r, D, eps);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int backward(const void* x, const void* w, const float* r, const void* dy, void* dx, float* partial, int64_t rows,
             int64_t D, int64_t row_block, cudaStream_t s) {
  backward_dx_kernel<<<static_cast<unsigned>(rows), kThreads, 0, s>>>(
      static_cast<const T*>(x), static_cast<const T*>(w), r, static_cast<const T*>(dy), static_cast<T*>(dx), D);
  const dim3 grid(static_cast<unsigned>((D + kThreads - 1) / kThreads), static_cast<unsigned>((rows + row_block - 1) / row_block));
  backward_dw_kernel<<<grid, kThreads, 0, s>>>(static_cast<const T*>(x), r, static_cast<const T*>(dy), partial, rows, D,
                                               row_block);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int rmsnorm_forward(const void* x, const void* w, void* y, float* r, int64_t rows, int64_t D, float eps, bool bf16,
                    void* stream) {
  if (rows == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  return bf16 ? forward<__nv_bfloat16>(x, w, y, r, rows, D, eps, s) : forward<float>(x, w, y, r, rows, D, eps, s);
}

int rmsnorm_backward(const void* x, const void* w, const float* r, const void* dy, void* dx, float* dw_partial,
                     int64_t rows, int64_t D, int64_t row_block, bool bf16, void* stream) {
  if (rows == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  return bf16 ? backward<__nv_bfloat16>(x, w, r, dy, dx, dw_partial, rows, D, row_block, s)
              : backward<float>(x, w, r, dy, dx, dw_partial, rows, D, row_block, s);
}

}  // namespace moeforge::kernels::cuda
