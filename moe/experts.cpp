#include "moe/experts.h"

#include "core/kernels/grouped_gemm.h"
#include "core/kernels/swiglu.h"
#include "core/kernels/wgrad_accumulation.h"
#include "core/model/transformer.h"

namespace moeforge::moe {

ExpertsImpl::ExpertsImpl(int64_t num_experts, int64_t hidden, int64_t ffn) {
  gate_up_proj = model::deferred_parameter(*this, "gate_up_proj", {num_experts, 2 * ffn, hidden});
  down_proj = model::deferred_parameter(*this, "down_proj", {num_experts, hidden, ffn});
}

torch::Tensor ExpertsImpl::forward(const torch::Tensor& x_ND, const std::vector<int64_t>& rows_per_expert) {
  // One grouped GEMM per projection where LibTorch runs it (kernels/grouped_gemm.h).
  if (x_ND.size(0) > 0 && kernels::grouped_mm_usable(x_ND, {gate_up_proj.size(1), gate_up_proj.size(2), down_proj.size(1)})) {
    const auto offs_E = kernels::group_offsets(rows_per_expert, x_ND.device());
    const auto gate_up_N2F = kernels::grouped_linear(x_ND, gate_up_proj, offs_E, rows_per_expert);
    return kernels::grouped_linear(kernels::swiglu(gate_up_N2F), down_proj, offs_E, rows_per_expert);
  }
  std::vector<torch::Tensor> outputs;
  // One unbind per weight: its backward stacks the per-expert gradients once, where indexing
  // w[e] per expert would materialize a full-size zero gradient for every expert.
  const auto gate_up = gate_up_proj.unbind(0);
  const auto down = down_proj.unbind(0);
  int64_t start = 0;
  for (size_t e = 0; e < rows_per_expert.size(); ++e) {
    const int64_t rows = rows_per_expert[e];
    if (rows == 0) continue;
    const auto x_nD = x_ND.narrow(0, start, rows);
    outputs.push_back(torch::matmul(kernels::swiglu(torch::matmul(x_nD, gate_up[e].t())), down[e].t()));
    start += rows;
  }
  if (outputs.empty()) {
    // No rows for any expert (under expert parallelism: no peer routed a token here). Run expert 0
    // on the empty block anyway, so the result stays connected to the input and the weights: the
    // all-to-alls around it must run their backward on every rank, or the ranks' collectives diverge.
    return torch::matmul(kernels::swiglu(torch::matmul(x_ND, gate_up[0].t())), down[0].t());
  }
  return torch::cat(outputs, 0);
}

}  // namespace moeforge::moe
