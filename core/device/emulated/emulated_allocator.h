// defines: allocator, device_of_pointer, resize_storage_bytes
//
// The emulated devices' memory: host memory behind a caching allocator that behaves like CUDA's
// where a training run can tell. Sizes round up to 512 bytes; a freed block stays reserved in a
// per-(device, stream) cache and serves later requests on the same stream only; a request past the
// device's capacity (MOEFORGE_EMULATED_MEMORY_BYTES) empties the cache and retries, then throws
// c10::OutOfMemoryError worded like CUDA's. Statistics (allocated and reserved bytes with peaks,
// retries, OOMs) come back through c10::DeviceAllocator::getDeviceStats, as torch.cuda's do.
#pragma once

#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/StorageImpl.h>

#include <cstddef>
#include <optional>

namespace moeforge::emulated {

// The one allocator of every emulated device (each allocation goes to the current device, on its
// current stream); thread-safe.
c10::DeviceAllocator& allocator();

// The emulated device whose live allocation holds `ptr` (anywhere inside it), if any.
std::optional<c10::DeviceIndex> device_of_pointer(const void* ptr);

// Reallocates `storage` (an emulated storage) to `bytes` through the allocator on its device,
// keeping its first min(old, new) bytes, as resizing a CPU storage does.
void resize_storage_bytes(c10::StorageImpl& storage, size_t bytes);

}  // namespace moeforge::emulated
