// defines: Settings, settings, kMaxDevices, checked_index, current_device, set_current_device,
// current_stream, set_current_stream, host_synced; and for moeforge (dlsym):
// moeforge_emulated_on_host_sync
//
// The emulated accelerator: a LibTorch backend in the PrivateUse1 slot ("emulated") whose device
// memory is host memory and whose kernels are the CPU's, run on CPU tensors over the device bytes.
// It lets every device code path (device tensors, copies, streams, events, the caching allocator's
// statistics and out-of-memory errors) run on a machine without a GPU, with the CPU's numbers.
// libmoeforge_emulated.so registers it from its static initialisers when dlopen'ed.
//
// Note [emulated device order]: the emulator runs every op eagerly on the host, in program order,
// whatever stream it was issued on: when an op returns, its work is done. So an event is complete
// once recorded, a stream waiting on one never waits, and synchronising is a no-op; a GPU would run
// ahead of the host and these would order real work.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Stream.h>

#include <cstddef>

namespace moeforge::emulated {

// c10::DeviceIndex is 8 bits; no node has more GPUs than this.
inline constexpr c10::DeviceIndex kMaxDevices = 64;

// From the environment moeforge sets before it loads the library.
struct Settings {
  c10::DeviceIndex devices = 1;           // MOEFORGE_EMULATED_DEVICES
  size_t memory_bytes = size_t{16} << 30;  // MOEFORGE_EMULATED_MEMORY_BYTES, each device's capacity
  bool stream_check = false;               // MOEFORGE_EMULATED_STREAM_CHECK=1 (emulated_stream_check.h)
};

// Read on first use (so that a bad value surfaces as an exception where the device is used, not as
// a crash while the library loads); throws c10::ValueError naming the variable and its value, on
// every call while the value is bad.
const Settings& settings();

// `index` (-1: the current device) after checking it names one of the emulated devices.
c10::DeviceIndex checked_index(c10::DeviceIndex index);

// Per thread, as CUDA keeps them: the current device, and each device's current stream (its
// default stream, id 0, until set).
c10::DeviceIndex current_device();
void set_current_device(c10::DeviceIndex index);
c10::Stream current_stream(c10::DeviceIndex index);
void set_current_stream(const c10::Stream& stream);

// The host waited for the device: a blocking copy to the host, .item(), a stream or device
// synchronisation (what CUDA's sync debug mode reports; event waits are not among them). Calls the
// calling thread's callback, if moeforge set one (its host_syncs count, core/device/host_sync.h).
void host_synced();

}  // namespace moeforge::emulated

extern "C" {
// Sets the calling thread's host-sync callback (nullptr: none), as CUDA's sync debug mode reports
// to the calling thread's warning handler: syncs on other threads are not reported.
__attribute__((visibility("default"))) void moeforge_emulated_on_host_sync(void (*callback)(void));
}
