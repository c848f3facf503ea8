#include "core/device/emulated/emulated_runtime.h"

#include <c10/util/Exception.h>

#include <array>
#include <charconv>
#include <cstdint>
#include <cstdlib>
#include <string_view>

namespace moeforge::emulated {
namespace {

// The variable `name` as a whole number in [lo, hi]; `fallback` when it is unset.
uint64_t read_number(const char* name, uint64_t fallback, uint64_t lo, uint64_t hi, const char* meaning) {
  const char* value = std::getenv(name);
  if (value == nullptr) return fallback;
  const std::string_view text(value);
  uint64_t n = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), n);
  const bool whole = !text.empty() && error == std::errc() && end == text.data() + text.size();
  TORCH_CHECK_VALUE(whole && n >= lo && n <= hi, name, " is '", text, "': expected ", meaning, ", a whole number from ",
                    lo, " to ", hi, " (unset: ", fallback, ")");
  return n;
}

// The variable `name` as a switch: "1" on, "0" or unset off.
bool read_switch(const char* name, const char* meaning) {
  const char* value = std::getenv(name);
  if (value == nullptr) return false;
  const std::string_view text(value);
  TORCH_CHECK_VALUE(text == "0" || text == "1", name, " is '", text, "': expected 1 (", meaning, ") or 0 (unset: 0)");
  return text == "1";
}

Settings read_settings() {
  Settings s;
  s.devices = static_cast<c10::DeviceIndex>(read_number("MOEFORGE_EMULATED_DEVICES", static_cast<uint64_t>(s.devices),
                                                        1, kMaxDevices, "the number of emulated devices"));
  s.memory_bytes = read_number("MOEFORGE_EMULATED_MEMORY_BYTES", s.memory_bytes, 1, UINT64_MAX / 2,
                               "each emulated device's memory in bytes");
  s.stream_check = read_switch("MOEFORGE_EMULATED_STREAM_CHECK", "check the order of work across emulated streams");
  return s;
}

thread_local c10::DeviceIndex tl_device = 0;
thread_local std::array<c10::StreamId, kMaxDevices> tl_streams{};

}  // namespace

const Settings& settings() {
  // A throwing initialiser leaves the static uninitialised: the next call reads the variables again.
  static const Settings s = read_settings();
  return s;
}

c10::DeviceIndex checked_index(c10::DeviceIndex index) {
  if (index == -1) return tl_device;
  const c10::DeviceIndex devices = settings().devices;
  TORCH_CHECK_INDEX(index >= 0 && index < devices, "emulated:", static_cast<int>(index), " does not exist: there ",
                    devices == 1 ? "is 1 emulated device" : "are " + std::to_string(devices) + " emulated devices",
                    " (MOEFORGE_EMULATED_DEVICES)");
  return index;
}

c10::DeviceIndex current_device() { return tl_device; }

void set_current_device(c10::DeviceIndex index) { tl_device = index; }

c10::Stream current_stream(c10::DeviceIndex index) {
  const c10::DeviceIndex device = checked_index(index);
  return c10::Stream(c10::Stream::UNSAFE, c10::Device(c10::DeviceType::PrivateUse1, device), tl_streams[device]);
}

void set_current_stream(const c10::Stream& stream) {
  TORCH_CHECK(stream.device_type() == c10::DeviceType::PrivateUse1, "an emulated device's current stream must be ",
              "one of its streams, not one of ", stream.device());
  tl_streams[checked_index(stream.device_index())] = stream.id();
}

namespace {
thread_local void (*tl_on_host_sync)() = nullptr;
}  // namespace

void host_synced() {
  if (tl_on_host_sync != nullptr) tl_on_host_sync();
}

}  // namespace moeforge::emulated

void moeforge_emulated_on_host_sync(void (*callback)(void)) { moeforge::emulated::tl_on_host_sync = callback; }
