#include "core/device/emulated/emulated_allocator.h"

#include "core/device/emulated/emulated_runtime.h"
#include "core/device/emulated/emulated_stream_check.h"

#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <unordered_set>
#include <vector>

namespace moeforge::emulated {
namespace {

constexpr size_t kRounding = 512;  // CUDA's allocator rounds every request up to this
constexpr size_t kAlignment = 64;  // as the CPU allocator aligns, so vector kernels take the same paths
constexpr auto kAll = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);

struct Block {
  char* ptr = nullptr;
  size_t size = 0;       // rounded
  size_t requested = 0;  // as asked
  c10::DeviceIndex device = 0;
  c10::StreamId stream = 0;  // the stream it was allocated on: the only one its cache entry serves
  // Other streams it was used on (recordStream). CUDA waits for their work before reusing the block;
  // here that work is done (Note [emulated device order]), so the set only tells the stream-order
  // checker (emulated_stream_check.h) which streams need no other wait.
  std::unordered_set<c10::Stream> used_on;
};

// Cached blocks in (stream, size, address) order: lower_bound finds the best fit on a stream.
struct ByStreamAndSize {
  bool operator()(const Block* a, const Block* b) const {
    return std::tie(a->stream, a->size, a->ptr) < std::tie(b->stream, b->size, b->ptr);
  }
};

struct DeviceState {
  std::set<Block*, ByStreamAndSize> cache;
  c10::CachingDeviceAllocator::DeviceStats stats;
  size_t reserved() const { return static_cast<size_t>(stats.reserved_bytes[kAll].current); }
  size_t allocated() const { return static_cast<size_t>(stats.allocated_bytes[kAll].current); }
};

// Like CUDA's messages: bytes, KiB, MiB or GiB with two decimals.
std::string format_size(size_t bytes) {
  std::ostringstream os;
  os.precision(2);
  os << std::fixed;
  if (bytes < 1024) {
    os << bytes << " bytes";
  } else if (bytes < (size_t{1} << 20)) {
    os << static_cast<double>(bytes) / 1024.0 << " KiB";
  } else if (bytes < (size_t{1} << 30)) {
    os << static_cast<double>(bytes) / static_cast<double>(1 << 20) << " MiB";
  } else {
    os << static_cast<double>(bytes) / static_cast<double>(1 << 30) << " GiB";
  }
  return os.str();
}

void delete_block(void* ptr);

class Allocator final : public c10::DeviceAllocator {
 public:
  c10::DataPtr allocate(size_t requested) override {
    const c10::DeviceIndex device = checked_index(current_device());
    const c10::Device where(c10::DeviceType::PrivateUse1, device);
    if (requested == 0) return {nullptr, nullptr, &delete_block, where};
    const c10::StreamId stream = current_stream(device).id();
    const size_t size = (requested + kRounding - 1) / kRounding * kRounding;
    const std::lock_guard lock(mutex_);
    DeviceState& d = state(device);
    Block* block = take_cached(d, stream, size);
    if (block == nullptr) block = new_block(d, device, stream, size);
    block->requested = requested;
    d.stats.allocation[kAll].increase(1);
    d.stats.allocated_bytes[kAll].increase(block->size);
    d.stats.requested_bytes[kAll].increase(requested);
    live_.emplace(block->ptr, block);
    return {block->ptr, block->ptr, &delete_block, where};
  }

  void release(void* ptr) {
    const std::lock_guard lock(mutex_);
    const auto it = live_.find(static_cast<const char*>(ptr));
    TORCH_INTERNAL_ASSERT(it != live_.end(), "emulated allocator: freeing memory it did not allocate");
    Block* block = it->second;
    live_.erase(it);
    DeviceState& d = devices_[static_cast<size_t>(block->device)];
    d.stats.allocation[kAll].decrease(1);
    d.stats.allocated_bytes[kAll].decrease(block->size);
    d.stats.requested_bytes[kAll].decrease(block->requested);
    if (stream_check::enabled()) {
      const c10::Device device(c10::DeviceType::PrivateUse1, block->device);
      stream_check::block_freed(block->ptr, c10::Stream(c10::Stream::UNSAFE, device, block->stream), block->used_on);
    }
    d.cache.insert(block);
  }

  c10::DeleterFnPtr raw_deleter() const override { return &delete_block; }
  void copy_data(void* dest, const void* src, size_t count) const override { std::memcpy(dest, src, count); }
  bool initialized() override { return true; }

  void emptyCache(c10::MempoolId_t /*mempool_id*/) override {
    const std::lock_guard lock(mutex_);
    for (DeviceState& d : devices_) release_cache(d);
  }

  void recordStream(const c10::DataPtr& data_ptr, c10::Stream stream) override {
    // As CUDA's: memory from elsewhere (another allocator, size 0) is not this allocator's concern.
    if (data_ptr.get() == nullptr || data_ptr.get_deleter() != &delete_block) return;
    const std::lock_guard lock(mutex_);
    const auto it = live_.find(static_cast<const char*>(data_ptr.get()));
    if (it == live_.end()) return;
    Block* block = it->second;
    if (stream.device_index() == block->device && stream.id() == block->stream) return;
    block->used_on.insert(stream);
  }

  c10::CachingDeviceAllocator::DeviceStats getDeviceStats(c10::DeviceIndex device) override {
    const std::lock_guard lock(mutex_);
    return state(checked_index(device)).stats;
  }

