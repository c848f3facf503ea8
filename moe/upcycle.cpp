#include "moe/upcycle.h"

#include "core/base/errors.h"
#include "moe/moe_layer.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace moeforge::moe {

namespace {

std::vector<int64_t> range(int64_t begin, int64_t end) {
  std::vector<int64_t> v;
  for (int64_t i = begin; i < end; ++i) v.push_back(i);
  return v;
}

std::vector<int64_t> permutation(int64_t n, torch::Generator& gen) {
  const auto p = torch::randperm(n, gen, torch::kInt64);
  return {p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + n};
}

// Gate/up rows and down columns of `neurons` (-1 = a random row: normal(0, std), down scaled as
// Megatron's output projections).
DenseMLP gather(const DenseMLP& d, const std::vector<int64_t>& neurons, double std_in, double std_out,
                torch::Generator& gen) {
  const int64_t F = static_cast<int64_t>(neurons.size()), D = d.gate_ID.size(1);
  DenseMLP out{torch::empty({F, D}), torch::empty({F, D}), torch::empty({D, F})};
  for (int64_t f = 0; f < F; ++f) {
    const int64_t n = neurons[static_cast<size_t>(f)];
    if (n >= 0) {
      out.gate_ID[f] = d.gate_ID[n];
      out.up_ID[f] = d.up_ID[n];
      out.down_DI.select(1, f) = d.down_DI.select(1, n);
    } else {
      out.gate_ID[f] = torch::normal(0.0, std_in, {D}, gen);
      out.up_ID[f] = torch::normal(0.0, std_in, {D}, gen);
      out.down_DI.select(1, f) = torch::normal(0.0, std_out, {D}, gen);
    }
  }
  return out;
}

// Each expert's neurons, per method.
std::vector<std::vector<int64_t>> expert_neurons(int64_t I, int64_t E, int64_t F, const UpcycleOptions& o,
                                                 torch::Generator& gen) {
  std::vector<std::vector<int64_t>> out;
  switch (o.method) {
    case UpcycleMethod::copy:
      if (F != I) {
        fail_user("upcycle --method copy makes every expert the whole dense FFN: model.moe_ffn_hidden_size must be the "
                  "dense intermediate size {}, the config says {}. Set it, or use --method split / fine_grained.",
                  I, F);
      }
      for (int64_t e = 0; e < E; ++e) out.push_back(range(0, I));
      break;
    case UpcycleMethod::split: {
      if (E * F != I) {
        fail_user("upcycle --method split partitions the dense FFN's {} neurons into {} experts: model.moe_ffn_hidden_size "
                  "must be {} / {} (the config says {}).",
                  I, E, I, E, F);
      }
      const auto order = o.random_split ? permutation(I, gen) : range(0, I);
      for (int64_t e = 0; e < E; ++e) {
        std::vector<int64_t> mine(order.begin() + e * F, order.begin() + (e + 1) * F);
        std::sort(mine.begin(), mine.end());
        out.push_back(mine);
      }
      break;
    }
    case UpcycleMethod::granular: {
      const int64_t G = o.granularity;
      if (G < 1 || E % G != 0 || G * F != I) {
        fail_user("upcycle --method granular --granularity {}: G must divide model.num_experts ({}) and G x "
                  "model.moe_ffn_hidden_size ({} x {}) must be the dense intermediate size {}.",
                  G, E, G, F, I);
      }
      for (int64_t e = 0; e < E; ++e) out.push_back(range((e % G) * F, (e % G + 1) * F));
      break;
    }
    case UpcycleMethod::fine_grained: {
      const int64_t S = std::max<int64_t>(1, std::llround(static_cast<double>(I) / static_cast<double>(F)));
      const int64_t width = I / S;
      std::vector<int64_t> order;
      for (int64_t e = 0; e < E; ++e) {
        if (e % S == 0) order = permutation(I, gen);  // a fresh shuffled copy of the FFN
        const int64_t j = e % S;
        std::vector<int64_t> mine(order.begin() + j * width, order.begin() + j * width + std::min(width, F));
        mine.resize(static_cast<size_t>(F), -1);  // pad with random rows
        if (o.reinit_fraction > 0) {
          const auto n = std::llround(o.reinit_fraction * static_cast<double>(F));
          const auto pick = permutation(F, gen);
          for (int64_t k = 0; k < n; ++k) mine[static_cast<size_t>(pick[static_cast<size_t>(k)])] = -1;
        }
        out.push_back(mine);
      }
      break;
    }
  }
  return out;
}

}  // namespace

