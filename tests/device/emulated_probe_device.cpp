#include "emulated_probe.h"

#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <thread>

namespace moeforge::probe {
namespace {

int failure_count = 0;
constexpr int64_t kMiB = int64_t{1} << 20;
constexpr auto kType = c10::DeviceType::PrivateUse1;

c10::DeviceAllocator& allocator() { return *c10::getDeviceAllocator(kType); }
const c10::impl::DeviceGuardImplInterface& guard() { return *c10::impl::getDeviceGuardImpl(kType); }
int64_t allocated(c10::DeviceIndex d) { return allocator().getDeviceStats(d).allocated_bytes[0].current; }
int64_t reserved(c10::DeviceIndex d) { return allocator().getDeviceStats(d).reserved_bytes[0].current; }
torch::TensorOptions bytes_on(const torch::Device& dev) { return torch::TensorOptions(dev).dtype(torch::kByte); }

std::string counts(const std::string& when, int64_t alloc, int64_t reserve) {
  return when + ": allocated " + std::to_string(alloc) + ", reserved " + std::to_string(reserve) + " bytes";
}

}  // namespace

void check(const std::string& name, const std::function<void()>& body) {
  std::string why;
  try {
    body();
  } catch (const c10::Error& e) {
    why = e.what_without_backtrace();
  } catch (const std::exception& e) {
    why = e.what();
  }
  if (why.empty()) {
    std::printf("PASS  %s\n", name.c_str());
  } else {
    ++failure_count;
    std::printf("FAIL  %s: %s\n", name.c_str(), why.c_str());
  }
  std::fflush(stdout);
}

int failures() { return failure_count; }

void require(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error(what);
}

void require_contains(const std::string& text, const std::string& part) {
  require(text.find(part) != std::string::npos, "'" + part + "' is not in: " + text);
}

bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  const auto x = a.cpu().contiguous();
  const auto y = b.cpu().contiguous();
  return x.scalar_type() == y.scalar_type() && x.sizes() == y.sizes() &&
         std::memcmp(x.data_ptr(), y.data_ptr(), x.nbytes()) == 0;
}

void require_same(const torch::Tensor& device_result, const torch::Tensor& cpu_result, const std::string& what) {
  require(device_result.defined() && cpu_result.defined(), what + ": a result is undefined");
  require(device_result.device().type() == kType, what + ": the result is on " + device_result.device().str());
  if (same_bits(device_result, cpu_result)) return;
  std::string diff = "sizes or dtype differ";
  if (device_result.sizes() == cpu_result.sizes() && device_result.is_floating_point()) {
    diff = "max |difference| " +
           std::to_string((device_result.cpu().to(torch::kDouble) - cpu_result.to(torch::kDouble)).abs().max().item<double>());
  }
  require(false, what + ": the emulated result's bits differ from the CPU's (" + diff + ")");
}

void check_memory(const torch::Device& dev) {
  auto& alloc = allocator();
  require(alloc.initialized(), "the allocator is not initialized");
  alloc.emptyCache();
  const int64_t a0 = allocated(0), r0 = reserved(0);
  auto t = torch::empty({kMiB}, bytes_on(dev));
  void* first = t.data_ptr();
  require(reinterpret_cast<uintptr_t>(first) % 64 == 0, "device memory is not 64-byte aligned");
  require(allocated(0) == a0 + kMiB && reserved(0) == r0 + kMiB, counts("after 1 MiB", allocated(0), reserved(0)));
  t = torch::Tensor();
  require(allocated(0) == a0 && reserved(0) == r0 + kMiB, counts("freed (cached)", allocated(0), reserved(0)));
  t = torch::empty({kMiB}, bytes_on(dev));
  require(t.data_ptr() == first && reserved(0) == r0 + kMiB, counts("again: not the cached block", allocated(0), reserved(0)));
  auto odd = torch::empty({1000}, bytes_on(dev));
  require(allocated(0) == a0 + kMiB + 1024, counts("1000 bytes more, rounded to 512s", allocated(0), reserved(0)));
  alloc.resetPeakStats(0);
  odd = t = torch::Tensor();
  const auto stats = alloc.getDeviceStats(0);
  require(stats.allocated_bytes[0].peak == a0 + kMiB + 1024 && stats.reserved_bytes[0].current >= stats.allocated_bytes[0].current,
          "peak " + std::to_string(stats.allocated_bytes[0].peak) + " after resetPeakStats and freeing");
  const auto [free, total] = alloc.getMemoryInfo(0);
  require(total == size_t{16} << 30 && free == total - static_cast<size_t>(reserved(0)),
          "getMemoryInfo: " + std::to_string(free) + " free of " + std::to_string(total));

  // Freed blocks serve their own stream only.
  alloc.emptyCache();
  const c10::Stream side = guard().getStreamFromGlobalPool(dev);
  void* on_side = nullptr;
  {
    const c10::StreamGuard on(side);
    on_side = torch::empty({kMiB}, bytes_on(dev)).data_ptr();
  }
  const int64_t r1 = reserved(0);
  auto main = torch::empty({kMiB}, bytes_on(dev));
  require(main.data_ptr() != on_side && reserved(0) == r1 + kMiB, "the default stream took the side stream's cached block");
  {
    const c10::StreamGuard on(side);
    require(torch::empty({kMiB}, bytes_on(dev)).data_ptr() == on_side, "the side stream did not get its cached block back");
  }
  // A block used on another stream: its work is done (the emulator runs in host order), so it is
  // cached and reused at once.
  void* main_ptr = main.data_ptr();
  main.record_stream(side);
  main = torch::Tensor();
  require(torch::empty({kMiB}, bytes_on(dev)).data_ptr() == main_ptr, "a block with a recorded stream was not reused");
  require(alloc.getDeviceStats(0).num_ooms == 0, "out-of-memory errors on a 16 GiB device");
}

