// defines: ParameterPlacement, ModelPartition, ModelShard, parallelize_model, init_shard,
//          gather_expert_parallel, gather_tensor_parallel
//
// Parallelism is applied to a built model in one place (torchtitan's parallelize_fn), by the
// model's structure, never by parsing names: the embedding lives on the first pipeline stage (in
// its first model chunk), decoder layer i on the stage and chunk the layout gives it, the final
// norm and the head on the last stage (in its last chunk); the
// stacked routed-expert weights of each MoE layer (FeedForward::stacked_expert_weights) are split
// over the expert-parallel ranks in contiguous blocks of layout.experts_per_rank() experts
// (Megatron-Core's placement), and those layers dispatch through the all-to-all. Under tensor
// parallelism each attention's heads, each FFN's width and each expert's width are split over the
// TP ranks (parallel/tensor_parallel.h), and the blocks' SplitRegions sum over the TP group;
// with sequence parallelism they all-gather the sequence on entry and reduce-scatter it on exit.
//
// ModelPartition is the one name -> (stage, expert-parallel) map: sharded checkpoints, convert
// and the optimizer's reduction groups read it. It is derived from a model whose parameters still
// have their whole shapes; models are built on the meta device, so this costs no memory and works
// for any layout (convert builds one for the layout it writes).
//
// The order at start-up: build on the meta device -> parallelize_model (this rank keeps its
// stage and its experts, still unallocated) -> materialize (allocates only those) -> init_shard
// or a checkpoint load. No rank ever holds the whole model, and every rank's values equal the
// single-process run's (each parameter's, and each expert's, random stream comes from its name).
#pragma once

#include "core/model/gpt_model.h"
#include "core/files/safetensors.h"
#include "core/optim/optimizer.h"
#include "parallel/alltoall_dispatcher.h"
#include "parallel/layout/layout.h"
#include "parallel/comm/process_groups.h"
#include "parallel/tensor_parallel.h"

#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace moeforge {

struct ParameterPlacement {
  std::string name;
  std::vector<int64_t> shape;    // whole: every expert
  int64_t stage = 0;             // the pipeline stage holding it
  int64_t chunk = 0;             // its model chunk on that stage (0 unless interleaved)
  bool expert_parallel = false;  // dim 0 = experts, split over the EP ranks
  TensorParallelCut tp;          // how it is split over the TP ranks (not at all with TP 1)
  // Sequence parallelism: whole on every TP rank and used outside the split regions, on this
  // rank's chunk of the sequence (norms, the embedding, the head), so its gradient is partial:
  // summed over the TP ranks before the update (Megatron's sequence_parallel attribute).
  bool sequence_parallel = false;
};

class ModelPartition {
 public:
  ModelPartition(model::GPTModelImpl& model, const ParallelLayout& layout);

  const ParallelLayout& layout() const { return layout_; }
  const std::vector<ParameterPlacement>& parameters() const { return parameters_; }
  bool contains(std::string_view name) const;
  // The placement of a parameter, or of the parameter an optimizer-state tensor belongs to
  // (exp_avg.<name>, exp_avg_sq.<name>, master.<name>). UserError for a name the model lacks.
  const ParameterPlacement& at(std::string_view name) const;
  // The part of tensor `name` given whole that EP rank `ep_rank` and TP rank `tp_rank` hold: its
  // experts of an expert weight, cut by its tensor-parallel cut (a view where it can be).
  torch::Tensor local_part(std::string_view name, const torch::Tensor& whole, int64_t ep_rank, int64_t tp_rank = 0) const;
  // The global index of EP rank `ep_rank`'s first expert.
  int64_t first_expert(int64_t ep_rank) const { return ep_rank * layout_.experts_per_rank(); }

 private:
  ParallelLayout layout_;
  std::vector<ParameterPlacement> parameters_;
  std::unordered_map<std::string, size_t> index_;
};

// What parallelize_model made of the model on this rank.
struct ModelShard {
  ModelPartition partition;
  RankCoordinates at;
  std::vector<LayerRange> chunks;  // this stage's decoder layers, one range per model chunk
  // One per MoE layer of the model, in layer order: the all-to-all of this stage's layers under
  // expert parallelism, null otherwise (other stages' layers, or EP 1).
  std::vector<std::shared_ptr<AllToAllDispatcher>> dispatchers;

  bool holds(std::string_view name) const { return partition.at(name).stage == at.pp; }
  // This rank's parameters: its stage's, with its block of each expert weight; in model order.
  NamedTensors parameters(model::GPTModelImpl& model) const;
  // Of the parameters chosen to train (named as in the whole model), those this rank holds, each
  // marked with how it is split (expert-, tensor-, sequence-parallel: what the optimizer reduces it
  // over); the others are frozen (another stage's: they neither train nor count in this rank's
  // gradient norm) and dropped.
  std::vector<TrainableParameter> trainable(std::vector<TrainableParameter> chosen) const;
};

// Applies `layout` to `model` (built whole, normally still on the meta device): other stages'
// parameters become empty and frozen, each expert weight keeps this EP rank's block, each
// tensor-parallel weight this TP rank's part, this stage's MoE layers dispatch through an
// all-to-all over groups.ep and its blocks sum their partial outputs over groups.tp. A parameter already
// allocated is cut (its values kept); one on the meta device stays unallocated.
// `overlap_comm` (parallel.overlap_comm): the all-to-alls overlap the shared expert.
ModelShard parallelize_model(model::GPTModelImpl& model, const ParallelLayout& layout, const ProcessGroups& groups,
                             bool overlap_comm);

// Materialises this rank's parameters with `options` (fp32, the run's device) and gives them
// Megatron's initialisation from `seed`: the values of the same parameters (and experts) of the
// whole model initialised on one process.
void init_shard(model::GPTModelImpl& model, const ModelShard& shard, const torch::TensorOptions& options, uint64_t seed);

// Every expert-parallel tensor of `tensors` (parameters or their optimizer state, this rank's
// experts) gathered over the EP group into all experts, in global expert order; other tensors
// pass through. Collective over `ep_group`. With `keep` false the caller needs no result (it is
// not the rank that writes): each tensor is dropped as soon as its gather is done, and `tensors`
// ends empty, so the rank never holds more than one gathered tensor.
void gather_expert_parallel(NamedTensors& tensors, const ModelPartition& partition, Communicator& ep_group,
                            bool keep = true);

// Every tensor-parallel tensor of `tensors` (parameters or their optimizer state, this rank's
// parts) joined over the TP group into its whole; other tensors pass through. Collective over
// `tp_group`; `keep` as above.
void gather_tensor_parallel(NamedTensors& tensors, const ModelPartition& partition, Communicator& tp_group,
                            bool keep = true);

}  // namespace moeforge
