// defines: ExpertPlacement
//
// Which expert-parallel rank holds which routed experts: contiguous blocks, as Megatron-Core
// places them (global expert e lives on EP rank e / (E / EP) as local expert e % (E / EP)).
// The planner, the all-to-all dispatcher and sharded checkpoints all use this one mapping.
#pragma once

#include <cstdint>

namespace moeforge::moe {

class ExpertPlacement {
 public:
  // Requires num_experts % ep_size == 0 (ParallelLayout validates it first).
  ExpertPlacement(int64_t num_experts, int64_t ep_size);

  int64_t num_experts() const { return num_experts_; }
  int64_t ep_size() const { return ep_size_; }
  int64_t experts_per_rank() const { return num_experts_ / ep_size_; }
  int64_t owner(int64_t global_expert) const { return global_expert / experts_per_rank(); }
  int64_t local_index(int64_t global_expert) const { return global_expert % experts_per_rank(); }
  int64_t first_expert(int64_t ep_rank) const { return ep_rank * experts_per_rank(); }
  int64_t global_index(int64_t ep_rank, int64_t local_expert) const { return first_expert(ep_rank) + local_expert; }

 private:
  int64_t num_experts_;
  int64_t ep_size_;
};

}  // namespace moeforge::moe
