// defines: shard_experts, is_expert_parallel_parameter, gather_expert_parallel
//
// Turns a model built whole (every rank initializes or loads the same full model, so expert
// parallel training starts from exactly the single-process weights) into this EP rank's shard:
// each MoE layer keeps its num_experts / EP experts (ExpertPlacement's contiguous blocks) and
// routes through an AllToAllDispatcher over the EP group. The model code itself is unchanged.
#pragma once

#include "core/gpt_model.h"
#include "core/safetensors.h"
#include "moe/alltoall_dispatcher.h"
#include "moe/expert_placement.h"
#include "parallel/communicator.h"

#include <memory>
#include <string_view>
#include <vector>

namespace moeforge::moe {

// Keeps EP rank `ep_group->rank()`'s experts in every MoE layer (parameters narrowed in place,
// so references to them stay valid) and installs the all-to-all dispatcher. Returns the
// dispatchers in layer order (their statistics feed the training log). With an EP group of one
// the model is left as is and nothing is returned.
std::vector<std::shared_ptr<AllToAllDispatcher>> shard_experts(model::GPTModelImpl& model,
                                                               const std::shared_ptr<Communicator>& ep_group);

// True for the stacked routed-expert weights (`...mlp.experts.gate_up_proj` / `down_proj`), and
// for optimizer state named after them (`exp_avg.<name>`): the tensors split over EP ranks.
bool is_expert_parallel_parameter(std::string_view name);

// Every expert-parallel tensor of `tensors` gathered over the EP group into all experts, in
// global expert order (collective over the group; other tensors pass through).
void gather_expert_parallel(NamedTensors& tensors, Communicator& ep_group);

// EP rank `ep_rank`'s block of a full expert tensor (dim 0 = experts).
torch::Tensor local_experts(const torch::Tensor& full, int64_t ep_rank, int64_t ep_size);

}  // namespace moeforge::moe
