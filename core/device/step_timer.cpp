#include "core/device/step_timer.h"

#include "core/device/host_sync.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace moeforge {

StepTimer::StepTimer(const torch::Device& device) : device_(device) {}

c10::Stream StepTimer::stream() const { return c10::impl::getDeviceGuardImpl(device_.type())->getStream(device_); }

void StepTimer::start(Phase p) {
  const auto i = static_cast<size_t>(p);
  if (device_.is_cpu()) {
    host_start_[i] = Clock::now();
    return;
  }
  if (used_ == intervals_.size()) intervals_.emplace_back(device_.type());
  Interval& interval = intervals_[used_];
  interval.phase = p;
  interval.begin.record(stream());
  open_[i] = used_++;
}

void StepTimer::stop(Phase p) {
  const auto i = static_cast<size_t>(p);
  if (device_.is_cpu()) {
    host_s_[i] += std::chrono::duration<double>(Clock::now() - host_start_[i]).count();
    return;
  }
  intervals_[open_[i]].end.record(stream());
}

std::array<double, kPhases> StepTimer::finish() {
  std::array<double, kPhases> seconds = host_s_;
  count_host_sync();  // counted on CPU too, where a GPU waits (core/device/host_sync.h)
  if (!device_.is_cpu() && used_ > 0) {
    // Events complete in stream order: the last one recorded done means all are.
    c10::Event last(device_.type(), c10::EventFlag::BACKEND_DEFAULT);
    last.record(stream());
    last.synchronize();
    for (size_t k = 0; k < used_; ++k) {
      const Interval& interval = intervals_[k];
      seconds[static_cast<size_t>(interval.phase)] += interval.begin.elapsedTime(interval.end) / 1e3;  // ms
    }
  }
  host_s_ = {};
  used_ = 0;
  return seconds;
}

}  // namespace moeforge
