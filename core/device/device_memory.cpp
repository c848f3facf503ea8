#include "core/device/device_memory.h"

#ifdef MOEFORGE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace moeforge {

std::optional<DeviceMemory> device_memory(const torch::Device& device) {
#ifdef MOEFORGE_WITH_CUDA
  if (!device.is_cuda()) return std::nullopt;
  const auto index = device.has_index() ? device.index() : c10::cuda::current_device();
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(index);
  // StatType::AGGREGATE (every pool) is entry 0; its namespace moved between LibTorch versions.
  constexpr size_t kAll = 0;
  return DeviceMemory{stats.allocated_bytes[kAll].peak, stats.reserved_bytes[kAll].peak,
                      static_cast<int64_t>(at::cuda::getDeviceProperties(index)->totalGlobalMem)};
#else
  (void)device;
  return std::nullopt;
#endif
}

}  // namespace moeforge
