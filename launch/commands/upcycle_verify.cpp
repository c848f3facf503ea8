// `moeforge upcycle --verify`: what must hold for an upcycled model, measured (docs/upcycling.md,
// "Exact invariants").
#include "launch/commands/upcycle_command.h"

#include "moe/moe_layer.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>

namespace moeforge {

namespace {

constexpr double kExact = 1e-5;  // relative: float reassociation only

double relative(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a - b).norm() / std::max(b.norm().item<double>(), 1e-30)).item<double>();
}

torch::Tensor swiglu(const torch::Tensor& x_TD, const torch::Tensor& gate_FD, const torch::Tensor& up_FD,
                     const torch::Tensor& down_DF) {
  return torch::matmul(torch::silu(torch::matmul(x_TD, gate_FD.t())) * torch::matmul(x_TD, up_FD.t()), down_DF.t());
}

torch::Tensor expert_out(const moe::MoELayer& layer, int64_t e, const torch::Tensor& x_TD) {
  const auto gu = layer.experts->gate_up_proj[e];
  const int64_t F = gu.size(0) / 2;
  return swiglu(x_TD, gu.narrow(0, 0, F), gu.narrow(0, F, F), layer.experts->down_proj[e]);
}

std::shared_ptr<moe::MoELayer> moe_layer(model::GPTModelImpl& m, int64_t l) {
  return std::dynamic_pointer_cast<moe::MoELayer>(m.layers->ptr<model::DecoderLayerImpl>(static_cast<size_t>(l))->mlp);
}

}  // namespace

bool verify_upcycled(model::GPTModelImpl& dense, model::GPTModelImpl& moe, const ModelConfig& c,
                     const moe::UpcycleOptions& o) {
  torch::NoGradGuard no_grad;
  bool ok = true;
  auto report = [&](const std::string& claim, double measured, bool exact) {
    const bool pass = !exact || measured <= kExact;
    ok = ok && pass;
    spdlog::info("verify: {}: relative difference {:.3e}{}", claim, measured,
                 exact ? (pass ? " <= 1e-5: holds" : " > 1e-5: FAILS") : " (no exact invariant; for information)");
  };
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 1);
  const double scale = moe::default_scale(o);
  const bool copies = o.method == moe::UpcycleMethod::copy || o.method == moe::UpcycleMethod::granular;
  double worst = 0, mean_weight_sum = 0;
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    if (!c.is_moe_layer(l)) continue;
    const auto layer = moe_layer(moe, l);
    const std::string p = fmt::format("layers.{}.mlp.", l);
    const auto params = dense.named_parameters();
    const auto dense_out = [&](const torch::Tensor& x) {
      return swiglu(x, params[p + "gate_proj.weight"], params[p + "up_proj.weight"], params[p + "down_proj.weight"]);
    };
    const auto x_TD = torch::randn({64, c.hidden_size}, gen);
    if (copies) {
      // Routed part = sum over the k slots of weight x expert = (sum of the weights) x dense FFN.
      const auto r = layer->gate->forward(x_TD);
      auto routed = torch::zeros_like(x_TD);
      for (int64_t k = 0; k < r.experts_TK.size(1); ++k) {
        for (int64_t t = 0; t < x_TD.size(0); ++t) {
          const int64_t e = r.experts_TK[t][k].item<int64_t>();
          routed[t] += r.weights_TK[t][k] * expert_out(*layer, e, x_TD[t].unsqueeze(0))[0];
        }
      }
      const auto weight_sum_T1 = r.weights_TK.sum(1, true);
      mean_weight_sum += weight_sum_T1.mean().item<double>();
      worst = std::max(worst, relative(routed, weight_sum_T1 * dense_out(x_TD)));
    } else if (o.method == moe::UpcycleMethod::split) {
      // Every expert at unit weight: the experts' neurons add up to the dense FFN (times the scale).
      auto sum = torch::zeros_like(x_TD);
      for (int64_t e = 0; e < *c.num_experts; ++e) sum += expert_out(*layer, e, x_TD);
      worst = std::max(worst, relative(sum, scale * dense_out(x_TD)));
    }
    ++moe_layers;
  }
  if (copies) {
    report("each MoE layer's routed experts = (sum of the k combine weights) x dense FFN", worst, true);
    if (!moe::combine_weights_sum_to_one(c)) {
      spdlog::info("verify: routing is not renormalized (softmax over all {} experts, then top-{}): the routed part is "
                   "the dense FFN scaled by the selected probabilities, on average {:.4f} here (about k/E = {:.4f} for "
                   "a small router)",
                   *c.num_experts, c.moe_router_topk, mean_weight_sum / static_cast<double>(std::max<int64_t>(moe_layers, 1)),
                   static_cast<double>(c.moe_router_topk) / static_cast<double>(*c.num_experts));
    }
  } else if (o.method == moe::UpcycleMethod::split) {
    report(fmt::format("sum of all experts at unit weight = {} x dense FFN", scale), worst, true);
  }
  // Whole-model logits on sample tokens: equal exactly when every MoE layer is the dense FFN.
  const int64_t B = 2, S = 16;
  const auto tokens = torch::randint(0, c.vocab_size, {B, S}, gen);
  const auto positions = torch::arange(S).unsqueeze(0).expand({B, S});
  const auto dense_logits = dense.forward(tokens, positions).logits_BSV;
  const auto moe_logits = moe.forward(tokens, positions).logits_BSV;
  const bool exact = copies && moe::combine_weights_sum_to_one(c) && std::abs(scale - (o.method == moe::UpcycleMethod::granular
                                                                               ? static_cast<double>(o.granularity)
                                                                               : 1.0)) < 1e-12 &&
                     !c.moe_shared_expert_intermediate_size;
  std::string claim = "MoE logits = dense logits on 2 x 16 sample tokens";
  if (!exact) {
    claim += c.moe_shared_expert_intermediate_size ? " (a shared expert adds its own output)"
             : copies                             ? " (weights do not sum to one)"
                                                  : " (experts are parts of the FFN)";
  }
  report(claim, relative(moe_logits, dense_logits), exact);
  spdlog::info("verify: {}", ok ? "every exact invariant of this method holds" : "an exact invariant FAILS: do not train from this checkpoint");
  return ok;
}

}  // namespace moeforge
