// SwiGLU on CUDA: one thread per output element (grid-stride), math in fp32.
#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/cuda_kernels.h"

namespace moeforge::kernels::cuda {

namespace {

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }  // expf: 1e-6 in fp32

template <typename T>
__global__ void forward_kernel(const T* __restrict__ gate, const T* __restrict__ up, int64_t ld, T* __restrict__ y,
                               int64_t rows, int64_t F) {
  const int64_t n = rows * F;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / F, f = i - r * F;
    const float g = to_float(gate[r * ld + f]), u = to_float(up[r * ld + f]);
    y[i] = from_float<T>(g * sigmoid(g) * u);
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ gate, const T* __restrict__ up, int64_t ld, const T* __restrict__ dy,
                                T* __restrict__ d_gate, T* __restrict__ d_up, int64_t rows, int64_t F) {
  const int64_t n = rows * F;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / F, f = i - r * F;
    const float g = to_float(gate[r * ld + f]), u = to_float(up[r * ld + f]), d = to_float(dy[i]);
    const float s = sigmoid(g);
    d_gate[r * ld + f] = from_float<T>(d * u * s * (1.0f + g * (1.0f - s)));
    d_up[r * ld + f] = from_float<T>(d * g * s);
  }
}

template <typename T>
int launch_forward(const void* gate, const void* up, int64_t ld, void* y, int64_t rows, int64_t F, cudaStream_t s) {
  forward_kernel<<<grid_for(rows * F), 256, 0, s>>>(static_cast<const T*>(gate), static_cast<const T*>(up), ld,
                                                     static_cast<T*>(y), rows, F);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_backward(const void* gate, const void* up, int64_t ld, const void* dy, void* dg, void* du, int64_t rows,
                    int64_t F, cudaStream_t s) {
  backward_kernel<<<grid_for(rows * F), 256, 0, s>>>(static_cast<const T*>(gate), static_cast<const T*>(up), ld,
                                                      static_cast<const T*>(dy), static_cast<T*>(dg), static_cast<T*>(du),
                                                      rows, F);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int swiglu_forward(const void* gate, const void* up, int64_t ld, void* y, int64_t rows, int64_t F, bool bf16, void* stream) {
  if (rows * F == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  return bf16 ? launch_forward<__nv_bfloat16>(gate, up, ld, y, rows, F, s) : launch_forward<float>(gate, up, ld, y, rows, F, s);
}

int swiglu_backward(const void* gate, const void* up, int64_t ld, const void* dy, void* d_gate, void* d_up, int64_t rows,
                    int64_t F, bool bf16, void* stream) {
  if (rows * F == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  return bf16 ? launch_backward<__nv_bfloat16>(gate, up, ld, dy, d_gate, d_up, rows, F, s)
              : launch_backward<float>(gate, up, ld, dy, d_gate, d_up, rows, F, s);
}

}  // namespace moeforge::kernels::cuda
