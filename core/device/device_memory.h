// defines: DeviceMemory, device_memory
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

}  // namespace moeforge
