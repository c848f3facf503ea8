// defines: PipelineSlot, PipelineMessage, PipelineAction, pipeline_schedule, peak_in_flight
//
// What one pipeline rank does in one step, as a list of actions, independent of tensors and of
// the transport (torchtitan's per-rank action lists; parallel/pipeline.h runs them). A slot is one
// micro-batch through one of this rank's model chunks. Actions run in list order: a forward, a
// backward, or an exchange that posts its sends and receives together (NCCL: one group) and ends
// when its receives have arrived.
//
// Two schedules (Megatron's, as in megatron/core/pipeline_parallel/schedules.py):
//   one chunk per rank: 1F1B. Stage s runs min(S - s - 1, M) warm-up forwards, then one forward
//     and one backward in turn, then the remaining backwards; at most S - s micro-batches in flight.
//   V > 1 chunks per rank: interleaved 1F1B. The layers are cut into S x V chunks; rank s holds
//     chunks s, s + S, ...; micro-batches go through the chunks in groups of S (M must be a
//     multiple of S), with (S - s - 1) x 2 + (V - 1) x S warm-up forwards (all M x V when M = S).
//     Activations travel a ring: the last rank's chunk c feeds the first rank's chunk c + 1. The
//     bubble shrinks by V, the pipeline messages grow by V.
// Forward-only (evaluation) runs every forward of the same order with its exchanges.
//
// Inside an exchange, activations come before gradients, sends before receives: NCCL matches the
// messages between two ranks by their order, and this order is the same on both sides
// (tests/unit/test_pipeline_schedule.cpp replays every rank's list and checks it, and that no
// order of arrival can deadlock).
#pragma once

#include <cstdint>
#include <vector>

namespace moeforge {

struct PipelineSlot {
  int64_t chunk = 0;        // index among this rank's model chunks
  int64_t micro_batch = 0;  // index in the step
  bool operator==(const PipelineSlot&) const = default;
};

struct PipelineMessage {
  enum class Kind { activation, gradient };
  Kind kind = Kind::activation;
  bool send = true;
  // The slot on this rank: whose output (or input gradient) is sent, or whose input (or output
  // gradient) is received. Activations go to the next rank and come from the previous one,
  // gradients the other way (both around the ring when interleaved).
  PipelineSlot slot;
};

struct PipelineAction {
  enum class Kind { forward, backward, exchange };
  Kind kind = Kind::forward;
  PipelineSlot slot;                      // forward, backward
  std::vector<PipelineMessage> messages;  // exchange
};

// Rank `stage` of `stages`, `chunks` model chunks per rank, `micro_batches` per step.
std::vector<PipelineAction> pipeline_schedule(int64_t stages, int64_t stage, int64_t chunks, int64_t micro_batches,
                                              bool forward_only);

// The most slots whose forward has run and backward has not, on `stage` (activation memory).
int64_t peak_in_flight(const std::vector<PipelineAction>& actions);

}  // namespace moeforge
