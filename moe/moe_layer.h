// defines: MoELayer, build_model, update_expert_biases
//
// The sparse MoE block (Qwen2-MoE / Mixtral / Megatron): router, dispatch through a Dispatcher,
// routed experts, combine weighted by the router, plus an optional shared expert scaled by a
// sigmoid gate. Shapes: Note [shape suffixes] (core/base/shapes.h).
#pragma once

#include "core/config/config.h"
#include "core/model/gpt_model.h"
#include "moe/dispatcher.h"
#include "moe/experts.h"
#include "moe/router.h"

#include <memory>

namespace moeforge::moe {

class MoELayer : public model::FeedForward {
 public:
  explicit MoELayer(const ModelConfig& config);
  model::FeedForwardOutput forward(const torch::Tensor& x_BSD) override;
  // Replaces the local dispatcher (the expert-parallel runtime plugs in its all-to-all here).
  void set_dispatcher(std::shared_ptr<Dispatcher> dispatcher) { dispatcher_ = std::move(dispatcher); }

  Router gate{nullptr};
  Experts experts{nullptr};
  model::MLP shared_expert{nullptr};              // null without a shared expert
  model::Linear shared_expert_gate{nullptr};  // null without its gate
  // The routed and shared experts' widths split (gate/up rows, down columns), their summed output
  // leaving once; the router and the shared expert's gate stay whole.
  model::SplitRegion region;
  std::vector<torch::Tensor> stacked_expert_weights() const override { return {experts->gate_up_proj, experts->down_proj}; }

 private:
  ModelConfig config_;
  std::shared_ptr<Dispatcher> dispatcher_;
};

// The model of a config: MoE layers where model.moe_layer_freq says so, dense FFNs elsewhere.
model::GPTModel build_model(const ModelConfig& config);

// Aux-loss-free balancing, once per optimizer step: update_expert_bias (moe/router.h) of every MoE
// layer in [first_layer, end_layer) from its row of load_LE, the slots per expert of the model's
// MoE layers in order, counted over the whole global batch. No-op without the expert bias.
void update_expert_biases(model::GPTModelImpl& model, int64_t first_layer, int64_t end_layer, const torch::Tensor& load_LE);

}  // namespace moeforge::moe