void check_hooks(const torch::Device& dev) {
  const auto& hooks = at::detail::getPrivateUse1Hooks();
  require(hooks.isBuilt() && hooks.isAvailable() && hooks.hasPrimaryContext(0) && hooks.deviceCount() == 1,
          "built, available, with a context, one device");
  const auto t = torch::zeros({1000}, dev);
  require(hooks.getDeviceFromPtr(t.data_ptr()) == dev && hooks.getDeviceFromPtr(t.data_ptr<float>() + 999) == dev,
          "getDeviceFromPtr of a device tensor's first and last element");
  require(!hooks.isPinnedPtr(t.data_ptr()) && hooks.getPinnedMemoryAllocator() == c10::GetCPUAllocator(),
          "pinned memory is the CPU allocator's, and no pointer is pinned");
  require(hooks.getDefaultGenerator(0).device() == dev && hooks.getNewGenerator(0).device() == dev,
          "the generators are the device's");
  auto grown = torch::arange(10, torch::TensorOptions(dev).dtype(torch::kFloat));
  hooks.resizePrivateUse1Bytes(grown.storage(), 4000);
  require(grown.storage().nbytes() == 4000 && grown.storage().device() == dev, "resizePrivateUse1Bytes");
  require_same(grown, torch::arange(10, torch::kFloat), "the bytes a storage resize keeps");
}

void check_events(const torch::Device& dev) {
  const auto& g = guard();
  require(g.deviceCount() == 1, "deviceCount " + std::to_string(g.deviceCount()));
  const c10::Stream main = g.getDefaultStream(dev);
  require(g.getStream(dev) == main && main.id() == 0, "the current stream is not the default one");
  const c10::Stream pool = g.getStreamFromGlobalPool(dev);
  const c10::Stream fresh = g.getNewStream(dev);
  require(pool != main && fresh != main && fresh != pool, "streams from the pool and new ones are not distinct");
  {
    const c10::StreamGuard on(pool);
    require(g.getStream(dev) == pool, "StreamGuard did not make the pool stream current");
  }
  require(g.getStream(dev) == main, "StreamGuard did not restore the default stream");

  c10::Event begin(kType, c10::EventFlag::BACKEND_DEFAULT);
  c10::Event end(kType, c10::EventFlag::BACKEND_DEFAULT);
  require(begin.query(), "an event never recorded is not complete");
  begin.record(pool);
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  end.record(pool);
  require(begin.query() && end.query(), "recorded events are not complete");
  end.block(main);
  end.synchronize();
  g.synchronizeStream(pool);
  g.synchronizeDevice(0);
  const double ms = begin.elapsedTime(end);
  require(ms >= 29.0 && ms < 10000.0, "elapsedTime " + std::to_string(ms) + " ms around a 30 ms sleep");
  begin.record(main);
  end.record(main);
  const double again = begin.elapsedTime(end);
  require(again >= 0.0 && again < 29.0, "re-recorded events measure " + std::to_string(again) + " ms");
}

