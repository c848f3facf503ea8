// defines: UpcycleMethod, SharedExpertInit, UpcycleOptions, DenseMLP, UpcycledLayer,
//          upcycle_layer, default_scale, combine_weights_sum_to_one, router_only_noop_reason
//
// Building a layer's MoE from a dense SwiGLU FFN (gate/up [I, D], down [D, I]); facts and
// invariants in docs/upcycling.md. An expert is a list of F dense neurons (a neuron = one row of
// gate and up and the matching column of down), or random rows where the method pads or
// re-initializes. The output scale s multiplies down_proj: exactly s times the expert's output for
// any activation (Megatron spreads s^(1/3) over the three matrices, exact only for ReLU-like units).
//
//   copy          every expert all I neurons (F = I)
//   split         the I neurons partitioned into E experts of F = I / E, contiguous or random
//                 (LLaMA-MoE's neuron-independent split)
//   granular      E / G copies, each split into G contiguous shards of F = I / G: expert e = shard
//                 e % G of copy e / G; router rows repeated G times; s = G by default (Megatron)
//   fine_grained  Qwen1.5-MoE: each copy shuffled along I and cut into S = round(I / F) slices of
//                 I / S neurons, padded with random rows or truncated to F; a fraction of each
//                 expert's neurons re-initialized; the shared expert from the dense FFN or random
// Shapes: Note [shape suffixes] (core/base/shapes.h).
#pragma once

#include "core/config/config.h"
#include "core/model/gpt_model.h"

#include <torch/torch.h>

#include <optional>
#include <string>
#include <vector>

namespace moeforge::moe {

enum class UpcycleMethod { copy, split, granular, fine_grained };
enum class SharedExpertInit { dense, random };

struct UpcycleOptions {
  UpcycleMethod method = UpcycleMethod::copy;
  uint64_t seed = 1234;
  bool random_split = false;       // split: random partition instead of contiguous blocks
  int64_t granularity = 1;         // granular: G
  std::optional<double> scale;     // expert output scale; default_scale() when absent
  double reinit_fraction = 0.0;    // fine_grained: share of each expert's neurons drawn anew
  SharedExpertInit shared_init = SharedExpertInit::dense;
  double router_std = 0.02;        // random router rows: normal(0, router_std)
  std::string router_from;         // warm boot: another MoE checkpoint's routers (empty = random)
};

double default_scale(const UpcycleOptions& options);

struct DenseMLP {
  torch::Tensor gate_ID, up_ID, down_DI;
};

struct UpcycledLayer {
  torch::Tensor gate_up_E2FD, down_EDF;           // the routed experts, stacked (our layout)
  torch::Tensor router_ED;                        // random (warm boot replaces it later)
  std::optional<DenseMLP> shared;                 // [Fs, D], [Fs, D], [D, Fs]
  torch::Tensor shared_gate_1D;                   // undefined without a shared-expert gate
  std::vector<std::vector<int64_t>> neurons_EF;   // per expert: its dense neurons, -1 = random row
  int64_t random_rows = 0;                        // padded or re-initialized neurons, all experts
};

// Throws UserError when the widths do not fit the method (e.g. split needs E * F = I).
// `generator` is advanced (seeded once per run, so layers differ).
UpcycledLayer upcycle_layer(const DenseMLP& dense, const ModelConfig& moe, const UpcycleOptions& options,
                            torch::Generator& generator);

// Whether a token's k combine weights always sum to one (renormalized top-k, or top-k of the
// logits then softmax), which makes copied experts reproduce the dense FFN exactly.
bool combine_weights_sum_to_one(const ModelConfig& config);

// Why training only the routers of this model can change nothing (identical experts in every MoE
// layer, combine weights summing to one, no aux or z loss: the LM loss gives the routers exactly
// zero gradient), or nullopt when it can. Reads the experts this process holds (under expert
// parallelism its block: a copy-upcycled model's blocks are all alike).
std::optional<std::string> router_only_noop_reason(model::GPTModelImpl& model, const ModelConfig& config,
                                                   const std::vector<std::string>& trainable_names);

}  // namespace moeforge::moe
