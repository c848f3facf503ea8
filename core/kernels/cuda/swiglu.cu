// SwiGLU on CUDA: one thread per output element (grid-stride), math in fp32.
#include "core/kernels/cuda/cuda_kernels.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace moeforge::kernels::cuda {

namespace {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }  // expf: 1e-6 in fp32

template <typename T>
__global__ void forward_kernel(const T* __restrict__ gu, T* __restrict__ y, int64_t rows, int64_t F) {
  const int64_t n = rows * F;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / F, f = i - r * F;
    const float g = to_float(gu[r * 2 * F + f]), u = to_float(gu[r * 2 * F + F + f]);
    y[i] = from_float<T>(g * sigmoid(g) * u);
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ gu, const T* __restrict__ dy, T* __restrict__ dgu, int64_t rows,
                                int64_t F) {
  const int64_t n = rows * F;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / F, f = i - r * F;
    const float g = to_float(gu[r * 2 * F + f]), u = to_float(gu[r * 2 * F + F + f]), d = to_float(dy[i]);
    const float s = sigmoid(g);
    dgu[r * 2 * F + f] = from_float<T>(d * u * s * (1.0f + g * (1.0f - s)));
    dgu[r * 2 * F + F + f] = from_float<T>(d * g * s);
  }
}

int blocks_for(int64_t n) {
  constexpr int64_t kThreads = 256, kMaxBlocks = 65535;
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b));
}

}  // namespace

int swiglu_forward(const void* gate_up, void* y, int64_t rows, int64_t F, bool bf16, void* stream) {
  if (rows * F == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  if (bf16) {
    forward_kernel<<<blocks_for(rows * F), 256, 0, s>>>(static_cast<const __nv_bfloat16*>(gate_up),
                                                         static_cast<__nv_bfloat16*>(y), rows, F);
  } else {
    forward_kernel<<<blocks_for(rows * F), 256, 0, s>>>(static_cast<const float*>(gate_up), static_cast<float*>(y), rows, F);
  }
  return static_cast<int>(cudaGetLastError());
}

int swiglu_backward(const void* gate_up, const void* dy, void* d_gate_up, int64_t rows, int64_t F, bool bf16, void* stream) {
  if (rows * F == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  if (bf16) {
    backward_kernel<<<blocks_for(rows * F), 256, 0, s>>>(static_cast<const __nv_bfloat16*>(gate_up),
                                                          static_cast<const __nv_bfloat16*>(dy),
                                                          static_cast<__nv_bfloat16*>(d_gate_up), rows, F);
  } else {
    backward_kernel<<<blocks_for(rows * F), 256, 0, s>>>(static_cast<const float*>(gate_up), static_cast<const float*>(dy),
                                                          static_cast<float*>(d_gate_up), rows, F);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moeforge::kernels::cuda