int run_small_device_checks() {
  const torch::Device d0("emulated:0"), d1("emulated:1");
  auto& alloc = allocator();
  check("two devices of 4 MiB each", [&] {
    require(guard().deviceCount() == 2, "deviceCount " + std::to_string(guard().deviceCount()));
    require(alloc.getMemoryInfo(0).second == 4 * kMiB && alloc.getMemoryInfo(1).second == 4 * kMiB, "capacity is not 4 MiB");
  });
  check("past the capacity: c10::OutOfMemoryError worded like CUDA's", [&] {
    const auto a = torch::empty({3 * kMiB}, bytes_on(d0));
    const auto before = alloc.getDeviceStats(0);
    const auto message = error_of<c10::OutOfMemoryError>([&] { (void)torch::empty({3 * kMiB}, bytes_on(d0)); });
    require(!message.empty(), "a second 3 MiB on a 4 MiB device did not throw c10::OutOfMemoryError");
    for (const char* part : {"out of memory", "Tried to allocate 3.00 MiB", "Device 0 has a total capacity of 4.00 MiB",
                             "of which 1.00 MiB is free", "3.00 MiB is allocated by PyTorch"}) {
      require_contains(message, part);
    }
    const auto after = alloc.getDeviceStats(0);
    require(after.num_ooms == before.num_ooms + 1 && after.num_alloc_retries == before.num_alloc_retries + 1,
            "num_ooms " + std::to_string(after.num_ooms) + ", num_alloc_retries " + std::to_string(after.num_alloc_retries));
  });
  check("a freed block is reused; the cache is emptied to make room", [&] {
    void* first = torch::empty({3 * kMiB}, bytes_on(d0)).data_ptr();
    auto b = torch::empty({3 * kMiB}, bytes_on(d0));
    require(b.data_ptr() == first, "the cached 3 MiB block was not reused");
    b = torch::Tensor();
    const int64_t retries = alloc.getDeviceStats(0).num_alloc_retries;
    const auto c = torch::empty({2 * kMiB}, bytes_on(d0));  // 3 MiB cached + 2 MiB > 4 MiB
    require(reserved(0) == 2 * kMiB && alloc.getDeviceStats(0).num_alloc_retries == retries + 1,
            counts("2 MiB after flushing the cache", allocated(0), reserved(0)));
  });
  check("devices are separate: memory, copies between them, mixing them, one that does not exist", [&] {
    alloc.emptyCache();
    const auto a = torch::empty({3 * kMiB}, bytes_on(d0));
    const auto b = torch::empty({3 * kMiB}, bytes_on(d1));
    require(b.device() == d1 && reserved(1) == 3 * kMiB && reserved(0) == 3 * kMiB, "3 MiB on each device");
    const auto x = torch::randn({100});
    const auto on1 = x.to(d0).to(d1);
    require(on1.device() == d1, "the copy went to " + on1.device().str());
    require_same(on1, x, "emulated:0 -> emulated:1");
    require_contains(error_of<c10::Error>([&] { (void)(x.to(d0) + on1); }), "same device");
    // A factory op with a CPU kernel only, through the fallback: made on the device asked for.
    require_same(torch::tril_indices(5, 4, 0, torch::TensorOptions(d1).dtype(torch::kLong)),
                 torch::tril_indices(5, 4, 0, torch::kLong), "tril_indices on emulated:1");
    require(torch::tril_indices(5, 4, 0, torch::TensorOptions(d1).dtype(torch::kLong)).device() == d1,
            "tril_indices for emulated:1 is elsewhere");
    require_contains(error_of<c10::Error>([&] { (void)torch::empty({1}, torch::Device("emulated:2")); }),
                     "emulated:2 does not exist");
    const c10::DeviceGuard current(d1);
    require(torch::empty({1}, torch::Device("emulated")).device() == d1, "a tensor without an index is not on the current device");
  });
  return failures() == 0 ? 0 : 1;
}

int run_bad_environment_checks() {
  check("MOEFORGE_EMULATED_DEVICES=two is refused where the device is first used", [] {
    const auto message = error_of<c10::Error>([] { (void)torch::empty({1}, torch::Device("emulated:0")); });
    require_contains(message, "MOEFORGE_EMULATED_DEVICES is 'two'");
    require(guard().deviceCount() == 0, "the guard counts devices despite the bad setting");
  });
  return failures() == 0 ? 0 : 1;
}

}  // namespace moeforge::probe
