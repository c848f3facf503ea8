// defines: the CPU kernels over raw pointers (compiled for AVX2 + FMA in their own library; see
//          core/kernels/kernels.h), one function per pass, over rows [begin, end) so that the
//          caller splits the work with at::parallel_for
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace moeforge::kernels::cpu {

// gate_up rows of 2F (gate, then up), y and dy rows of F, d_gate_up rows of 2F; rows contiguous.
void swiglu_forward(const float* gate_up, float* y, int64_t F, int64_t begin, int64_t end);
void swiglu_forward(const c10::BFloat16* gate_up, c10::BFloat16* y, int64_t F, int64_t begin, int64_t end);
void swiglu_backward(const float* gate_up, const float* dy, float* d_gate_up, int64_t F, int64_t begin, int64_t end);
void swiglu_backward(const c10::BFloat16* gate_up, const c10::BFloat16* dy, c10::BFloat16* d_gate_up, int64_t F,
                     int64_t begin, int64_t end);

}  // namespace moeforge::kernels::cpu
