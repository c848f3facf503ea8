#include "moe/expert_parallel.h"

#include "moe/moe_layer.h"

namespace moeforge::moe {

std::vector<std::shared_ptr<AllToAllDispatcher>> shard_experts(model::GPTModelImpl& model,
                                                               const std::shared_ptr<Communicator>& ep_group) {
  std::vector<std::shared_ptr<AllToAllDispatcher>> dispatchers;
  if (ep_group->size() == 1) return dispatchers;
  const ExpertPlacement placement(*model.config().num_experts, ep_group->size());
  torch::NoGradGuard no_grad;
  for (const auto& layer : *model.layers) {
    auto* decoder = layer->as<model::DecoderLayerImpl>();
    auto moe = decoder ? std::dynamic_pointer_cast<MoELayer>(decoder->mlp) : nullptr;
    if (!moe) continue;
    for (auto* w : {&moe->experts->gate_up_proj, &moe->experts->down_proj}) {
      // set_data keeps the parameter object (registered in the module, held by the optimizer).
      w->set_data(local_experts(*w, ep_group->rank(), ep_group->size()).clone());
    }
    auto dispatcher = std::make_shared<AllToAllDispatcher>(placement, ep_group);
    moe->set_dispatcher(dispatcher);
    dispatchers.push_back(std::move(dispatcher));
  }
  return dispatchers;
}

bool is_expert_parallel_parameter(std::string_view name) {
  return name.ends_with(".experts.gate_up_proj") || name.ends_with(".experts.down_proj");
}

void gather_expert_parallel(NamedTensors& tensors, Communicator& ep_group) {
  if (ep_group.size() == 1) return;
  for (auto& [name, t] : tensors) {
    if (is_expert_parallel_parameter(name)) t = ep_group.all_gather(t.contiguous());
  }
}

torch::Tensor local_experts(const torch::Tensor& full, int64_t ep_rank, int64_t ep_size) {
  const int64_t per_rank = full.size(0) / ep_size;
  return full.narrow(0, ep_rank * per_rank, per_rank);
}

}  // namespace moeforge::moe
