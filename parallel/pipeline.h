// defines: StageOutput, StageCallbacks, run_pipeline, gather_to_first_stage
//
// Runs one rank's part of a pipeline step (parallel/layout/pipeline_schedule.h: 1F1B, or interleaved 1F1B
// with several model chunks per rank) over the pipeline group, independent of the model: the
// caller's forward callback runs one micro-batch through one of this rank's chunks. Activations
// [micro_batch, seq, hidden] go to the next rank and their gradients come back, point to point,
// in the schedule's batched exchanges (all of an exchange's messages in flight together, so
// neighbours that both send first never wait on each other). An exchange that receives ends when
// all of its messages are through; a send-only one (warm-up, cool-down) stays in flight while the
// rank goes on computing, and is waited for at the end of the step. The storage of an activation sent on is released right after the send (its autograd
// node stays; backward needs only the gradient that comes back), as Megatron's
// deallocate_output_tensor. With one stage and one chunk the schedule is forward, backward per
// micro-batch: the plain gradient-accumulation loop.
#pragma once

#include "core/files/safetensors.h"
#include "core/device/step_timer.h"
#include "parallel/comm/communicator.h"
#include "parallel/layout/pipeline_schedule.h"

#include <torch/torch.h>

#include <functional>
#include <vector>

namespace moeforge {

struct StageOutput {
  torch::Tensor output;  // the activation for the next stage (undefined on the last stage)
  torch::Tensor loss;    // this stage's loss part, already scaled by 1 / M (undefined if none)
};

struct StageCallbacks {
  // Forward of one micro-batch through one of this rank's chunks; `input` is the received
  // activation (requires grad when training), undefined for the model's first chunk.
  std::function<StageOutput(const PipelineSlot& slot, const torch::Tensor& input)> forward;
  // Before / after each backward (each chunk runs its micro-batches backward in forward order):
  // a chunk's last one has its gradient reduction overlap it; after each, gradient accumulation.
  std::function<void(const PipelineSlot& slot)> before_backward;
  std::function<void(const PipelineSlot& slot)> after_backward;
};

// One step of `chunks` model chunks per rank over `micro_batches`: forwards and backwards, or
// forwards only (evaluation: `callbacks` needs only forward; nothing requires grad).
// `activation_shape` / `options`: the tensors passed between stages ([micro_batch, seq, hidden]
// in the model dtype). Times go to `timer` when given: Phase::forward (the callbacks),
// Phase::backward (autograd backward, with the all-to-alls in it), Phase::pipeline_wait (the
// exchanges: the pipeline bubble and transfers).
void run_pipeline(Communicator& pp, int64_t chunks, int64_t micro_batches, bool forward_only,
                  const std::vector<int64_t>& activation_shape, const torch::TensorOptions& options,
                  const StageCallbacks& callbacks, StepTimer* timer);

// Moves every stage's tensors to pipeline rank 0, appended in stage order, in host memory whatever
// device they live on (collective over `pp`; on the other ranks `tensors` is left as is). For
// whole checkpoints written by one rank.
void gather_to_first_stage(NamedTensors& tensors, Communicator& pp);

}  // namespace moeforge
