// defines: LrSchedule
//
// Megatron's OptimizerParamScheduler for the learning rate, counted in samples as Megatron does
// when training by iterations: warm-up and decay lengths are iterations * global batch, and the
// scheduler advances by one global batch after every successful update (a skipped update does
// not advance it). The LR applied in iteration i (1-based) is therefore lr_at((i - 1 - skipped
// before i) * global_batch): with warm-up, the first iteration runs at init_lr = 0, as in Megatron.
//
//   steps <= warmup (warmup > 0): init + (max - init) * steps / warmup
//   constant:                     max
//   steps > decay:                min
//   else r = (steps - warmup) / (decay - warmup),
//        linear: min + (max - min) * (1 - r);   cosine: min + (max - min) * 0.5 * (cos(pi r) + 1)
#pragma once

#include "core/config/config.h"

#include <cstdint>

namespace moeforge {

class LrSchedule {
 public:
  explicit LrSchedule(const TrainingConfig& training);
  // The learning rate after `num_steps` samples of successful updates.
  double lr_at(int64_t num_steps) const;
  double current() const { return lr_at(num_steps_); }
  void step() { num_steps_ += global_batch_; }
  int64_t num_steps() const { return num_steps_; }
  void set_num_steps(int64_t steps) { num_steps_ = steps; }

 private:
  double max_lr_, min_lr_, init_lr_ = 0.0;
  int64_t warmup_steps_, decay_steps_, global_batch_;
  LrDecayStyle style_;
  int64_t num_steps_ = 0;
};

}  // namespace moeforge
