// defines: AdamWScalars, AdamWChunk: the plain data the CPU and CUDA AdamW kernels share (no torch
//          headers: the .cu files include it)
#pragma once

#include <cstdint>

namespace moeforge::kernels {

// One step's scalars in fp32, made once in double as the reference makes them: w * decay_factor
// (1 - lr * weight_decay, or 1 where no decay applies), m += (1 - beta1)(g - m),
// v = beta2 v + (1 - beta2) g^2, w += step_size * m / (sqrt(v) / bias2_sqrt + eps) with
// step_size = -lr / (1 - beta1^step) and bias2_sqrt = sqrt(1 - beta2^step).
struct AdamWScalars {
  float decay_factor, one_minus_beta1, beta2, one_minus_beta2, bias2_sqrt, eps, step_size;
};

// A run of at most kAdamWChunk elements of one tensor (the CUDA kernel's work table): copy is a
// bf16 array (uint16_t bits) or null.
struct AdamWChunk {
  float* w;
  const float* g;
  float* m;
  float* v;
  uint16_t* copy;
  int64_t n;
  float decay_factor;
};
inline constexpr int64_t kAdamWChunk = 16384;

}  // namespace moeforge::kernels
