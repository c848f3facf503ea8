// defines: the CUDA kernels' launchers over raw pointers (no torch headers on the CUDA side; the
//          stream is the caller's current cudaStream_t, passed as void*). Each returns the CUDA
//          error of its launch (0 = cudaSuccess).
#pragma once

#include <cstdint>

namespace moeforge::kernels::cuda {

// SwiGLU (core/kernels/swiglu.h): `bf16` selects __nv_bfloat16 elements, else float.
int swiglu_forward(const void* gate_up, void* y, int64_t rows, int64_t F, bool bf16, void* stream);
int swiglu_backward(const void* gate_up, const void* dy, void* d_gate_up, int64_t rows, int64_t F, bool bf16, void* stream);

}  // namespace moeforge::kernels::cuda
