// defines: Phase, StepTimer
//
// Where a training step's time goes, per phase. On a GPU the host runs ahead of the device, so host
// clocks around asynchronous work measure launches, not work: there each phase is timed with CUDA
// events recorded on the current stream, read once when the step ends (one counted host sync, which
// also makes the step's wall time the device's). Any accelerator's events, through LibTorch's
// device-generic c10::Event (CUDA's, or a backend library's such as the emulated device's). On CPU
// the phases are host clocks. Phases may nest
// (the forward includes its data) or repeat (once per micro-batch); their totals are reported.
#pragma once

#include <torch/torch.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <vector>

namespace moeforge {

enum class Phase : size_t { data, forward, backward, pipeline_wait, grad_reduce, optimizer };
inline constexpr size_t kPhases = 6;

class StepTimer {
 public:
  // Timing on `device`: its events on an accelerator, host clocks on the CPU.
  explicit StepTimer(const torch::Device& device);

  void start(Phase p);
  void stop(Phase p);
  // stop(p) when the scope ends, also on an exception.
  class Scope {
   public:
    Scope(StepTimer& timer, Phase p) : timer_(timer), p_(p) { timer_.start(p_); }
    ~Scope() { timer_.stop(p_); }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    StepTimer& timer_;
    Phase p_;
  };
  Scope scope(Phase p) { return Scope(*this, p); }

  // Seconds per phase since the last finish() (or construction); waits for the device on GPUs.
  // Starts the next step's totals.
  std::array<double, kPhases> finish();

 private:
  using Clock = std::chrono::steady_clock;
  struct Interval {
    explicit Interval(c10::DeviceType type)
        : begin(type, c10::EventFlag::BACKEND_DEFAULT), end(type, c10::EventFlag::BACKEND_DEFAULT) {}
    Phase phase = Phase::data;
    c10::Event begin, end;  // BACKEND_DEFAULT: with timing (CUDA's PYTORCH_DEFAULT has none)
  };
  c10::Stream stream() const;

  torch::Device device_;
  std::array<double, kPhases> host_s_{};
  std::array<Clock::time_point, kPhases> host_start_{};
  // Accelerators: the step's intervals, reused across steps (events are created once); open_ holds the index
  // of the interval each phase has open.
  std::vector<Interval> intervals_;
  size_t used_ = 0;
  std::array<size_t, kPhases> open_{};
};

}  // namespace moeforge
