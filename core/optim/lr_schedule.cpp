#include "core/optim/lr_schedule.h"

#include <cmath>
#include <numbers>

namespace moeforge {

LrSchedule::LrSchedule(const TrainingConfig& t)
    : max_lr_(t.lr),
      min_lr_(t.min_lr),
      warmup_steps_(t.lr_warmup_iters * t.global_batch_size),
      decay_steps_(*t.lr_decay_iters * t.global_batch_size),
      global_batch_(t.global_batch_size),
      style_(t.lr_decay_style) {}

double LrSchedule::lr_at(int64_t num_steps) const {
  const auto steps = static_cast<double>(num_steps);
  if (warmup_steps_ > 0 && num_steps <= warmup_steps_) {
    return init_lr_ + (max_lr_ - init_lr_) * steps / static_cast<double>(warmup_steps_);
  }
  if (style_ == LrDecayStyle::constant) return max_lr_;
  if (num_steps > decay_steps_) return min_lr_;
  // validate_config guarantees warmup <= decay; equal lengths leave nothing to decay over.
  if (decay_steps_ == warmup_steps_) return min_lr_;
  const double ratio = (steps - static_cast<double>(warmup_steps_)) / static_cast<double>(decay_steps_ - warmup_steps_);
  const double coeff = style_ == LrDecayStyle::linear ? 1.0 - ratio : 0.5 * (std::cos(std::numbers::pi * ratio) + 1.0);
  return min_lr_ + coeff * (max_lr_ - min_lr_);
}

}  // namespace moeforge
