// Registration of the emulated backend, run by the library's static initialisers when moeforge
// dlopens it: the name "emulated" for the PrivateUse1 slot (so c10::Device("emulated:0") parses), its
// allocator, and the hooks through which ATen asks an accelerator about itself. The device guard
// (emulated_guard.cpp) and the kernels (emulated_fallback.cpp, emulated_ops.cpp,
// emulated_attention.cpp) register themselves in their own files.
#include "core/device/emulated/emulated_allocator.h"
#include "core/device/emulated/emulated_generator.h"
#include "core/device/emulated/emulated_runtime.h"

#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

namespace moeforge::emulated {
namespace {

struct Hooks final : at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override {
    // Must not throw: bad settings read as unavailable here, and throw where a device is used.
    try {
      return settings().devices > 0;
    } catch (const c10::Error&) {
      return false;
    }
  }
  bool hasPrimaryContext(c10::DeviceIndex /*device_index*/) const override { return true; }
  void init() const override { (void)settings(); }
  c10::DeviceIndex deviceCount() const override { return settings().devices; }

  void setCurrentDevice(c10::DeviceIndex device) const override { set_current_device(checked_index(device)); }
  c10::DeviceIndex getCurrentDevice() const override { return current_device(); }
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex device) const override {
    const c10::DeviceIndex previous = current_device();
    set_current_device(checked_index(device));
    return previous;
  }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex device) const override { return exchangeDevice(device); }

  const at::Generator& getDefaultGenerator(c10::DeviceIndex device_index) const override {
    return default_generator(device_index);
  }
  at::Generator getNewGenerator(c10::DeviceIndex device_index) const override { return new_generator(device_index); }

  at::Device getDeviceFromPtr(void* data) const override {
    const auto device = device_of_pointer(data);
    TORCH_CHECK(device.has_value(), "pointer ", data, " is not in any emulated device's allocated memory");
    return {c10::DeviceType::PrivateUse1, *device};
  }
  // Host memory is what an emulator would pin: pinned tensors come from the CPU allocator, and no
  // pointer counts as pinned.
  bool isPinnedPtr(const void* /*data*/) const override { return false; }
  c10::Allocator* getPinnedMemoryAllocator() const override { return c10::GetCPUAllocator(); }

  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t newsize) const override {
    resize_storage_bytes(*storage.unsafeGetStorageImpl(), newsize);
  }
};

struct Registration {
  Registration() {
    c10::register_privateuse1_backend("emulated");
    c10::SetAllocator(c10::DeviceType::PrivateUse1, &allocator());
    // LibTorch keeps the pointer for the life of the process.
    at::RegisterPrivateUse1HooksInterface(new Hooks());
  }
};

const Registration registration;

}  // namespace
}  // namespace moeforge::emulated
