// The emulated devices' c10 device guard: the current device and streams, events, and the device
// count that LibTorch's device-generic code (DeviceGuard, StreamGuard, c10::Event, the autograd
// engine's device threads) reaches through the guard registry.
#include "core/device/emulated/emulated_allocator.h"
#include "core/device/emulated/emulated_runtime.h"
#include "core/device/emulated/emulated_stream_check.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>

namespace moeforge::emulated {
namespace {

constexpr c10::DeviceType kType = c10::DeviceType::PrivateUse1;
// Streams 1..kPoolStreams are each device's pool, handed out round-robin as CUDA's are; getNewStream
// ids follow them.
constexpr c10::StreamId kPoolStreams = 32;

c10::Stream stream_of(c10::DeviceIndex device, c10::StreamId id) {
  return c10::Stream(c10::Stream::UNSAFE, c10::Device(kType, device), id);
}

c10::DeviceIndex index_of(const c10::Device& device) {
  TORCH_CHECK(device.type() == kType, "expected an emulated device, got ", device);
  return checked_index(device.has_index() ? device.index() : -1);
}

// Recorded once record() ran, at that host time (Note [emulated device order]).
struct Event {
  std::chrono::steady_clock::time_point when;
  c10::DeviceIndex device = 0;
};

const Event& recorded(void* event) {
  TORCH_CHECK(event != nullptr, "an emulated event must be recorded before its elapsed time is read");
  return *static_cast<const Event*>(event);
}

struct GuardImpl final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return kType; }

  c10::Device exchangeDevice(c10::Device device) const override {
    const c10::Device previous = getDevice();
    setDevice(device);
    return previous;
  }
  c10::Device getDevice() const override { return c10::Device(kType, current_device()); }
  void setDevice(c10::Device device) const override { set_current_device(index_of(device)); }
  void uncheckedSetDevice(c10::Device device) const noexcept override { set_current_device(device.index()); }
  c10::DeviceIndex deviceCount() const noexcept override {
    // Must not throw: bad settings read as no devices here, and throw where a device is used.
    try {
      return settings().devices;
    } catch (const c10::Error&) {
      return 0;
    }
  }

  c10::Stream getStream(c10::Device device) const override { return current_stream(index_of(device)); }
  c10::Stream getDefaultStream(c10::Device device) const override { return stream_of(index_of(device), 0); }
  c10::Stream getStreamFromGlobalPool(c10::Device device, bool /*isHighPriority*/) const override {
    static std::array<std::atomic<uint32_t>, kMaxDevices> next{};
    const c10::DeviceIndex index = index_of(device);
    return stream_of(index, 1 + static_cast<c10::StreamId>(next[index]++ % kPoolStreams));
  }
  c10::Stream getNewStream(c10::Device device, int /*priority*/) const override {
    static std::atomic<c10::StreamId> next{kPoolStreams + 1};
    return stream_of(index_of(device), next++);
  }
  c10::Stream exchangeStream(c10::Stream stream) const override {
    const c10::Stream previous = current_stream(index_of(stream.device()));
    set_current_stream(stream);
    return previous;
  }
  bool queryStream(const c10::Stream& /*stream*/) const override { return true; }
  // The waits below have nothing to wait for (Note [emulated device order]); the stream-order
  // checker (emulated_stream_check.h) still learns what they would order.
  void synchronizeStream(const c10::Stream& stream) const override {
    if (stream_check::enabled()) stream_check::host_waited_stream(stream);
    host_synced();
  }
  void synchronizeDevice(const c10::DeviceIndex device_index) const override {
    if (stream_check::enabled()) stream_check::host_waited_device(checked_index(device_index));
    host_synced();
  }

  void record(void** event, const c10::Stream& stream, const c10::DeviceIndex device_index,
              const c10::EventFlag /*flag*/) const override {
    TORCH_CHECK(device_index == -1 || device_index == stream.device_index(), "event device index ",
                static_cast<int>(device_index), " does not match the recording stream's device ", stream.device());
    // Read before an event exists, so that destroyEvent (noexcept) finds the settings read.
    const bool check = stream_check::enabled();
    if (*event == nullptr) *event = new Event();
    auto* e = static_cast<Event*>(*event);
    e->device = stream.device_index();
    e->when = std::chrono::steady_clock::now();
    if (check) stream_check::event_recorded(e, stream);
  }
  // On a GPU the stream (never the host) would wait for the event's work; here that work is already
  // done (Note [emulated device order]), so there is nothing to wait for.
  void block(void* event, const c10::Stream& stream) const override {
    if (stream_check::enabled()) stream_check::event_blocked(event, stream);
  }
  bool queryEvent(void* /*event*/) const override { return true; }
  void synchronizeEvent(void* event) const override {
    if (stream_check::enabled()) stream_check::host_waited_event(event);
  }
  double elapsedTime(void* begin, void* end, const c10::DeviceIndex /*device_index*/) const override {
    const Event& a = recorded(begin);
    const Event& b = recorded(end);
    TORCH_CHECK(a.device == b.device, "elapsed time between events of two emulated devices, ", static_cast<int>(a.device),
                " and ", static_cast<int>(b.device));
    return std::chrono::duration<double, std::milli>(b.when - a.when).count();
  }
  void destroyEvent(void* event, const c10::DeviceIndex /*device_index*/) const noexcept override {
    if (stream_check::enabled()) stream_check::event_destroyed(event);
    delete static_cast<Event*>(event);
  }

  void recordDataPtrOnStream(const c10::DataPtr& data_ptr, const c10::Stream& stream) const override {
    allocator().recordStream(data_ptr, stream);
  }
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, GuardImpl);

}  // namespace
}  // namespace moeforge::emulated
