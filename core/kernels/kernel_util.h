// defines: supported_dtype, is_bf16, check_dtype, stream_of, MOEFORGE_CUDA_LAUNCH: the glue every
//          kernel's autograd wrapper shares
#pragma once

#include <torch/torch.h>

#ifdef MOEFORGE_WITH_CUDA
#include "core/kernels/cuda/cuda_kernels.h"

#include <c10/cuda/CUDAStream.h>
#endif

#include <stdexcept>
#include <string>

namespace moeforge::kernels {

inline bool supported_dtype(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16;
}
inline bool is_bf16(const torch::Tensor& t) { return t.scalar_type() == torch::kBFloat16; }
inline void check_dtype(const torch::Tensor& t, const char* kernel) {
  if (!supported_dtype(t)) throw std::invalid_argument(std::string(kernel) + ": fp32 or bf16 tensors only");
}

#ifdef MOEFORGE_WITH_CUDA
inline void* stream_of(const torch::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
inline void check_launch(int rc, const char* what) {
  if (rc != 0) throw std::runtime_error(std::string(what) + ": CUDA launch failed (error " + std::to_string(rc) + ")");
}
// A CUDA kernel's launch (`call` returns its CUDA error); compiled out of a build without CUDA,
// where a CUDA tensor cannot reach it.
#define MOEFORGE_CUDA_LAUNCH(call, what) ::moeforge::kernels::check_launch((call), (what))
#else
#define MOEFORGE_CUDA_LAUNCH(call, what) throw std::logic_error(std::string(what) + ": a CUDA tensor in a build without CUDA")
#endif

}  // namespace moeforge::kernels
