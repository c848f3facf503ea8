// defines: checkpointed_layer, checkpointed_attention
//
// Activation recomputation: run a piece of the forward pass without keeping its activations, and
// run it again inside backward. LibTorch's C++ API has no checkpoint utility, so these are custom
// autograd functions. A checkpointed decoder layer also returns its routing statistics (router
// logits, per-layer aux and z losses) as outputs of the same function, so the load-balancing
// gradients reach the router through the recomputed graph exactly as without recomputation.
#pragma once

#include "core/model/transformer.h"

namespace moeforge::model {

class DecoderLayerImpl;

// layer->forward(x, cos, sin, ffn_out) with only x, cos and sin kept for backward.
torch::Tensor checkpointed_layer(DecoderLayerImpl* layer, const torch::Tensor& x_BSD, const torch::Tensor& cos,
                                 const torch::Tensor& sin, FeedForwardOutput& ffn_out);

// Causal scaled-dot-product attention with only q, k, v kept (Megatron's selective recompute).
torch::Tensor checkpointed_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, bool gqa);

}  // namespace moeforge::model
