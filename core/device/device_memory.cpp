#include "core/device/device_memory.h"

#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>

namespace moeforge {

std::optional<DeviceMemory> device_memory(const torch::Device& device) {
  if (device.is_cpu()) return std::nullopt;
  // One call for every accelerator (CUDA's caching allocator, the emulated device's, a vendor's):
  // LibTorch's device-generic allocator interface. A backend whose allocator lacks it has no row.
  auto* allocator = dynamic_cast<c10::DeviceAllocator*>(c10::GetAllocator(device.type()));
  if (allocator == nullptr) return std::nullopt;
  const auto index =
      device.has_index() ? device.index() : c10::impl::getDeviceGuardImpl(device.type())->getDevice().index();
  const auto stats = allocator->getDeviceStats(index);
  // StatType::AGGREGATE (every pool) is entry 0; its namespace moved between LibTorch versions.
  constexpr size_t kAll = 0;
  int64_t total = 0;
  try {
    total = static_cast<int64_t>(allocator->getMemoryInfo(index).second);
  } catch (const c10::NotImplementedError&) {
    // A backend without the device's size: the row says 0 (unknown), the plan's check is skipped.
  }
  return DeviceMemory{stats.allocated_bytes[kAll].peak, stats.reserved_bytes[kAll].peak, total};
}

void DevicePeaks::fold(const DeviceMemory& m) {
  if (!since_start_) since_start_ = DeviceMemory{};
  since_start_->peak_allocated_bytes = std::max(since_start_->peak_allocated_bytes, m.peak_allocated_bytes);
  since_start_->peak_reserved_bytes = std::max(since_start_->peak_reserved_bytes, m.peak_reserved_bytes);
  since_start_->total_bytes = m.total_bytes;
}

void DevicePeaks::begin() {
  const auto now = device_memory(device_);
  if (!now) return;
  fold(*now);
  // resetPeakStats sets each peak to the current usage: the window starts from what is held now.
  auto* allocator = dynamic_cast<c10::DeviceAllocator*>(c10::GetAllocator(device_.type()));
  allocator->resetPeakStats(device_.has_index() ? device_.index()
                                                : c10::impl::getDeviceGuardImpl(device_.type())->getDevice().index());
}

std::optional<DeviceMemory> DevicePeaks::end() {
  const auto window = device_memory(device_);
  if (window) fold(*window);
  return window;
}

}  // namespace moeforge
