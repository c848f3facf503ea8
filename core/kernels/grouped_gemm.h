// defines: grouped_mm_usable, grouped_mm, group_offsets
//
// The routed experts' products as one grouped GEMM (LibTorch's at::_grouped_mm: the CPU in 2.15,
// CUDA sm90+ in bf16), instead of one small product per expert: x_NJ holds each expert's rows in
// expert order, w_EJM one [J, M] matrix per expert (strided views do), and offs_E the cumulative
// row ends (int32). The per-expert loop (moe/experts.cpp) stays where the op is missing (older
// LibTorch), the dtype unsupported or there are no rows; a probe at first use per device and dtype
// decides, and a failure disables the kernel there with the reason logged.
// Shapes: Note [shape suffixes] (core/base/shapes.h).
#pragma once

#include <torch/torch.h>

#include <vector>

namespace moeforge::kernels {

// Whether the grouped GEMM runs for `x` (its device and dtype) with matrices whose dimensions are
// `dims` now: at::_grouped_mm wants every row 16-byte aligned.
bool grouped_mm_usable(const torch::Tensor& x, const std::vector<int64_t>& dims);
// y_NM, rows of expert e = x rows [offs[e-1], offs[e]) times w[e]; its gradient arrives contiguous.
torch::Tensor grouped_mm(const torch::Tensor& x_NJ, const torch::Tensor& w_EJM, const torch::Tensor& offs_E);
// The cumulative row ends of `rows_per_group`, int32 on `device`.
torch::Tensor group_offsets(const std::vector<int64_t>& rows_per_group, const torch::Device& device);

}  // namespace moeforge::kernels
