// defines: training_device_type, device_library_path, emulated_library_path, check_device_library_exists,
//          device_for_local_rank, select_device, stream_order_races
//
// The run's accelerator, whatever it is: CUDA, the emulated device (core/device/emulated, a LibTorch
// backend library of our own in the PrivateUse1 slot), or a device type a vendor's backend library
// registers. Everything here is keyed on the device type through LibTorch's generic device guard,
// never on at::accelerator's process-wide choice (which prefers any registered PrivateUse1 backend
// over CUDA).
#pragma once

#include "core/config/config.h"

#include <torch/torch.h>

#include <string>

namespace moeforge {

// The backend library a run of `h` loads: hardware.device_library, or for `emulated` the emulator
// built beside this executable; empty for none.
std::string device_library_path(const HardwareConfig& h);
// libmoeforge_emulated.so beside the running executable.
std::string emulated_library_path();
// Throws UserError naming `path` and the fix unless the backend library exists (not loading it).
void check_device_library_exists(const std::string& path);

// Loads the run's backend library (once per process; the emulator is told its devices per node
// and memory first) and returns hardware.device as a LibTorch device type. Throws UserError naming
// the library and the fix when it cannot be loaded, and naming the device when LibTorch does not
// know it. `local_ranks`: the ranks on this node (the emulator's default device count).
c10::DeviceType training_device_type(const HardwareConfig& h, int64_t local_ranks);

// The device of local rank `local_rank` of the `local_size` ranks on this node, given `devices`
// visible devices of type `device_type` ("cuda"): the local rank itself, each rank a device of its
// own. Throws UserError naming the counts when the node runs more ranks than it has devices (NCCL
// refuses two ranks on one device, with an error that does not say why) or has none.
int device_for_local_rank(int local_rank, int local_size, int devices, const std::string& device_type);

// Races the emulated device's stream-order checker (hardware.emulated_stream_check) has reported in
// this process so far; 0 when the emulator is not loaded.
int64_t stream_order_races();

// The device this rank trains on, made current: `type`'s device of device_for_local_rank().
torch::Device select_device(c10::DeviceType type, int local_rank, int local_size);

}  // namespace moeforge
