#include "core/model/recompute.h"

#include "core/model/gpt_model.h"

namespace moeforge::model {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// Which of the optional outputs a layer produced: known on the host when its forward returns.
struct Present {
  bool logits = false, aux = false, z = false;
};

// Outputs: y, router logits, aux loss, z loss, tokens per expert (absent ones are placeholders;
// `present` says which were produced).
struct LayerFunction : public torch::autograd::Function<LayerFunction> {
  static variable_list forward(AutogradContext* ctx, DecoderLayerImpl* layer, Present* present, const torch::Tensor& x,
                               const torch::Tensor& cos, const torch::Tensor& sin) {
    ctx->save_for_backward({x, cos, sin});
    ctx->saved_data["layer"] = reinterpret_cast<int64_t>(layer);
    FeedForwardOutput o;
    const auto y = layer->forward(x, cos, sin, o);
    const auto none = torch::zeros({}, x.options());
    ctx->saved_data["logits"] = o.router_logits_TE.has_value();
    ctx->saved_data["aux"] = o.aux_loss.has_value();
    ctx->saved_data["z"] = o.z_loss.has_value();
    const auto counts = o.tokens_per_expert_E.value_or(torch::zeros({0}, x.options().dtype(torch::kInt64)));
    *present = {o.router_logits_TE.has_value(), o.aux_loss.has_value(), o.z_loss.has_value()};
    ctx->mark_non_differentiable({counts});
    return {y, o.router_logits_TE.value_or(none), o.aux_loss.value_or(none), o.z_loss.value_or(none), counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto* layer = reinterpret_cast<DecoderLayerImpl*>(ctx->saved_data["layer"].toInt());
    const auto x = saved[0].detach().requires_grad_(true);
    FeedForwardOutput o;
    torch::Tensor y;
    {
      torch::AutoGradMode enable(true);
      y = layer->forward(x, saved[1], saved[2], o);
    }
    std::vector<torch::Tensor> outputs{y}, output_grads{grads[0]};
    if (ctx->saved_data["logits"].toBool()) outputs.push_back(*o.router_logits_TE), output_grads.push_back(grads[1]);
    if (ctx->saved_data["aux"].toBool()) outputs.push_back(*o.aux_loss), output_grads.push_back(grads[2]);
    if (ctx->saved_data["z"].toBool()) outputs.push_back(*o.z_loss), output_grads.push_back(grads[3]);
    torch::autograd::backward(outputs, output_grads);
    return {torch::Tensor(), torch::Tensor(), x.grad(), torch::Tensor(), torch::Tensor()};
  }
};

struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               bool gqa) {
    ctx->save_for_backward({q, k, v});
    ctx->saved_data["gqa"] = gqa;
    return causal_attention(q, k, v, gqa);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    std::vector<torch::Tensor> inputs;
    for (const auto& t : saved) inputs.push_back(t.detach().requires_grad_(true));
    torch::Tensor out;
    {
      torch::AutoGradMode enable(true);
      out = causal_attention(inputs[0], inputs[1], inputs[2], ctx->saved_data["gqa"].toBool());
    }
    const auto g = torch::autograd::grad({out}, inputs, {grads[0]});
    return {g[0], g[1], g[2], torch::Tensor()};
  }
};

}  // namespace

torch::Tensor checkpointed_layer(DecoderLayerImpl* layer, const torch::Tensor& x_BSD, const torch::Tensor& cos,
                                 const torch::Tensor& sin, FeedForwardOutput& ffn_out) {
  Present present;
  const auto out = LayerFunction::apply(layer, &present, x_BSD, cos, sin);
  ffn_out = FeedForwardOutput{};
  ffn_out.y = out[0];
  if (present.logits) {
    ffn_out.router_logits_TE = out[1];
    ffn_out.tokens_per_expert_E = out[4];
  }
  if (present.aux) ffn_out.aux_loss = out[2];
  if (present.z) ffn_out.z_loss = out[3];
  return out[0];
}

torch::Tensor checkpointed_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, bool gqa) {
  return AttentionFunction::apply(q, k, v, gqa);
}

}  // namespace moeforge::model
