#include "moe/expert_placement.h"

#include <fmt/format.h>

#include <stdexcept>

namespace moeforge::moe {

ExpertPlacement::ExpertPlacement(int64_t num_experts, int64_t ep_size) : num_experts_(num_experts), ep_size_(ep_size) {
  if (num_experts < 1 || ep_size < 1 || num_experts % ep_size != 0) {
    // ParallelLayout rejects such layouts with a user-facing message before this is reached.
    throw std::logic_error(fmt::format("ExpertPlacement: {} experts cannot be split over {} ranks", num_experts, ep_size));
  }
}

}  // namespace moeforge::moe
