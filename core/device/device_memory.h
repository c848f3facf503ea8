// defines: DeviceMemory, device_memory, DevicePeaks
//
// GPU memory as FlagPerf reports it: the device's caching allocator's peak allocated and peak
// reserved bytes on this rank's device since the process started, and the device's total. "Used / total"
// in a benchmark row is the peak reserved over the total (what the allocator took from the
// device, fragmentation included). CPU runs have none (their memory is the host's resident set).
#pragma once

#include <torch/torch.h>

#include <optional>

namespace moeforge {

struct DeviceMemory {
  int64_t peak_allocated_bytes = 0, peak_reserved_bytes = 0, total_bytes = 0;
};

// nullopt on the CPU, and for a backend whose allocator is not LibTorch's generic DeviceAllocator.
std::optional<DeviceMemory> device_memory(const torch::Device& device);

// Peaks over windows (a training step, a save) beside the peak since start. The allocator keeps one
// peak, reset at each window's start; since-start is the maximum over everything read before each
// reset, so it keeps Megatron's mem-max-allocated-bytes meaning (what others compare) while each
// window gets its own. Whatever runs between windows (evaluation, logging) is folded in at the
// next begin(). Every reader of the device's peaks goes through one DevicePeaks per device: a
// reset would hide a peak from a reader that asked the allocator directly.
class DevicePeaks {
 public:
  explicit DevicePeaks(const torch::Device& device) : device_(device) {}
  void begin();  // folds the peaks so far into since-start, then resets the allocator's
  // The window's peaks, folded into since-start; nullopt where device_memory() has none.
  std::optional<DeviceMemory> end();
  const std::optional<DeviceMemory>& since_start() const { return since_start_; }

 private:
  void fold(const DeviceMemory& m);
  torch::Device device_;
  std::optional<DeviceMemory> since_start_;
};

}  // namespace moeforge
