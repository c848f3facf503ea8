// defines: Experts
//
// The routed experts of one MoE layer as stacked weights (the layout grouped GEMMs want):
// gate_up_proj [E, 2F, D] (gate rows first, then up) and down_proj [E, D, F]. With the fused
// kernels, one grouped GEMM per projection over all experts' contiguous blocks of rows and the
// fused SwiGLU between them; otherwise (the reference, or where the grouped GEMM does not run) one
// matrix product per expert and projection.
// Shapes: Note [shape suffixes] (core/base/shapes.h).
#pragma once

#include <torch/torch.h>

#include <vector>

namespace moeforge::moe {

class ExpertsImpl : public torch::nn::Module {
 public:
  ExpertsImpl(int64_t num_experts, int64_t hidden, int64_t ffn);
  // x_ND holds rows_per_expert[e] rows for expert e, in expert order.
  torch::Tensor forward(const torch::Tensor& x_ND, const std::vector<int64_t>& rows_per_expert);
  torch::Tensor gate_up_proj;  // [E, 2F, D]
  torch::Tensor down_proj;     // [E, D, F]
};
TORCH_MODULE(Experts);

}  // namespace moeforge::moe
