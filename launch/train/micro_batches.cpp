#include "launch/train/micro_batches.h"

#include "core/device/host_sync.h"

#include <numeric>

namespace moeforge {

BatchSlicing BatchSlicing::of(const ParallelLayout& layout, const RankCoordinates& at) {
  if (!layout.sequence_parallel()) return {};
  return {layout.tp(), at.tp};
}

Batch to_batch(const data::MicroBatch& mb, const BatchSlicing& slicing, torch::Device device) {
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  const std::vector<int64_t> shape{mb.batch, mb.seq};
  const int64_t chunk = mb.seq / slicing.parts;
  // The loader's thread has read ahead on the host; the copy to a GPU goes through pinned memory
  // and does not block (it is ordered on the compute stream before the forward that reads it).
  auto from = [&](const auto& v, torch::TensorOptions o, bool whole = false) {
    auto view = torch::from_blob(const_cast<void*>(static_cast<const void*>(v.data())), shape, o);
    if (!whole && chunk != mb.seq) view = view.narrow(1, slicing.part * chunk, chunk).contiguous();
    return device.is_cpu() ? view.clone() : to_device(view, device);
  };
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  Batch b{from(mb.tokens, i64), from(mb.labels, i64), from(mb.loss_mask, f32), from(mb.position_ids, i64, true), {}};
  if (slicing.parts > 1) {
    // Counted on the host, where the mask already is: no device read.
    const double tokens = std::accumulate(mb.loss_mask.begin(), mb.loss_mask.end(), 0.0);
    b.loss_tokens = torch::full({}, tokens, f32.device(device));
  }
  return b;
}

MicroBatches::MicroBatches(data::DataLoader& loader, BatchSlicing slicing, torch::Device device, int64_t num_chunks,
                           StepTimer* timer)
    : loader_(loader), slicing_(slicing), device_(device), num_chunks_(num_chunks), timer_(timer) {}

const Batch& MicroBatches::get(const PipelineSlot& slot) {
  auto it = batches_.find(slot.micro_batch);
  if (it != batches_.end()) return it->second;
  if (timer_) timer_->start(Phase::data);
  it = batches_.emplace(slot.micro_batch, to_batch(loader_.next(), slicing_, device_)).first;
  if (timer_) timer_->stop(Phase::data);
  return it->second;
}

void MicroBatches::done(const PipelineSlot& slot) {
  if (slot.chunk + 1 == num_chunks_) batches_.erase(slot.micro_batch);
}

std::vector<int64_t> stage_activation_shape(const ExperimentConfig& c, const ParallelLayout& layout) {
  // Between stages only this TP rank's chunk of the sequence travels under sequence parallelism.
  const int64_t seq = c.training.seq_length / (layout.sequence_parallel() ? layout.tp() : 1);
  return {c.training.micro_batch_size, seq, c.model.hidden_size};
}

}  // namespace moeforge
