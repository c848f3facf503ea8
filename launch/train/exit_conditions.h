// defines: ExitConditions, StopVotes
//
// Megatron's three ways to end a run early, each with a checkpoint it resumes from exactly:
//   training.exit_signal_handler + training.exit_signal   a signal (SIGTERM by default; SIGUSR1 under
//                                                         mpirun, which forwards it and only it
//                                                         without killing the ranks a second later)
//   training.exit_duration_in_mins                       the process has run this long
//   training.exit_interval                               the iteration is a multiple of this
// A signal reaches ranks at different moments (or only some of them) and clocks differ, so the
// ranks agree after every step whether any of them wants to stop (the step's one agreement, an
// all-reduce of a few flags that the trainer makes anyway); then every rank stops after the same
// iteration, saves, says why and exits 0, as Megatron's distributed signal handler does.
#pragma once

#include "core/config/config.h"

#include <chrono>
#include <optional>
#include <string>

namespace moeforge {

// What this rank wants after a step; agreed across ranks by the trainer (any rank's vote counts).
struct StopVotes {
  bool signal = false;
  bool duration = false;
};

class ExitConditions {
 public:
  // Installs the signal handler when training.exit_signal_handler is set (the previous handler
  // comes back when this is destroyed).
  explicit ExitConditions(const TrainingConfig& t);
  ~ExitConditions();
  ExitConditions(const ExitConditions&) = delete;
  ExitConditions& operator=(const ExitConditions&) = delete;

  StopVotes vote() const;
  // Why the run stops after `iteration`, given the votes of all ranks; nothing = go on.
  std::optional<std::string> reason(const StopVotes& agreed, int64_t iteration) const;

 private:
  int signal_ = -1;  // the signal handled, or -1
  std::string signal_name_;
  std::optional<double> duration_s_;
  std::optional<int64_t> interval_;
  double process_start_s_;  // CLOCK_MONOTONIC seconds at process start (Megatron: _TRAIN_START_TIME)
};

}  // namespace moeforge