double default_scale(const UpcycleOptions& o) {
  if (o.scale) return *o.scale;
  return o.method == UpcycleMethod::granular ? static_cast<double>(o.granularity) : 1.0;
}

UpcycledLayer upcycle_layer(const DenseMLP& dense, const ModelConfig& moe, const UpcycleOptions& o,
                            torch::Generator& gen) {
  torch::NoGradGuard no_grad;
  const int64_t I = dense.gate_ID.size(0), D = dense.gate_ID.size(1);
  const int64_t E = *moe.num_experts, F = *moe.moe_ffn_hidden_size;
  const double std_in = moe.init_method_std;
  const double std_out = moe.init_method_std / std::sqrt(2.0 * static_cast<double>(moe.num_layers));
  if (o.method == UpcycleMethod::granular && moe.moe_router_topk % o.granularity != 0) {
    fail_user("upcycle --method granular --granularity {}: model.moe_router_topk ({}) must be a multiple of G so the G "
              "shards of a chosen copy are chosen together (Megatron multiplies top-k by G).",
              o.granularity, moe.moe_router_topk);
  }
  UpcycledLayer out;
  out.neurons_EF = expert_neurons(I, E, F, o, gen);
  const double scale = default_scale(o);
  out.gate_up_E2FD = torch::empty({E, 2 * F, D});
  out.down_EDF = torch::empty({E, D, F});
  for (int64_t e = 0; e < E; ++e) {
    const auto& neurons = out.neurons_EF[static_cast<size_t>(e)];
    out.random_rows += std::count(neurons.begin(), neurons.end(), int64_t{-1});
    const DenseMLP x = gather(dense, neurons, std_in, std_out, gen);
    out.gate_up_E2FD[e] = torch::cat({x.gate_ID, x.up_ID}, 0);
    out.down_EDF[e] = x.down_DI * scale;
  }
  // Router: normal(0, router_std); granular repeats each of E / G rows G times so a copy's shards
  // tie and are chosen together.
  const int64_t G = o.method == UpcycleMethod::granular ? o.granularity : 1;
  out.router_ED = torch::normal(0.0, o.router_std, {E / G, D}, gen).repeat_interleave(G, 0);
  if (moe.moe_shared_expert_intermediate_size) {
    const int64_t Fs = *moe.moe_shared_expert_intermediate_size;
    std::vector<int64_t> neurons(static_cast<size_t>(Fs), -1);
    if (o.shared_init == SharedExpertInit::dense) {
      for (int64_t f = 0; f < std::min(Fs, I); ++f) neurons[static_cast<size_t>(f)] = f;
    }
    out.shared = gather(dense, neurons, std_in, std_out, gen);
    if (moe.moe_shared_expert_gate) out.shared_gate_1D = torch::normal(0.0, std_in, {1, D}, gen);
  }
  return out;
}

bool combine_weights_sum_to_one(const ModelConfig& c) { return !c.moe_router_pre_softmax || c.moe_router_norm_topk_prob; }

std::optional<std::string> router_only_noop_reason(model::GPTModelImpl& m, const ModelConfig& c,
                                                   const std::vector<std::string>& trainable) {
  if (!c.is_moe() || trainable.empty()) return std::nullopt;
  for (const auto& name : trainable) {
    if (!name.ends_with(".mlp.gate.weight")) return std::nullopt;
  }
  if (!combine_weights_sum_to_one(c) || c.moe_aux_loss_coeff != 0 || c.moe_z_loss_coeff != 0) return std::nullopt;
  torch::NoGradGuard no_grad;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    for (const auto& w : m.layer(l).mlp->stacked_expert_weights()) {
      if (w.size(0) > 1 && !torch::equal(w, w.narrow(0, 0, 1).expand_as(w))) return std::nullopt;
    }
  }
  return fmt::format("only the routers train, every MoE layer's {} experts are identical (copy-upcycled), the combine "
                     "weights sum to one and moe_aux_loss_coeff and moe_z_loss_coeff are 0: the LM loss gives the "
                     "routers exactly zero gradient, so this run cannot change the model. Set "
                     "model.moe_aux_loss_coeff (or z-loss), or also train the experts.",
                     *c.num_experts);
}

}  // namespace moeforge::moe
