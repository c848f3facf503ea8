#include "moe/moe_layer.h"

#include "core/device/host_sync.h"

namespace moeforge::moe {

MoELayer::MoELayer(const ModelConfig& c) : config_(c), dispatcher_(std::make_shared<LocalDispatcher>(*c.num_experts)) {
  gate = register_module("gate", Router(c));
  experts = register_module("experts", Experts(*c.num_experts, c.hidden_size, *c.moe_ffn_hidden_size));
  if (c.moe_shared_expert_intermediate_size) {
    shared_expert = register_module("shared_expert", model::MLP(c.hidden_size, *c.moe_shared_expert_intermediate_size));
    if (c.moe_shared_expert_gate) {
      shared_expert_gate = register_module("shared_expert_gate", model::Linear(c.hidden_size, 1, false));
    }
  }
}

model::FeedForwardOutput MoELayer::forward(const torch::Tensor& x_BSD) {
  // What meets the expert weights, which a tensor-parallel runtime splits by width, and what the
  // router and the shared gate (whole on every rank) see: the same tokens, the whole sequence
  // even where x_BSD is a sequence-parallel chunk of it.
  const auto xs_BSD = region.in(x_BSD);
  const auto xw_BSD = region.whole_input(x_BSD, xs_BSD);
  const int64_t D = x_BSD.size(-1);
  const auto x_TD = xw_BSD.reshape({-1, D}), xs_TD = xs_BSD.reshape({-1, D});
  const Routing routing = gate(x_TD);
  const int64_t E = *config_.num_experts;
  // With a capacity factor, over-full experts drop slots (their expert id becomes E).
  const auto experts_TK = config_.moe_expert_capacity_factor
                              ? apply_capacity(routing.experts_TK, routing.weights_TK, E, *config_.moe_expert_capacity_factor,
                                               config_.moe_token_drop_policy)
                              : routing.experts_TK;
  // The shared expert runs while the dispatcher's exchanges are in flight: its gate and up
  // projections during the dispatch, the down projection and the gate during the combine.
  torch::Tensor shared_TF, shared_TD;
  Overlapped shared_first, shared_second;
  if (shared_expert) {
    shared_first = [&] { shared_TF = shared_expert->activation(xs_TD); };
    shared_second = [&] {
      shared_TD = shared_expert->down_proj(shared_TF);
      // A whole factor times a partial output: it enters the region, so its gradient is summed.
      if (shared_expert_gate) shared_TD = region.scale(torch::sigmoid(shared_expert_gate(x_TD))) * shared_TD;
    };
  }
  const Dispatched dispatched = dispatcher_->dispatch(xs_TD, experts_TK, shared_first);
  const auto y_ND = experts(dispatched.x_ND, dispatched.rows_per_local_expert);
  // The routing weights scale partial outputs too: they enter the region.
  auto y_TD = dispatcher_->combine(y_ND, dispatched, region.scale(routing.weights_TK), shared_second);
  if (shared_expert) y_TD = y_TD + shared_TD;
  model::FeedForwardOutput out;
  out.y = region.out(y_TD.view(xs_BSD.sizes()));
  out.router_logits_TE = routing.logits_TE;
  out.tokens_per_expert_E = slots_per_expert(experts_TK, E + 1).narrow(0, 0, E);
  switch (config_.moe_router_load_balancing_type) {
    case LoadBalancingType::aux_loss: out.aux_loss = aux_loss(routing.probs_TE, experts_TK, E); break;
    case LoadBalancingType::seq_aux_loss: out.aux_loss = seq_aux_loss(routing.probs_TE, experts_TK, E, xw_BSD.size(1)); break;
    case LoadBalancingType::global_aux_loss:     // computed in model_loss from the global loads
    case LoadBalancingType::hf_pooled_aux_loss:  // computed over all layers in model_loss
    case LoadBalancingType::none: break;
  }
  if (config_.moe_z_loss_coeff > 0) out.z_loss = z_loss(routing.logits_TE);
  return out;
}

model::GPTModel build_model(const ModelConfig& config) {
  return model::GPTModel(config, [](const ModelConfig& c, int64_t layer) -> std::shared_ptr<model::FeedForward> {
    if (c.is_moe_layer(layer)) return std::make_shared<MoELayer>(c);
    return std::make_shared<model::DenseFeedForward>(c.hidden_size, *c.ffn_hidden_size);
  });
}

void update_expert_biases(model::GPTModelImpl& model, int64_t first_layer, int64_t end_layer, const torch::Tensor& load_LE) {
  const ModelConfig& c = model.config();
  if (!c.moe_router_enable_expert_bias) return;
  torch::Tensor on_device_LE;  // the loads are read to the host with the losses: one copy back, not a sync
  for (int64_t l = 0, n = 0; l < end_layer; ++l) {
    if (!c.is_moe_layer(l)) continue;
    if (l >= first_layer) {
      auto& bias_E = std::dynamic_pointer_cast<MoELayer>(model.layer(l).mlp)->gate->expert_bias;
      if (!on_device_LE.defined()) {
        on_device_LE = load_LE.device() == bias_E.device() ? load_LE : to_device(load_LE.contiguous(), bias_E.device());
      }
      update_expert_bias(bias_E, on_device_LE[n], c.moe_router_bias_update_rate);
    }
    ++n;
  }
}

}  // namespace moeforge::moe
