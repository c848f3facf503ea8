// Half-split RoPE on CUDA: one thread per (row, i < Dh / 2) pair.
#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/cuda_kernels.h"

namespace moeforge::kernels::cuda {

namespace {

template <typename T>
__global__ void rope_kernel(const T* __restrict__ x, const T* __restrict__ cos, const T* __restrict__ sin,
                            T* __restrict__ out, int64_t rows, int64_t H, int64_t Dh, float sign) {
  const int64_t half = Dh / 2, n = rows * half;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = k / half, i = k - row * half, pos = row / H;
    const float x1 = to_float(x[row * Dh + i]), x2 = to_float(x[row * Dh + half + i]);
    out[row * Dh + i] = from_float<T>(x1 * to_float(cos[pos * Dh + i]) - sign * x2 * to_float(sin[pos * Dh + i]));
    out[row * Dh + half + i] =
        from_float<T>(x2 * to_float(cos[pos * Dh + half + i]) + sign * x1 * to_float(sin[pos * Dh + half + i]));
  }
}

}  // namespace

int rope(const void* x, const void* cos, const void* sin, void* out, int64_t rows, int64_t H, int64_t Dh, float sign,
         bool bf16, void* stream) {
  if (rows == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  const int grid = grid_for(rows * (Dh / 2));
  if (bf16) {
    rope_kernel<<<grid, 256, 0, s>>>(static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(cos),
                                     static_cast<const __nv_bfloat16*>(sin), static_cast<__nv_bfloat16*>(out), rows, H, Dh,
                                     sign);
  } else {
    rope_kernel<<<grid, 256, 0, s>>>(static_cast<const float*>(x), static_cast<const float*>(cos),
                                     static_cast<const float*>(sin), static_cast<float*>(out), rows, H, Dh, sign);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moeforge::kernels::cuda
