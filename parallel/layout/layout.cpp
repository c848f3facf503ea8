#include "parallel/layout/layout.h"

#include "core/base/checked_int.h"
#include "core/base/errors.h"

#include <fmt/format.h>


namespace moeforge {

namespace {

// The virtual stage holding `layer` (the last one for a layer past the end).
int64_t virtual_stage_of(const std::vector<int64_t>& layers, int64_t layer) {
  int64_t end = 0;
  for (size_t v = 0; v < layers.size(); ++v) {
    end += layers[v];
    if (layer < end) return static_cast<int64_t>(v);
  }
  return static_cast<int64_t>(layers.size()) - 1;
}

// Layers per virtual stage (interleaved: PP x V of them, evenly).
std::vector<int64_t> split_virtual(const ExperimentConfig& c, int64_t pp, int64_t vpp, std::vector<std::string>& problems) {
  const int64_t L = c.model.num_layers;
  if (pp == 1) {
    problems.push_back(fmt::format("parallel.virtual_pipeline_model_parallel_size {} interleaves model chunks over pipeline "
                                   "stages and needs parallel.pipeline_model_parallel_size > 1: set it to 1, or use PP > 1",
                                   vpp));
    return {};
  }
  if (c.parallel.decoder_first_pipeline_num_layers || c.parallel.decoder_last_pipeline_num_layers) {
    problems.push_back(
        "parallel.decoder_first/last_pipeline_num_layers (an uneven pipeline) cannot be combined with "
        "parallel.virtual_pipeline_model_parallel_size > 1 yet: remove them or set the virtual size to 1");
    return {};
  }
  const int64_t chunks = checked_product(pp, vpp);
  if (L % chunks != 0) {
    problems.push_back(fmt::format(
        "model.num_layers ({}) is not divisible by parallel.pipeline_model_parallel_size x "
        "virtual_pipeline_model_parallel_size ({} x {} = {} model chunks): choose degrees whose product divides {}",
        L, pp, vpp, chunks, L));
    return {};
  }
  return std::vector<int64_t>(static_cast<size_t>(chunks), L / chunks);
}

// Megatron's uneven pipeline: first/last stage sizes given, the rest split evenly.
std::vector<int64_t> split_layers(const ExperimentConfig& c, int64_t pp, std::vector<std::string>& problems) {
  const int64_t L = c.model.num_layers;
  const auto& first = c.parallel.decoder_first_pipeline_num_layers;
  const auto& last = c.parallel.decoder_last_pipeline_num_layers;
  if (!first && !last) {
    if (L % pp != 0) {
      problems.push_back(fmt::format(
          "model.num_layers ({}) is not divisible by parallel.pipeline_model_parallel_size ({}): choose a PP that "
          "divides {}, or give an uneven layout with parallel.decoder_first_pipeline_num_layers / "
          "decoder_last_pipeline_num_layers",
          L, pp, L));
      return {};
    }
    return std::vector<int64_t>(pp, L / pp);
  }
  if (pp == 1) {
    problems.push_back("parallel.decoder_first/last_pipeline_num_layers need parallel.pipeline_model_parallel_size > 1");
    return {};
  }
  std::vector<int64_t> layers(pp, 0);
  int64_t remaining = L;
  int64_t middle_stages = pp;
  if (first) {
    layers.front() = *first;
    remaining -= *first;
    --middle_stages;
  }
  if (last) {
    layers.back() = *last;
    remaining -= *last;
    --middle_stages;
  }
  if (middle_stages == 0) {
    if (remaining != 0) {
      problems.push_back(fmt::format("the uneven pipeline puts {} + {} layers on its 2 stages but model.num_layers is {}",
                                     first.value_or(0), last.value_or(0), L));
      return {};
    }
  } else if (remaining < 0 || remaining % middle_stages != 0) {
    problems.push_back(fmt::format(
        "uneven pipeline: {} layers remain after the first ({}) and last ({}) stages, which do not split evenly over "
        "the other {} stage(s) of parallel.pipeline_model_parallel_size {}",
        remaining, first ? fmt::to_string(*first) : "even", last ? fmt::to_string(*last) : "even", middle_stages, pp));
    return {};
  } else {
    for (size_t s = first ? 1 : 0; s < layers.size() - (last ? 1 : 0); ++s) layers[s] = remaining / middle_stages;
  }
  for (size_t s = 0; s < layers.size(); ++s) {
    if (layers[s] < 1) {
      problems.push_back(fmt::format("pipeline stage {} would hold {} layers; every stage needs at least one", s, layers[s]));
    }
  }
  return layers;
}

// Tensor parallelism splits heads and widths into TP equal parts, and keeps the whole model on
// every checkpoint's terms only in the whole format.
void check_tensor_parallel(const ExperimentConfig& c, int64_t tp, std::vector<std::string>& problems) {
  const ModelConfig& m = c.model;
  auto divisible = [&](const char* key, int64_t value, const char* what) {
    if (value % tp == 0) return;
    problems.push_back(fmt::format("model.{} {} is not divisible by parallel.tensor_model_parallel_size {}: every "
                                   "tensor-parallel rank holds the same share of the {}; choose a TP that divides {}",
                                   key, value, tp, what, value));
  };
  divisible("num_attention_heads", m.num_attention_heads, "attention heads");
  divisible("num_query_groups", m.num_query_groups.value_or(m.num_attention_heads), "key/value heads");
  bool any_dense = false;
  for (int64_t l = 0; l < m.num_layers; ++l) any_dense = any_dense || !m.is_moe_layer(l);
  if (any_dense && m.ffn_hidden_size) divisible("ffn_hidden_size", *m.ffn_hidden_size, "dense FFN width");
  if (m.moe_ffn_hidden_size) divisible("moe_ffn_hidden_size", *m.moe_ffn_hidden_size, "routed experts' width");
  if (m.moe_shared_expert_intermediate_size) {
    divisible("moe_shared_expert_intermediate_size", *m.moe_shared_expert_intermediate_size, "shared expert's width");
  }
  if (c.parallel.sequence_parallel && c.training.seq_length % tp != 0) {
    problems.push_back(fmt::format("training.seq_length {} is not divisible by parallel.tensor_model_parallel_size {}: "
                                   "parallel.sequence_parallel gives every tensor-parallel rank the same share of the "
                                   "sequence; choose a sequence length that is a multiple of {}, or set "
                                   "parallel.sequence_parallel: false",
                                   c.training.seq_length, tp, tp));
  }
  if (c.checkpoint.format == CheckpointFormat::sharded) {
    problems.push_back(fmt::format("checkpoint.format sharded does not split tensors over tensor-parallel ranks yet "
                                   "(parallel.tensor_model_parallel_size {}): use checkpoint.format whole",
                                   tp));
  }
}

}  // namespace

ParallelLayout ParallelLayout::create(const ExperimentConfig& c, int64_t world_size) {
  const int64_t pp = c.parallel.pipeline_model_parallel_size;
  const int64_t vpp = c.parallel.virtual_pipeline_model_parallel_size;
  const int64_t ep = c.parallel.expert_model_parallel_size;
  const int64_t tp = c.parallel.tensor_model_parallel_size;
  const int64_t mbs = c.training.micro_batch_size;
  const int64_t gbs = c.training.global_batch_size;
  std::vector<std::string> problems;
  if (world_size < 1) fail_user("world size must be at least 1, got {}", world_size);

  int64_t dp = 0;
  const int64_t pp_tp = checked_product(pp, tp);
  if (world_size % pp_tp != 0) {
    problems.push_back(
        tp == 1 ? fmt::format("world size {} is not divisible by parallel.pipeline_model_parallel_size {}: launch a "
                              "multiple of {} ranks",
                              world_size, pp, pp)
                : fmt::format("world size {} is not divisible by parallel.pipeline_model_parallel_size x "
                              "tensor_model_parallel_size ({} x {}): launch a multiple of {} ranks",
                              world_size, pp, tp, pp_tp));
  } else {
    dp = world_size / pp_tp;
  }
  if (tp > 1) check_tensor_parallel(c, tp, problems);
  if (dp > 0 && dp % ep != 0) {
    problems.push_back(fmt::format(
        "parallel.expert_model_parallel_size {} does not divide the data-parallel size {} (= world {} / PP {}{}): "
        "expert parallelism is folded into data parallelism, so EP must divide DP",
        ep, dp, world_size, pp, tp > 1 ? fmt::format(" / TP {}", tp) : std::string()));
  }
  if (c.model.num_experts) {
    if (*c.model.num_experts % ep != 0) {
      problems.push_back(fmt::format(
          "model.num_experts {} is not divisible by parallel.expert_model_parallel_size {}: every expert-parallel rank "
          "must hold the same number of experts",
          *c.model.num_experts, ep));
    }
  } else if (ep != 1) {
    problems.push_back(fmt::format("parallel.expert_model_parallel_size is {} but the model is dense "
                                   "(model.num_experts is null): set it to 1",
                                   ep));
  }
  if (c.parallel.world_size && *c.parallel.world_size != world_size) {
    problems.push_back(fmt::format("parallel.world_size is {} but the run has {} ranks: launch {} ranks, or remove "
                                   "parallel.world_size (or set it to {})",
                                   *c.parallel.world_size, world_size, *c.parallel.world_size, world_size));
  }
  if (pp > 1 && !c.model.untie_embeddings_and_output_weights) {
    problems.push_back(fmt::format(
        "pipeline parallel training needs untied embeddings (the embedding lives on the first stage, the head on the "
        "last), but model.untie_embeddings_and_output_weights is false: set it to true or use "
        "parallel.pipeline_model_parallel_size 1"));
  }
  if (pp > 1 && c.model.is_moe() && c.model.moe_router_load_balancing_type == LoadBalancingType::hf_pooled_aux_loss) {
    problems.push_back(fmt::format(
        "model.moe_router_load_balancing_type hf_pooled_aux_loss pools the router statistics of all layers, which "
        "pipeline stages do not share: with parallel.pipeline_model_parallel_size {} use aux_loss or seq_aux_loss "
        "(per layer, as Megatron)",
        pp));
  }
  std::vector<int64_t> layers = vpp > 1 ? split_virtual(c, pp, vpp, problems) : split_layers(c, pp, problems);
  int64_t micro_batches = 0;
  if (dp > 0) {
    const int64_t samples_per_micro_batch = checked_product(mbs, dp);
    if (gbs % samples_per_micro_batch != 0) {
      problems.push_back(fmt::format(
          "training.global_batch_size {} is not divisible by training.micro_batch_size {} x data-parallel size {} "
          "(= {}): choose a global batch that is a multiple of {}",
          gbs, mbs, dp, samples_per_micro_batch, samples_per_micro_batch));
    } else {
      micro_batches = gbs / samples_per_micro_batch;
    }
  }
  // The interleaved schedule runs the micro-batches in groups of PP through each chunk (Megatron's
  // requirement with the default group size).
  if (vpp > 1 && micro_batches > 0 && micro_batches % pp != 0) {
    problems.push_back(fmt::format(
        "the interleaved pipeline (parallel.virtual_pipeline_model_parallel_size {}) needs the micro-batches per step, "
        "training.global_batch_size / (micro_batch_size x DP) = {} / ({} x {}) = {}, to be a multiple of "
        "parallel.pipeline_model_parallel_size {}: choose a global batch that is a multiple of {}",
        vpp, gbs, mbs, dp, micro_batches, pp, checked_product(mbs, dp, pp)));
  }
  if (!problems.empty()) {
    std::string num_experts = c.model.num_experts ? fmt::to_string(*c.model.num_experts) : "dense";
    fail_user("impossible parallel layout:\n  - {}\nfactors: world={}, PP={}, VPP={}, TP={}, DP={}, EP={}, num_layers={}, "
              "num_experts={}, global_batch_size={}, micro_batch_size={}",
              fmt::join(problems, "\n  - "), world_size, pp, vpp, tp, dp > 0 ? fmt::to_string(dp) : "n/a", ep,
              c.model.num_layers, num_experts, gbs, mbs);
  }
  ParallelLayout layout;
  layout.world_ = world_size;
  layout.pp_ = pp;
  layout.tp_ = tp;
  layout.sp_ = c.parallel.sequence_parallel && tp > 1;
  layout.vpp_ = vpp;
  layout.dp_ = dp;
  layout.ep_ = ep;
  layout.micro_batches_ = micro_batches;
  layout.layers_per_virtual_stage_ = std::move(layers);
  layout.layers_per_stage_.assign(static_cast<size_t>(pp), 0);
  for (size_t v = 0; v < layout.layers_per_virtual_stage_.size(); ++v) {
    layout.layers_per_stage_[v % static_cast<size_t>(pp)] += layout.layers_per_virtual_stage_[v];
  }
  layout.num_experts_ = c.model.num_experts.value_or(0);
  return layout;
}

std::string format_layer_ranges(const std::vector<LayerRange>& ranges) {
  std::vector<std::string> parts;
  for (const auto& r : ranges) {
    parts.push_back(r.end - r.begin == 1 ? fmt::format("{}", r.begin) : fmt::format("{}-{}", r.begin, r.end - 1));
  }
  return fmt::format("{}", fmt::join(parts, ","));
}

std::vector<LayerRange> ParallelLayout::chunks(int64_t stage) const {
  std::vector<LayerRange> out;
  int64_t begin = 0;
  for (size_t v = 0; v < layers_per_virtual_stage_.size(); ++v) {
    const int64_t end = begin + layers_per_virtual_stage_[v];
    if (static_cast<int64_t>(v) % pp_ == stage) out.push_back({begin, end});
    begin = end;
  }
  return out;
}

int64_t ParallelLayout::stage_of_layer(int64_t layer) const { return virtual_stage_of(layers_per_virtual_stage_, layer) % pp_; }

int64_t ParallelLayout::chunk_of_layer(int64_t layer) const { return virtual_stage_of(layers_per_virtual_stage_, layer) / pp_; }

RankCoordinates ParallelLayout::coordinates(int64_t rank) const {
  RankCoordinates r;
  r.tp = rank % tp_;
  r.pp = rank / tp_ / dp_;
  r.dp = rank / tp_ % dp_;
  r.ep = r.dp % ep_;
  r.edp = r.dp / ep_;
  return r;
}

std::vector<int64_t> ParallelLayout::pipeline_group(int64_t rank) const {
  std::vector<int64_t> ranks;
  const RankCoordinates r = coordinates(rank);
  for (int64_t s = 0; s < pp_; ++s) ranks.push_back((s * dp_ + r.dp) * tp_ + r.tp);
  return ranks;
}

std::vector<int64_t> ParallelLayout::data_parallel_group(int64_t rank) const {
  std::vector<int64_t> ranks;
  const RankCoordinates r = coordinates(rank);
  for (int64_t d = 0; d < dp_; ++d) ranks.push_back((r.pp * dp_ + d) * tp_ + r.tp);
  return ranks;
}

std::vector<int64_t> ParallelLayout::expert_parallel_group(int64_t rank) const {
  const RankCoordinates r = coordinates(rank);
  std::vector<int64_t> ranks;
  for (int64_t e = 0; e < ep_; ++e) ranks.push_back((r.pp * dp_ + r.edp * ep_ + e) * tp_ + r.tp);
  return ranks;
}

std::vector<int64_t> ParallelLayout::expert_data_parallel_group(int64_t rank) const {
  const RankCoordinates r = coordinates(rank);
  std::vector<int64_t> ranks;
  for (int64_t j = 0; j < edp(); ++j) ranks.push_back((r.pp * dp_ + j * ep_ + r.ep) * tp_ + r.tp);
  return ranks;
}

std::vector<int64_t> ParallelLayout::tensor_parallel_group(int64_t rank) const {
  const RankCoordinates r = coordinates(rank);
  std::vector<int64_t> ranks;
  for (int64_t t = 0; t < tp_; ++t) ranks.push_back((r.pp * dp_ + r.dp) * tp_ + t);
  return ranks;
}

std::string ParallelLayout::describe() const {
  const std::string interleaved =
      vpp_ > 1 ? fmt::format(" in {} interleaved chunks of {}", vpp_, layers_per_virtual_stage_.front()) : std::string();
  const std::string tensor =
      tp_ > 1 ? fmt::format(" x TP {}{}", tp_, sp_ ? " (sequence-parallel)" : "") : std::string();
  return fmt::format("world {} = PP {} x DP {} (EP {} x expert-DP {}){}, layers per stage [{}]{}, {} micro-batches per step",
                     world_, pp_, dp_, ep_, edp(), tensor, fmt::join(layers_per_stage_, ", "), interleaved, micro_batches_);
}

}  // namespace moeforge
