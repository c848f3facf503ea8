#include "parallel/parallelize.h"

#include "core/base/errors.h"
#include "moe/moe_layer.h"

#include <fmt/format.h>

#include <unordered_map>

namespace moeforge {

namespace {

using Impl = const c10::TensorImpl*;

struct Where {
  int64_t stage = 0, chunk = 0;
  bool expert_parallel = false;
  TensorParallelCut tp;
  bool sequence_parallel = false;
};

// The tensor-parallel cuts of one decoder layer's weights, by module: column-parallel projections
// by their output rows, the row-parallel ones after them by their input columns.
void record_tensor_parallel_cuts(model::DecoderLayerImpl& layer, std::unordered_map<Impl, Where>& out) {
  auto cut = [&](const torch::Tensor& t, int64_t dim, bool halves = false) {
    if (t.defined()) out[t.unsafeGetTensorImpl()].tp = {dim, halves};
  };
  auto& attn = *layer.self_attn;
  for (const auto& proj : {attn.q_proj, attn.k_proj, attn.v_proj}) {
    cut(proj->weight, 0);
    cut(proj->bias, 0);
  }
  cut(attn.o_proj->weight, 1);
  if (auto* dense = dynamic_cast<model::DenseFeedForward*>(layer.mlp.get())) {
    cut(dense->gate_proj->weight, 0);
    cut(dense->up_proj->weight, 0);
    cut(dense->down_proj->weight, 1);
  } else if (auto* moe_layer = dynamic_cast<moe::MoELayer*>(layer.mlp.get())) {
    cut(moe_layer->experts->gate_up_proj, 1, true);  // [E, 2F, D]: gate rows, then up rows
    cut(moe_layer->experts->down_proj, 2);           // [E, D, F]
    if (moe_layer->shared_expert) {
      cut(moe_layer->shared_expert->gate_proj->weight, 0);
      cut(moe_layer->shared_expert->up_proj->weight, 0);
      cut(moe_layer->shared_expert->down_proj->weight, 1);
    }
  }
}

// This stage's blocks sum their partial outputs over the TP group; with sequence parallelism
// they take and give this rank's chunk of the sequence.
void install_tensor_parallel_regions(model::DecoderLayerImpl& layer, const std::shared_ptr<Communicator>& tp,
                                     bool sequence_parallel) {
  model::SplitRegion region;
  region.factor = [tp](const torch::Tensor& t) { return enter_tensor_parallel(t, tp); };
  if (sequence_parallel) {
    region.enter = [tp](const torch::Tensor& x) { return gather_sequence_parallel(x, tp); };
    region.leave = [tp](const torch::Tensor& y) { return scatter_sequence_parallel(y, tp); };
    region.whole = [tp](const torch::Tensor& x, const torch::Tensor& x_in) {
      return sequence_parallel_whole(x, x_in, tp->rank(), tp->size());
    };
  } else {
    region.enter = region.factor;
    region.leave = [tp](const torch::Tensor& y) { return leave_tensor_parallel(y, tp); };
  }
  layer.self_attn->region = region;
  if (auto* dense = dynamic_cast<model::DenseFeedForward*>(layer.mlp.get())) dense->region = region;
  if (auto* moe_layer = dynamic_cast<moe::MoELayer*>(layer.mlp.get())) moe_layer->region = region;
}

// Every parameter's stage and chunk, and whether it is a stacked expert weight, keyed by tensor
// identity: read off the modules that hold them.
std::unordered_map<Impl, Where> placement_by_tensor(model::GPTModelImpl& model, const ParallelLayout& layout) {
  std::unordered_map<Impl, Where> out;
  const bool sp = layout.sequence_parallel();
  for (const auto& p : model.embed_tokens->parameters()) out[p.unsafeGetTensorImpl()] = {0, 0, false, {}, sp};
  for (int64_t i = 0; i < model.config().num_layers; ++i) {
    auto& layer = model.layer(i);
    const int64_t stage = layout.stage_of_layer(i), chunk = layout.chunk_of_layer(i);
    for (const auto& p : layer.parameters()) out[p.unsafeGetTensorImpl()] = {stage, chunk, false, {}, false};
    for (const auto& w : layer.mlp->stacked_expert_weights()) out[w.unsafeGetTensorImpl()] = {stage, chunk, true, {}, false};
    for (const auto& norm : {layer.input_layernorm, layer.post_attention_layernorm}) {
      for (const auto& p : norm->parameters()) out[p.unsafeGetTensorImpl()].sequence_parallel = sp;
    }
    if (layout.tp() > 1) record_tensor_parallel_cuts(layer, out);
  }
  const Where last{layout.pp() - 1, layout.vpp() - 1, false, {}, sp};
  for (const auto& p : model.norm->parameters()) out[p.unsafeGetTensorImpl()] = last;
  if (model.lm_head) {
    for (const auto& p : model.lm_head->parameters()) out[p.unsafeGetTensorImpl()] = last;
  }
  return out;
}

}  // namespace

ModelPartition::ModelPartition(model::GPTModelImpl& model, const ParallelLayout& layout) : layout_(layout) {
  const auto by_tensor = placement_by_tensor(model, layout);
  for (const auto& item : model.named_parameters()) {
    const auto it = by_tensor.find(item.value().unsafeGetTensorImpl());
    if (it == by_tensor.end()) {
      throw std::logic_error(fmt::format("ModelPartition: parameter {} belongs to no module it knows", item.key()));
    }
    index_.emplace(item.key(), parameters_.size());
    const Where& w = it->second;
    parameters_.push_back(
        {item.key(), item.value().sizes().vec(), w.stage, w.chunk, w.expert_parallel, w.tp, w.sequence_parallel});
  }
}

bool ModelPartition::contains(std::string_view name) const {
  return index_.contains(std::string(optimizer_state_parameter(name)));
}

const ParameterPlacement& ModelPartition::at(std::string_view name) const {
  const auto it = index_.find(std::string(optimizer_state_parameter(name)));
  if (it == index_.end()) fail_user("tensor {} is not part of the configured model (nor the state of a parameter of it)", name);
  return parameters_[it->second];
}

torch::Tensor ModelPartition::local_part(std::string_view name, const torch::Tensor& whole, int64_t ep_rank,
                                         int64_t tp_rank) const {
  const ParameterPlacement& where = at(name);
  const auto experts = where.expert_parallel && layout_.ep() > 1
                           ? whole.narrow(0, first_expert(ep_rank), layout_.experts_per_rank())
                           : whole;
  return tensor_parallel_part(experts, where.tp, tp_rank, layout_.tp());
}

NamedTensors ModelShard::parameters(model::GPTModelImpl& model) const {
  NamedTensors out;
  for (auto& item : model.named_parameters()) {
    if (holds(item.key())) out.emplace_back(item.key(), item.value());
  }
  return out;
}

std::vector<TrainableParameter> ModelShard::trainable(std::vector<TrainableParameter> chosen) const {
  std::erase_if(chosen, [&](const TrainableParameter& p) {
    if (holds(p.name)) return false;
    p.param.set_requires_grad(false);
    return true;
  });
  for (auto& p : chosen) {
    const auto& where = partition.at(p.name);
    p.expert_parallel = where.expert_parallel;
    p.tensor_parallel = where.tp.splits();
    p.sequence_parallel = where.sequence_parallel;
  }
  return chosen;
}

ModelShard parallelize_model(model::GPTModelImpl& model, const ParallelLayout& layout, const ProcessGroups& groups,
                             bool overlap_comm) {
  ModelShard shard{ModelPartition(model, layout), layout.coordinates(groups.world->rank()), {}, {}};
  shard.chunks = layout.chunks(shard.at.pp);
  torch::NoGradGuard no_grad;
  for (auto& item : model.named_parameters()) {
    auto& p = item.value();
    const ParameterPlacement& where = shard.partition.at(item.key());
    if (where.stage != shard.at.pp) {
      // set_data keeps the parameter object (registered in its module); nothing is held for it.
      p.set_data(torch::empty({0}, p.options()));
      p.set_requires_grad(false);
    } else if ((where.expert_parallel && layout.ep() > 1) || where.tp.splits()) {
      const auto mine = shard.partition.local_part(item.key(), p, shard.at.ep, shard.at.tp);
      p.set_data(p.is_meta() ? torch::empty(mine.sizes(), p.options()) : mine.clone());
    }
  }
  if (layout.tp() > 1) {
    for (const auto& chunk : shard.chunks) {
      for (int64_t i = chunk.begin; i < chunk.end; ++i) install_tensor_parallel_regions(model.layer(i), groups.tp, layout.sequence_parallel());
    }
  }
  // This stage's MoE layers exchange their tokens with the other EP ranks.
  for (int64_t i = 0; i < model.config().num_layers; ++i) {
    if (!model.config().is_moe_layer(i)) continue;
    std::shared_ptr<AllToAllDispatcher> dispatcher;
    if (layout.ep() > 1 && layout.stage_of_layer(i) == shard.at.pp) {
      dispatcher = std::make_shared<AllToAllDispatcher>(*model.config().num_experts, groups.ep, overlap_comm);
      std::dynamic_pointer_cast<moe::MoELayer>(model.layer(i).mlp)->set_dispatcher(dispatcher);
    }
    shard.dispatchers.push_back(std::move(dispatcher));
  }
  return shard;
}

void init_shard(model::GPTModelImpl& model, const ModelShard& shard, const torch::TensorOptions& options, uint64_t seed) {
  model::materialize(model, options);
  for (auto& [name, p] : shard.parameters(model)) {
    const auto& where = shard.partition.at(name);
    const auto first = where.expert_parallel ? std::optional<int64_t>(shard.partition.first_expert(shard.at.ep)) : std::nullopt;
    if (!where.tp.splits()) {
      model::init_megatron_parameter(model.config(), name, p, seed, first);
      continue;
    }
    // The whole tensor (this EP rank's experts of an expert weight) drawn as one process draws
    // it, then this TP rank's part kept: one parameter at a time.
    auto shape = where.shape;
    if (where.expert_parallel) shape[0] = shard.partition.layout().experts_per_rank();
    auto whole = torch::empty(shape, torch::kFloat32);  // host: drawn by the CPU generator
    model::init_megatron_parameter(model.config(), name, whole, seed, first);
    torch::NoGradGuard no_grad;
    p.copy_(tensor_parallel_part(whole, where.tp, shard.at.tp, shard.partition.layout().tp()));
  }
}

void gather_tensor_parallel(NamedTensors& tensors, const ModelPartition& partition, Communicator& tp_group, bool keep) {
  if (tp_group.size() == 1) return;
  for (auto& [name, t] : tensors) {
    const auto& cut = partition.at(name).tp;
    if (!cut.splits()) continue;
    const auto parts = tp_group.all_gather(t.contiguous().unsqueeze(0)).unbind(0);
    t = keep ? tensor_parallel_join(std::vector<torch::Tensor>(parts.begin(), parts.end()), cut) : torch::Tensor();
  }
  if (!keep) tensors.clear();
}

void gather_expert_parallel(NamedTensors& tensors, const ModelPartition& partition, Communicator& ep_group, bool keep) {
  if (ep_group.size() == 1) return;
  for (auto& [name, t] : tensors) {
    if (!partition.at(name).expert_parallel) continue;
    const auto all = ep_group.all_gather(t.contiguous());
    t = keep ? all : torch::Tensor();
  }
  if (!keep) tensors.clear();
}

}  // namespace moeforge
