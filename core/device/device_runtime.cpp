#include "core/device/device_runtime.h"

#include "core/base/errors.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <fmt/format.h>

#include <dlfcn.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <mutex>

namespace moeforge {

namespace {

// dlopen'ed libraries stay loaded for the process: their static initialisers registered a backend
// that LibTorch keeps pointers into.
void load_library_once(const std::string& path) {
  static std::mutex mutex;
  static std::string loaded;
  const std::lock_guard lock(mutex);
  if (loaded == path) return;
  if (!loaded.empty()) {
    fail_user("hardware.device_library: {} is already loaded in this process, {} cannot be loaded beside it", loaded,
              path);
  }
  check_device_library_exists(path);
  if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    fail_user("hardware.device_library: {} could not be loaded: {}. It must be a LibTorch backend library built "
              "against this LibTorch ({})",
              path, dlerror(), TORCH_VERSION);
  }
  loaded = path;
}

}  // namespace

std::string emulated_library_path() {
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ((ec ? std::filesystem::current_path() : exe.parent_path()) / "libmoeforge_emulated.so").string();
}

void check_device_library_exists(const std::string& path) {
  if (!std::filesystem::exists(path)) {
    fail_user("hardware.device_library: {} does not exist. Point it at the backend library's .so (for "
              "hardware.device: emulated, build the moeforge_emulated target beside moeforge)",
              path);
  }
}

std::string device_library_path(const HardwareConfig& h) {
  if (!h.device_library.empty()) return h.device_library;
  return h.device == "emulated" ? emulated_library_path() : std::string();
}

c10::DeviceType training_device_type(const HardwareConfig& h, int64_t local_ranks) {
  if (h.device == "cpu") return c10::DeviceType::CPU;
  if (h.device == "emulated") {
    // Read by the emulator's static initialisers when it is loaded (core/device/emulated).
    const int64_t devices = h.emulated_devices_per_node.value_or(local_ranks);
    const auto bytes = static_cast<int64_t>(std::llround(h.emulated_memory_gib * static_cast<double>(1LL << 30)));
    setenv("MOEFORGE_EMULATED_DEVICES", std::to_string(devices).c_str(), 1);
    setenv("MOEFORGE_EMULATED_MEMORY_BYTES", std::to_string(bytes).c_str(), 1);
    setenv("MOEFORGE_EMULATED_STREAM_CHECK", h.emulated_stream_check ? "1" : "0", 1);
  }
  if (const auto library = device_library_path(h); !library.empty()) load_library_once(library);
  try {
    return c10::Device(h.device).type();
  } catch (const c10::Error&) {
    fail_user("hardware.device is '{}', a device type LibTorch does not know{}. Use cpu, cuda or emulated, or load "
              "the backend library that registers it with hardware.device_library",
              h.device, h.device_library.empty() ? "" : fmt::format(" (not registered by {})", h.device_library));
  }
}

int device_for_local_rank(int local_rank, int local_size, int devices, const std::string& device_type) {
  if (devices <= 0) {
    fail_user("hardware.device is {} but no {} device is visible to local rank {}. Check the node's devices "
              "(and CUDA_VISIBLE_DEVICES or its vendor's equivalent), or train with hardware.device: cpu.",
              device_type, device_type, local_rank);
  }
  if (local_size > devices) {
    fail_user("this node runs {} ranks but only {} {} device(s) are visible to them: each rank needs a device of its "
              "own (two ranks on one device is refused by NCCL). Start at most {} ranks per node (mpirun "
              "--map-by ppr:{}:node, or fewer -n), or make more devices visible (CUDA_VISIBLE_DEVICES; "
              "hardware.emulated_devices_per_node for the emulated device).",
              local_size, devices, device_type, devices, devices);
  }
  return local_rank;
}

torch::Device select_device(c10::DeviceType type, int local_rank, int local_size) {
  const std::string name = c10::DeviceTypeName(type, /*lower_case=*/true);
  if (!c10::impl::hasDeviceGuardImpl(type)) {
    fail_user("hardware.device is {} but this LibTorch has no runtime for it (a CUDA device in a build of LibTorch "
              "without CUDA, or a backend library that registered no device guard)",
              name);
  }
  const auto* guard = c10::impl::getDeviceGuardImpl(type);
  const int index = device_for_local_rank(local_rank, local_size, static_cast<int>(guard->deviceCount()), name);
  const torch::Device device(type, static_cast<c10::DeviceIndex>(index));
  guard->setDevice(device);
  return device;
}

int64_t stream_order_races() {
  // Exported by the emulator (core/device/emulated/emulated_stream_check.h), loaded RTLD_GLOBAL.
  using Count = long long (*)();
  const auto count = reinterpret_cast<Count>(dlsym(RTLD_DEFAULT, "moeforge_emulated_stream_races"));
  return count == nullptr ? 0 : static_cast<int64_t>(count());
}

}  // namespace moeforge
