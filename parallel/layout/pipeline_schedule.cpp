#include "parallel/layout/pipeline_schedule.h"

#include <algorithm>
#include <stdexcept>

namespace moeforge {

namespace {

using Kind = PipelineMessage::Kind;
// No message of that kind in an exchange (sentinels, not std::optional: GCC 12 warns about the
// optional's storage at -O2).
constexpr int64_t kNone = -1;
constexpr PipelineSlot kNoSlot{kNone, kNone};

// Appends actions; names each received tensor by the next micro-batch its chunk has not received
// yet (a chunk receives its micro-batches in order, as its neighbour sends them).
class Builder {
 public:
  Builder(int64_t stages, int64_t stage, int64_t chunks)
      : first_(stage == 0), last_(stage == stages - 1), activations_in_(static_cast<size_t>(chunks), 0),
        gradients_in_(static_cast<size_t>(chunks), 0), chunks_(chunks) {}

  bool first() const { return first_; }
  bool last() const { return last_; }
  void forward(PipelineSlot s) { actions_.push_back({PipelineAction::Kind::forward, s, {}}); }
  void backward(PipelineSlot s) { actions_.push_back({PipelineAction::Kind::backward, s, {}}); }
  // One exchange: the activation of `send_activation`, the input gradient of `send_gradient`, an
  // activation for chunk `recv_activation`, an output gradient for chunk `recv_gradient` (each
  // kNone / kNoSlot for none). The model's first chunk receives no activation and sends no
  // gradient, its last the other way round; nothing left: no action.
  void exchange(PipelineSlot send_activation, PipelineSlot send_gradient, int64_t recv_activation, int64_t recv_gradient) {
    PipelineAction a{PipelineAction::Kind::exchange, {}, {}};
    if (send_activation.chunk != kNone && !(last_ && send_activation.chunk == chunks_ - 1)) {
      a.messages.push_back({Kind::activation, true, send_activation});
    }
    if (send_gradient.chunk != kNone && !(first_ && send_gradient.chunk == 0)) {
      a.messages.push_back({Kind::gradient, true, send_gradient});
    }
    if (recv_activation != kNone && !(first_ && recv_activation == 0)) {
      auto& n = activations_in_[static_cast<size_t>(recv_activation)];
      a.messages.push_back({Kind::activation, false, {recv_activation, n++}});
    }
    if (recv_gradient != kNone && !(last_ && recv_gradient == chunks_ - 1)) {
      auto& n = gradients_in_[static_cast<size_t>(recv_gradient)];
      a.messages.push_back({Kind::gradient, false, {recv_gradient, n++}});
    }
    if (!a.messages.empty()) actions_.push_back(std::move(a));
  }
  std::vector<PipelineAction> take() { return std::move(actions_); }

