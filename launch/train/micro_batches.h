// defines: Batch, BatchSlicing, to_batch, MicroBatches, stage_activation_shape
//
// The micro-batches a rank's pipeline schedule runs: read from the loader when a micro-batch's
// first model chunk on this rank needs it, copied to the device, kept until its last chunk has run
// (interleaved stages: every chunk of this rank runs every micro-batch, each in order), then
// dropped. Under sequence parallelism each TP rank takes its chunk of the sequence here; training
// and evaluation read through this one room.
#pragma once

#include "core/device/step_timer.h"
#include "data/loader.h"
#include "parallel/layout/layout.h"
#include "parallel/pipeline.h"

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <vector>

namespace moeforge {

// One micro-batch on the device. Under sequence parallelism tokens, labels and loss_mask are this
// TP rank's chunk of the sequence (position_ids stay whole: attention sees the whole sequence)
// and loss_tokens is the micro-batch's count of loss tokens, the LM loss's denominator (undefined
// otherwise: the loss counts its own mask).
struct Batch {
  torch::Tensor tokens, labels, loss_mask, position_ids, loss_tokens;
};

// Which part of each sample's sequence this rank takes: the whole (parts 1), or under sequence
// parallelism part `part` of `parts` (the TP rank of TP).
struct BatchSlicing {
  int64_t parts = 1, part = 0;
  static BatchSlicing of(const ParallelLayout& layout, const RankCoordinates& at);
};

// `mb` on `device` (through pinned memory on a GPU, without blocking: ordered on the compute
// stream before the forward that reads it), cut as `slicing` says.
Batch to_batch(const data::MicroBatch& mb, const BatchSlicing& slicing, torch::Device device);

class MicroBatches {
 public:
  // `timer`, when given, times each read as Phase::data.
  MicroBatches(data::DataLoader& loader, BatchSlicing slicing, torch::Device device, int64_t num_chunks,
               StepTimer* timer = nullptr);
  // The slot's micro-batch: read at its first chunk, the same tensors for the later ones.
  const Batch& get(const PipelineSlot& slot);
  // After the slot's forward: the micro-batch is dropped once its last chunk has run.
  void done(const PipelineSlot& slot);

 private:
  data::DataLoader& loader_;
  BatchSlicing slicing_;
  torch::Device device_;
  int64_t num_chunks_;
  StepTimer* timer_;
  std::map<int64_t, Batch> batches_;
};

// What pipeline stages send each other: [micro-batch, sequence (this TP rank's chunk under
// sequence parallelism), hidden].
std::vector<int64_t> stage_activation_shape(const ExperimentConfig& config, const ParallelLayout& layout);

}  // namespace moeforge