  void resetAccumulatedStats(c10::DeviceIndex device) override {
    const std::lock_guard lock(mutex_);
    auto& stats = state(checked_index(device)).stats;
    for (auto* array : {&stats.allocation, &stats.segment, &stats.allocated_bytes, &stats.reserved_bytes,
                        &stats.requested_bytes}) {
      for (auto& stat : *array) stat.reset_accumulated();
    }
    stats.num_alloc_retries = 0;
    stats.num_ooms = 0;
    stats.num_device_alloc = 0;
    stats.num_device_free = 0;
  }

  void resetPeakStats(c10::DeviceIndex device) override {
    const std::lock_guard lock(mutex_);
    auto& stats = state(checked_index(device)).stats;
    for (auto* array : {&stats.allocation, &stats.segment, &stats.allocated_bytes, &stats.reserved_bytes,
                        &stats.requested_bytes}) {
      for (auto& stat : *array) stat.reset_peak();
    }
  }

  std::pair<size_t, size_t> getMemoryInfo(c10::DeviceIndex device) override {
    const std::lock_guard lock(mutex_);
    const size_t capacity = settings().memory_bytes;
    return {capacity - state(checked_index(device)).reserved(), capacity};
  }

  std::optional<c10::DeviceIndex> device_of(const void* ptr) {
    const std::lock_guard lock(mutex_);
    const char* p = static_cast<const char*>(ptr);
    auto it = live_.upper_bound(p);
    if (it == live_.begin()) return std::nullopt;
    --it;
    if (p >= it->first + it->second->size) return std::nullopt;
    return it->second->device;
  }

 private:
  DeviceState& state(c10::DeviceIndex device) {
    if (devices_.empty()) devices_.resize(static_cast<size_t>(settings().devices));
    return devices_[static_cast<size_t>(device)];
  }

  // CUDA's allocator splits a larger cached block; this one never splits, so it takes the best fit
  // on the stream only when that wastes at most an eighth of the block, and otherwise allocates anew.
  static Block* take_cached(DeviceState& d, c10::StreamId stream, size_t size) {
    Block key;
    key.stream = stream;
    key.size = size;
    const auto it = d.cache.lower_bound(&key);
    if (it == d.cache.end() || (*it)->stream != stream || (*it)->size > size + size / 8) return nullptr;
    Block* block = *it;
    d.cache.erase(it);
    block->used_on.clear();  // the uses of its previous allocation
    return block;
  }

  Block* new_block(DeviceState& d, c10::DeviceIndex device, c10::StreamId stream, size_t size) {
    const size_t capacity = settings().memory_bytes;
    if (d.reserved() + size > capacity) {
      // CUDA frees its cache and retries a failed cudaMalloc; the cache is all there is to free.
      ++d.stats.num_alloc_retries;
      release_cache(d);
    }
    char* ptr = nullptr;
    if (d.reserved() + size <= capacity) ptr = static_cast<char*>(std::aligned_alloc(kAlignment, size));
    if (ptr == nullptr) {
      ++d.stats.num_ooms;
      const size_t free_bytes = capacity - std::min(capacity, d.reserved());
      TORCH_CHECK_WITH(OutOfMemoryError, false, "emulated out of memory. Tried to allocate ", format_size(size),
                       ". Device ", static_cast<int>(device), " has a total capacity of ", format_size(capacity),
                       " of which ", format_size(free_bytes), " is free. Of the allocated memory ",
                       format_size(d.allocated()), " is allocated by PyTorch, and ",
                       format_size(d.reserved() - d.allocated()), " is reserved by PyTorch but unallocated.",
                       d.reserved() + size <= capacity ? " (The host itself is out of memory.)"
                                                       : " The capacity is MOEFORGE_EMULATED_MEMORY_BYTES (moeforge: "
                                                         "hardware.emulated_memory_gib).");
    }
    ++d.stats.num_device_alloc;
    d.stats.segment[kAll].increase(1);
    d.stats.reserved_bytes[kAll].increase(size);
    auto* block = new Block();
    block->ptr = ptr;
    block->size = size;
    block->device = device;
    block->stream = stream;
    return block;
  }

  static void release_cache(DeviceState& d) {
    for (Block* block : d.cache) {
      std::free(block->ptr);
      ++d.stats.num_device_free;
      d.stats.segment[kAll].decrease(1);
      d.stats.reserved_bytes[kAll].decrease(block->size);
      delete block;
    }
    d.cache.clear();
  }

  std::mutex mutex_;
  std::vector<DeviceState> devices_;  // one per device, made on first use (settings() may throw)
  std::map<const char*, Block*> live_;  // allocated blocks by address
};

// Never destroyed: tensors may outlive static destruction.
Allocator& instance() {
  static auto* a = new Allocator();
  return *a;
}

void delete_block(void* ptr) {
  if (ptr != nullptr) instance().release(ptr);
}

}  // namespace

c10::DeviceAllocator& allocator() { return instance(); }

std::optional<c10::DeviceIndex> device_of_pointer(const void* ptr) { return instance().device_of(ptr); }

void resize_storage_bytes(c10::StorageImpl& storage, size_t bytes) {
  TORCH_CHECK(storage.resizable(), "Trying to resize storage that is not resizable");
  const c10::DeviceGuard guard(storage.device());
  c10::DataPtr fresh = instance().allocate(bytes);
  const size_t kept = std::min(bytes, storage.nbytes());
  if (kept > 0) std::memcpy(fresh.get(), storage.data_ptr().get(), kept);
  storage.set_data_ptr_noswap(std::move(fresh));
  storage.set_nbytes(bytes);
}

}  // namespace moeforge::emulated