 private:
  bool first_, last_;
  std::vector<int64_t> activations_in_, gradients_in_;
  int64_t chunks_;
  std::vector<PipelineAction> actions_;
};

std::vector<PipelineAction> one_f_one_b(int64_t S, int64_t s, int64_t M, bool forward_only) {
  Builder b(S, s, 1);
  auto slot = [](int64_t i) { return PipelineSlot{0, i}; };
  if (forward_only) {
    for (int64_t i = 0; i < M; ++i) {
      b.exchange(kNoSlot, kNoSlot, 0, kNone);
      b.forward(slot(i));
      b.exchange(slot(i), kNoSlot, kNone, kNone);
    }
    return b.take();
  }
  const int64_t warmup = std::min(S - s - 1, M), steady = M - warmup;
  for (int64_t i = 0; i < warmup; ++i) {
    b.exchange(kNoSlot, kNoSlot, 0, kNone);
    b.forward(slot(i));
    b.exchange(slot(i), kNoSlot, kNone, kNone);
  }
  if (steady > 0) b.exchange(kNoSlot, kNoSlot, 0, kNone);
  for (int64_t i = 0; i < steady; ++i) {
    // The activation out and the gradient of the oldest micro-batch in, paired: neighbours that
    // both send first never wait on each other.
    b.forward(slot(warmup + i));
    b.exchange(slot(warmup + i), kNoSlot, kNone, 0);
    b.backward(slot(i));
    b.exchange(kNoSlot, slot(i), i + 1 < steady ? 0 : kNone, kNone);
  }
  for (int64_t i = steady; i < M; ++i) {
    b.exchange(kNoSlot, kNoSlot, kNone, 0);
    b.backward(slot(i));
    b.exchange(kNoSlot, slot(i), kNone, kNone);
  }
  return b.take();
}

// Megatron's forward_backward_pipelining_with_interleaving, with its exchanges batched the same way.
std::vector<PipelineAction> interleaved(int64_t S, int64_t s, int64_t V, int64_t M, bool forward_only) {
  Builder b(S, s, V);
  const int64_t total = M * V, group = S * V;
  // Virtual micro-batch k: micro-batches go through the chunks in groups of S; backwards run the
  // chunks in reverse.
  auto floor_mod = [](int64_t a, int64_t n) { return ((a % n) + n) % n; };
  auto forward_chunk = [&](int64_t k) { return floor_mod(k, group) / S; };
  auto backward_chunk = [&](int64_t k) { return V - 1 - forward_chunk(k); };
  auto micro_batch = [&](int64_t k) { return (k / group) * S + k % S; };
  auto forward_slot = [&](int64_t k) { return PipelineSlot{forward_chunk(k), micro_batch(k)}; };
  auto backward_slot = [&](int64_t k) { return PipelineSlot{backward_chunk(k), micro_batch(k)}; };

  const bool all_warmup = forward_only || M == S;
  const int64_t warmup = all_warmup ? total : std::min((S - s - 1) * 2 + (V - 1) * S, total);
  const int64_t remaining = total - warmup;

  b.exchange(kNoSlot, kNoSlot, 0, kNone);
  for (int64_t k = 0; k < warmup; ++k) {
    b.forward(forward_slot(k));
    const int64_t next = k + 1 < total ? forward_chunk(k + 1) : kNone;
    // The last warm-up exchange also takes the first backward's gradient.
    const int64_t grad = (k == warmup - 1 && !all_warmup) ? V - 1 : kNone;
    b.exchange(forward_slot(k), kNoSlot, next, grad);
  }
  for (int64_t k = 0; k < remaining; ++k) {
    const int64_t fk = k + warmup;
    b.forward(forward_slot(fk));
    b.backward(backward_slot(k));
    // What arrives now: on the first rank, the last rank's output of S - 1 virtual micro-batches
    // ago (none from its last chunk); on the last rank, the first rank's gradient of S - 1 ago
    // (none from its first chunk); elsewhere the neighbour's of the next virtual micro-batch.
    int64_t activation = kNone, gradient = kNone;
    if (b.first()) {
      const int64_t c = forward_chunk(fk - (S - 1));
      if (c != V - 1) activation = c + 1;
    } else {
      activation = forward_chunk(fk + 1);
    }
    if (b.last()) {
      const int64_t c = backward_chunk(k - (S - 1));
      if (c != 0) gradient = c - 1;
    } else {
      gradient = backward_chunk(k + 1);
    }
    if (k == remaining - 1) activation = kNone;
    b.exchange(forward_slot(fk), backward_slot(k), activation, gradient);
  }
  if (forward_only) return b.take();
  if (all_warmup) b.exchange(kNoSlot, kNoSlot, kNone, V - 1);
  for (int64_t k = remaining; k < total; ++k) {
    b.backward(backward_slot(k));
    const int64_t next = k + 1 < total ? backward_chunk(k + 1) : kNone;
    b.exchange(kNoSlot, backward_slot(k), kNone, next);
  }
  return b.take();
}

}  // namespace

std::vector<PipelineAction> pipeline_schedule(int64_t stages, int64_t stage, int64_t chunks, int64_t micro_batches,
                                              bool forward_only) {
  if (stages < 1 || stage < 0 || stage >= stages || chunks < 1 || micro_batches < 1) {
    throw std::invalid_argument("pipeline_schedule: needs 0 <= stage < stages and positive chunks and micro-batches");
  }
  if (chunks == 1) return one_f_one_b(stages, stage, micro_batches, forward_only);
  if (stages < 2 || micro_batches % stages != 0) {
    throw std::invalid_argument("pipeline_schedule: the interleaved schedule needs 2 or more stages and a multiple of "
                                "the stages as micro-batches");
  }
  return interleaved(stages, stage, chunks, micro_batches, forward_only);
}

int64_t peak_in_flight(const std::vector<PipelineAction>& actions) {
  int64_t now = 0, peak = 0;
  for (const auto& a : actions) {
    if (a.kind == PipelineAction::Kind::forward) peak = std::max(peak, ++now);
    if (a.kind == PipelineAction::Kind::backward) --now;
  }
  return peak;
}

}  // namespace moeforge
