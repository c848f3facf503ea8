// defines: lm_head_cross_entropy (and its reference)
//
// The LM head and the loss together: the mean cross-entropy, over the tokens whose loss_mask is
// set, of the logits h_TD w_VD^T against labels_T, with the logits never whole. Fused, the tokens
// go in chunks of at most kChunkBytes of logits: each chunk's logits are made by one GEMM, the
// cross-entropy kernel turns them in place into their gradient (softmax - onehot, times
// mask / tokens), and two GEMMs take that to dh (written) and dw (added into an fp32
// accumulator); the backward only scales the two by the upstream gradient (and adds dw into the
// weight's fp32 main_grad where that is fused). The reference is the
// composition it replaces: the whole [T, V] logits, cast to fp32, then cross_entropy, which at
// 8,192 tokens x 151,936 vocabulary holds 5 GB of logits and as much again of their gradient.
//
// Numerics as the reference: logits in the GEMMs' dtype, the softmax in fp32. A label outside
// [0, V) makes the loss NaN (the reference throws).
// Shapes: Note [shape suffixes] (core/base/shapes.h).
#pragma once

#include <torch/torch.h>

namespace moeforge::kernels {

// Bytes of one chunk's logits: 256 MiB (441 tokens at the Qwen vocabulary in fp32, 883 in bf16).
inline constexpr int64_t kChunkBytes = int64_t{256} << 20;

// Fused or reference (model.kernels); h_TD [T, D], w_VD [V, D], labels_T int64, loss_mask_T any
// dtype (1 = counted). Returns an fp32 scalar. weight_used_once (an untied head): the fused path
// may add w's gradient straight into its fp32 main_grad (wgrad_accumulation.h); a tied embedding
// gets another gradient from its lookup and keeps the ordinary one.
// `tokens` (a scalar tensor on the device): the mean's denominator, when the rows are a part of
// the tokens it is over (sequence parallelism: a rank's chunk of the micro-batch); undefined: the
// mask's count.
torch::Tensor lm_head_cross_entropy(const torch::Tensor& h_TD, const torch::Tensor& w_VD, const torch::Tensor& labels_T,
                                    const torch::Tensor& loss_mask_T, bool weight_used_once = false,
                                    const torch::Tensor& tokens = {});
torch::Tensor lm_head_cross_entropy_reference(const torch::Tensor& h_TD, const torch::Tensor& w_VD,
                                              const torch::Tensor& labels_T, const torch::Tensor& loss_mask_T,
                                              const torch::Tensor& tokens = {});
// chunk_rows 0: as many tokens as kChunkBytes of logits hold.
torch::Tensor lm_head_cross_entropy_fused(const torch::Tensor& h_TD, const torch::Tensor& w_VD, const torch::Tensor& labels_T,
                                          const torch::Tensor& loss_mask_T, int64_t chunk_rows = 0,
                                          bool weight_used_once = false, const torch::Tensor& tokens = {});

// The mean of cross_entropy(logits_TV in fp32, labels) over the masked tokens: the reference's
// loss once it has the logits (model::lm_loss).
torch::Tensor masked_cross_entropy(const torch::Tensor& logits_TV, const torch::Tensor& labels_T,
                                   const torch::Tensor& loss_mask_T, const torch::Tensor& tokens = {});

}  // namespace moeforge::kernels
