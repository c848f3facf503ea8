// Cross-entropy rows on CUDA: one block per row; each thread keeps a running (max, sum of
// exponentials) over its strided elements, the block combines them, then the row is overwritten
// by its gradient. No atomics: the result does not depend on scheduling.
#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/cuda_kernels.h"

#include <math_constants.h>

namespace moeforge::kernels::cuda {

namespace {

constexpr int kThreads = 512;

struct MaxSum {
  float m, s;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  if (a.s == 0.0f) return b;
  if (b.s == 0.0f) return a;
  const float m = fmaxf(a.m, b.m);
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// (max, sum) over the block; every thread gets it.
__device__ MaxSum block_merge(MaxSum v) {
  __shared__ MaxSum warp_parts[32];
  for (int o = 16; o > 0; o >>= 1) v = merge(v, {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)});
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_parts[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? warp_parts[lane] : MaxSum{-CUDART_INF_F, 0.0f};
  for (int o = 16; o > 0; o >>= 1) v = merge(v, {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)});
  return v;
}

template <typename T>
__global__ void cross_entropy_kernel(T* __restrict__ logits, int64_t V, const int64_t* __restrict__ labels,
                                     const float* __restrict__ scale, float* __restrict__ loss, bool grad) {
  T* row = logits + blockIdx.x * V;
  MaxSum part{-CUDART_INF_F, 0.0f};
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    const float x = to_float(row[v]);
    if (x > part.m) {
      part.s = part.s * expf(part.m - x) + 1.0f;
      part.m = x;
    } else {
      part.s += expf(x - part.m);
    }
  }
  const MaxSum total = block_merge(part);
  const float lse = total.m + logf(total.s);
  const int64_t label = labels[blockIdx.x];
  const bool valid = label >= 0 && label < V;
  if (threadIdx.x == 0) loss[blockIdx.x] = valid ? lse - to_float(row[label]) : CUDART_NAN_F;
  if (!grad) return;
  __syncthreads();  // thread 0 has read row[label]
  const float sc = scale[blockIdx.x];
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    row[v] = from_float<T>(expf(to_float(row[v]) - lse) * sc - (v == label ? sc : 0.0f));
  }
}

}  // namespace

int cross_entropy_rows(void* logits, int64_t rows, int64_t V, const int64_t* labels, const float* scale, float* loss,
                       bool grad, bool bf16, void* stream) {
  if (rows == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  if (bf16) {
    cross_entropy_kernel<<<static_cast<unsigned>(rows), kThreads, 0, s>>>(static_cast<__nv_bfloat16*>(logits), V, labels,
                                                                          scale, loss, grad);
  } else {
    cross_entropy_kernel<<<static_cast<unsigned>(rows), kThreads, 0, s>>>(static_cast<float*>(logits), V, labels, scale,
                                                                          loss, grad);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moeforge::kernels::cuda
