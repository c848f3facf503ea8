// defines: moe_permute, moe_combine (and their references)
//
// The MoE layer's token <-> expert-row moves, in one deterministic pass each way (no atomics, no
// scatter-add: every output element is written by one thread, a token's K slots summed in slot
// order). The T tokens' K slots are s = t K + k; after the stable sort by expert, sorted row n
// holds slot slot_of_row_N[n], and row_of_slot_A[s] is that row (-1 for a slot a capacity limit
// dropped).
//   moe_permute:  x_ND[n] = x_TD[slot_of_row[n] / K]     backward: dx_TD[t] = sum_k dx_ND[row_of_slot[t K + k]]
//   moe_combine:  y_TD[t] = sum_k w_TK[t, k] y_ND[row_of_slot[t K + k]]   (the weighted unpermute)
//                 backward: dy_ND[n] = w[s] dy_TD[s / K], dw[s] = dy_TD[s / K] . y_ND[row_of_slot[s]]
// Shapes: Note [shape suffixes] (core/base/shapes.h).
#pragma once

#include <torch/torch.h>

namespace moeforge::kernels {

torch::Tensor moe_permute(const torch::Tensor& x_TD, const torch::Tensor& slot_of_row_N, const torch::Tensor& row_of_slot_A,
                          int64_t K);
torch::Tensor moe_combine(const torch::Tensor& y_ND, const torch::Tensor& slot_of_row_N, const torch::Tensor& row_of_slot_A,
                          const torch::Tensor& weights_TK);

// The LibTorch compositions: a gather of the K-fold expanded tokens (a permutation: its CUDA
// backward writes each row once), and an unsort with zeros for dropped slots, times the weights,
// summed over k.
torch::Tensor moe_permute_reference(const torch::Tensor& x_TD, const torch::Tensor& slot_of_row_N, int64_t K);
torch::Tensor moe_combine_reference(const torch::Tensor& y_ND, const torch::Tensor& row_of_slot_A, const torch::Tensor& weights_TK);

torch::Tensor moe_permute_fused(const torch::Tensor& x_TD, const torch::Tensor& slot_of_row_N,
                                const torch::Tensor& row_of_slot_A, int64_t K);
torch::Tensor moe_combine_fused(const torch::Tensor& y_ND, const torch::Tensor& slot_of_row_N,
                                const torch::Tensor& row_of_slot_A, const torch::Tensor& weights_TK);

}  // namespace moeforge::kernels
