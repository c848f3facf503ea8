// defines: StageOutput, StageCallbacks, run_1f1b, run_forward_only, gather_to_first_stage
//
// Megatron's non-interleaved 1F1B pipeline schedule over the pipeline group, independent of the
// model: the caller's forward callback runs one micro-batch on this stage. Per step, with S stages,
// this stage s and M micro-batches:
//   warm-up    min(S - s - 1, M) forwards (receive activation, forward, send activation);
//   steady     M - warm-up times: forward, send its activation while receiving the gradient of the
//              oldest micro-batch in flight, backward of that one, send its input gradient while
//              receiving the next activation (paired exchanges: send_recv, so neighbours never wait
//              on each other's sends);
//   cool-down  the remaining backwards.
// At most S - s micro-batches are in flight on stage s. The storage of an activation sent to the next
// stage is released right after the send (its autograd node stays; backward needs only the
// gradient that comes back), as Megatron's deallocate_output_tensor. With one stage the schedule is
// forward, backward per micro-batch: the plain gradient-accumulation loop.
// The unpaired sends (warm-up activations, cool-down gradients) are asynchronous
// (Communicator::send_async): the stage goes on with its next micro-batch instead of waiting for
// its neighbour to take the message, and waits for its sends once, at the end of the step. In a
// paired exchange the neighbour is in the matching pair and the stage needs what it receives at
// once, so that stays one send_recv.
#pragma once

#include "core/safetensors.h"
#include "core/step_timer.h"
#include "parallel/communicator.h"

#include <torch/torch.h>

#include <functional>
#include <vector>

namespace moeforge {

struct StageOutput {
  torch::Tensor output;  // the activation for the next stage (undefined on the last stage)
  torch::Tensor loss;    // this stage's loss part, already scaled by 1 / M (undefined if none)
};

struct StageCallbacks {
  // Forward of micro-batch `i` on this stage; `input` is the received activation (requires grad),
  // undefined on the first stage.
  std::function<StageOutput(int64_t i, const torch::Tensor& input)> forward;
  // Before / after each micro-batch's backward (micro-batches go backward in forward order): the
  // last one's gradient reduction overlaps it; after each, gradient accumulation.
  std::function<void(int64_t i)> before_backward;
  std::function<void()> after_backward;
};

// One training step's forwards and backwards. `activation_shape` / `options`: the tensors passed
// between stages ([micro_batch, seq, hidden] in the model dtype).
// Times go to `timer`: Phase::forward (the callbacks), Phase::backward (autograd backward, with the
// all-to-alls in it), Phase::pipeline_wait (sends and receives: the pipeline bubble and transfers).
void run_1f1b(Communicator& pp, int64_t micro_batches, const std::vector<int64_t>& activation_shape,
              const torch::TensorOptions& options, const StageCallbacks& callbacks, StepTimer& timer);

// Forwards only, no gradients (evaluation).
void run_forward_only(Communicator& pp, int64_t micro_batches, const std::vector<int64_t>& activation_shape,
                      const torch::TensorOptions& options,
                      const std::function<StageOutput(int64_t i, const torch::Tensor& input)>& forward);

// Moves every stage's tensors to pipeline rank 0, appended in stage order, in host memory whatever
// device they live on (collective over `pp`; on the other ranks `tensors` is left as is). For
// whole checkpoints written by one rank.
void gather_to_first_stage(NamedTensors& tensors, Communicator& pp);

}  // namespace moeforge
