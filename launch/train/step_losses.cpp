#include "launch/train/step_losses.h"

#include "core/device/host_sync.h"

#include <algorithm>

namespace moeforge {

StepLosses::StepLosses(torch::Device device)
    : losses_(torch::zeros({4}, torch::TensorOptions().dtype(torch::kFloat64).device(device))) {}

StepLosses::StepLosses(const ModelConfig& c, const std::vector<LayerRange>& chunks, torch::Device device)
    : StepLosses(device) {
  const int64_t moe_layers = c.num_moe_layers();
  if (moe_layers == 0) return;
  load_LE_ = torch::zeros({moe_layers, c.num_experts.value_or(1)},
                          torch::TensorOptions().dtype(torch::kInt64).device(device));
  moe_index_.assign(chunks.size(), {});
  for (int64_t l = 0, n = 0; l < c.num_layers; ++l) {
    const int64_t index = c.is_moe_layer(l) ? n++ : -1;
    for (size_t k = 0; k < chunks.size(); ++k) {
      if (l >= chunks[k].begin && l < chunks[k].end) moe_index_[k].push_back(index);
    }
  }
}

void StepLosses::add(size_t chunk, const moe::LossBreakdown& loss, const model::ModelOutput& out) {
  // Summed on the device: a GPU is not synchronized per micro-batch.
  losses_ += torch::stack({loss.lm, loss.aux, loss.z, loss.total}).detach().to(torch::kFloat64);
  if (!load_LE_.defined()) return;
  for (size_t j = 0; j < out.layers.size(); ++j) {
    const auto& layer = out.layers[j];
    const int64_t index = moe_index_[chunk][j];
    if (layer.tokens_per_expert_E && index >= 0) load_LE_[index] += *layer.tokens_per_expert_E;
  }
}

void StepLosses::add_lm(const torch::Tensor& lm) {
  const auto lm64 = lm.detach().to(torch::kFloat64);
  losses_[0] += lm64;
  losses_[3] += lm64;
}

ReducedLosses StepLosses::reduce(const ProcessGroups& groups, const ParallelLayout& layout, int64_t forwards) const {
  const int64_t E = load_LE_.defined() ? load_LE_.size(1) : 0;
  auto sums = load_LE_.defined() ? to_host(torch::cat({losses_, load_LE_.reshape({-1}).to(torch::kFloat64)}))
                                 : to_host(losses_);
  if (layout.sequence_parallel()) {
    // Each TP rank's LM loss covers its chunk of the sequence (over the whole micro-batch's
    // tokens): they add up. The auxiliary losses are whole on every TP rank.
    auto lm = sums.narrow(0, 0, 1).clone();
    groups.tp->all_reduce(lm, ReduceOp::sum);
    sums[3] += lm[0] - sums[0];
    sums[0] = lm[0];
  }
  if (layout.world() > 1) {
    groups.pp->all_reduce(sums, ReduceOp::sum);
    groups.dp->all_reduce(sums, ReduceOp::sum);
    sums.narrow(0, 0, 4).div_(static_cast<double>(layout.dp()));
  }
  const auto mean = sums.narrow(0, 0, 4) / static_cast<double>(forwards);
  const double* v = mean.data_ptr<double>();
  ReducedLosses r{v[0], v[1], v[2], v[3], {}};
  if (E > 0) r.load_LE = sums.narrow(0, 4, sums.numel() - 4).view({-1, E});
  return r;
}

std::optional<GlobalExpertLoads> GlobalExpertLoads::for_run(const ExperimentConfig& c, const ParallelLayout& layout,
                                                            size_t num_chunks, Communicator& dp) {
  if (c.model.moe_router_load_balancing_type != LoadBalancingType::global_aux_loss) return std::nullopt;
  const auto& t = c.training;
  return GlobalExpertLoads(num_chunks, static_cast<double>(t.micro_batch_size * t.seq_length * layout.dp()), dp);
}

GlobalExpertLoads::GlobalExpertLoads(size_t num_chunks, double tokens_per_micro_batch, Communicator& dp)
    : sum_LE_(num_chunks), seen_(num_chunks, 0), tokens_(tokens_per_micro_batch), dp_(dp) {}

std::optional<moe::GlobalExpertLoad> GlobalExpertLoads::add(size_t chunk, const model::ModelOutput& out) {
  std::vector<torch::Tensor> rows;
  for (const auto& layer : out.layers) {
    if (layer.tokens_per_expert_E) rows.push_back(*layer.tokens_per_expert_E);
  }
  if (rows.empty()) return std::nullopt;
  auto counts_LE = torch::stack(rows);
  if (dp_.size() > 1) dp_.all_reduce(counts_LE, ReduceOp::sum);
  auto& sum_LE = sum_LE_[chunk];
  sum_LE = sum_LE.defined() ? sum_LE + counts_LE : counts_LE;
  ++seen_[chunk];
  return moe::GlobalExpertLoad{sum_LE.to(torch::kFloat64) / static_cast<double>(seen_[chunk]), tokens_};
}

}  // namespace moeforge
