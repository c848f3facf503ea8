// defines: AllToAllDispatcher, DispatchStats, ComputeBeforeAllToAll
//
// Expert-parallel dispatch (Megatron-Core's MoEAlltoAllTokenDispatcher, dropless): the EP group's
// ranks each hold e = num_experts / EP consecutive experts (EP rank r the block [r e, (r + 1) e),
// parallel/parallelize.h). It implements the MoE layer's Dispatcher, so the model code is the
// same with and without expert parallelism. Per MoE layer and
// micro-batch:
//   1. sort this rank's slots by global expert (destinations come out grouped by EP rank, then by
//      local expert), count rows per expert;
//   2. exchange the counts with an all-to-all of [EP, e] (e local experts): every rank learns how
//      many rows each peer sends to each of its experts;
//   3. all-to-all the rows (uneven counts), regroup the received rows by local expert (they
//      arrive by source rank) so each expert gets one contiguous block;
//   4. combine: undo the regrouping, the reverse all-to-all, then the local slot order.
// The row all-to-alls are autograd functions: backward is the all-to-all in the other direction.
// With `overlap` (parallel.overlap_comm) each row all-to-all, forward and backward, is in flight
// on the group's communication thread while the layer's `overlapped` work (its shared expert)
// computes; only the count exchange, which sizes the rows, is waited for at once.
// Shapes (Note [shape suffixes], core/base/shapes.h): T tokens, K top-k, A slots, N rows for the
// local experts, D hidden, R EP ranks, e local experts.
#pragma once

#include "moe/dispatcher.h"
#include "parallel/comm/communicator.h"

#include <chrono>
#include <memory>

namespace moeforge {

// What the dispatcher moved since the last reset(); for the training log and benchmarks.
struct DispatchStats {
  int64_t rows_received = 0;     // rows this rank's experts received (forward dispatch)
  int64_t rows_sent_remote = 0;  // rows sent to other ranks (forward dispatch)
  int64_t bytes_sent = 0;        // all row all-to-alls, forward and backward, excluding rows kept locally
  double seconds = 0;            // compute-thread time in (or waiting for) the row and count all-to-alls
  void reset() { *this = DispatchStats{}; }
};

// One rank's compute-thread time that ends at an all-to-all, summed over a step: for each all-to-all
// (the count exchange and every row exchange, forward and backward), the time from the previous
// synchronising point (the step's start, or the end of the previous all-to-all of any MoE layer)
// to its start. All-to-alls make the EP ranks wait for each other, so the spread of this time over
// the EP ranks is what they waited for the busiest one (docs/report.md, straggler cost). Shared by
// every dispatcher of the rank.
struct ComputeBeforeAllToAll {
  std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
  double seconds = 0;
  void begin_step() { last = std::chrono::steady_clock::now(), seconds = 0; }
  void before() { seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - last).count(); }
  void after() { last = std::chrono::steady_clock::now(); }
};

class AllToAllDispatcher : public moe::Dispatcher {
 public:
  // `num_experts` must divide by the EP group's size (ParallelLayout checks it).
  AllToAllDispatcher(int64_t num_experts, std::shared_ptr<Communicator> ep_group, bool overlap);
  moe::Dispatched dispatch(const torch::Tensor& x_TD, const torch::Tensor& experts_TK,
                           const moe::Overlapped& overlapped = {}) override;
  torch::Tensor combine(const torch::Tensor& y_ND, const moe::Dispatched& dispatched, const torch::Tensor& weights_TK,
                        const moe::Overlapped& overlapped = {}) override;

  DispatchStats& stats() { return *stats_; }
  // The rank's shared clock of compute before all-to-alls (none: not measured).
  void set_compute_clock(std::shared_ptr<ComputeBeforeAllToAll> clock) { clock_ = std::move(clock); }

 private:
  int64_t num_experts_;
  // The rows' all-to-all as autograd nodes, with `overlapped` run while it is in flight.
  torch::Tensor exchange(const torch::Tensor& x_ND, const std::vector<int64_t>& send_rows,
                         const std::vector<int64_t>& recv_rows, const moe::Overlapped& overlapped);

  std::shared_ptr<Communicator> ep_;
  bool overlap_;
  std::shared_ptr<DispatchStats> stats_ = std::make_shared<DispatchStats>();
  std::shared_ptr<ComputeBeforeAllToAll> clock_;
};

}  // namespace moeforge
