// AdamW on CUDA: one launch; block b takes chunk b of the table (at most kAdamWChunk elements of
// one tensor). The element math is the CPU kernel's, with the same fused multiply-adds and IEEE
// sqrt and division, written out as intrinsics so that no contraction changes it.
#include "core/kernels/cuda/common.cuh"
#include "core/kernels/cuda/cuda_kernels.h"

namespace moeforge::kernels::cuda {

namespace {

constexpr int kThreads = 512;

__global__ void adamw_kernel(const AdamWChunk* chunks, AdamWScalars s) {
  const AdamWChunk c = chunks[blockIdx.x];
  for (int64_t i = threadIdx.x; i < c.n; i += blockDim.x) {
    const float g = c.g[i];
    float m = c.m[i], v = c.v[i];
    const float w = __fmul_rn(c.w[i], c.decay_factor);
    m = __fmaf_rn(s.one_minus_beta1, __fsub_rn(g, m), m);
    v = __fmaf_rn(__fmul_rn(s.one_minus_beta2, g), g, __fmul_rn(v, s.beta2));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bias2_sqrt), s.eps);
    const float out = __fmaf_rn(s.step_size, __fdiv_rn(m, denom), w);
    c.w[i] = out;
    c.m[i] = m;
    c.v[i] = v;
    if (c.copy) c.copy[i] = __bfloat16_as_ushort(__float2bfloat16_rn(out));
  }
}

}  // namespace

int adamw(const AdamWChunk* chunks, int64_t num_chunks, const AdamWScalars& s, void* stream) {
  constexpr int64_t kMaxGrid = 2147483647;
  if (num_chunks == 0) return 0;
  if (num_chunks > kMaxGrid) return static_cast<int>(cudaErrorInvalidValue);
  adamw_kernel<<<static_cast<unsigned>(num_chunks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(chunks, s);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moeforge::kernels::cuda
