// defines: default_generator, new_generator, cpu_generator_of
//
// The emulated devices' random number generators. Random ops run CPU kernels (emulated_fallback.cpp),
// which draw from the CPU's default generator when given none, so an emulated run draws the same
// numbers as a CPU run after the same torch::manual_seed. An emulated generator wraps a CPU one
// (same seed and state API); a kernel handed an emulated generator explicitly gets that CPU one.
#pragma once

#include <ATen/core/Generator.h>
#include <c10/core/Device.h>

namespace moeforge::emulated {

// Device `index`'s default generator (-1: the current device's), made on first use.
const at::Generator& default_generator(c10::DeviceIndex index);
// A fresh generator of device `index` (-1: the current device).
at::Generator new_generator(c10::DeviceIndex index);
// The CPU generator inside an emulated generator.
at::Generator cpu_generator_of(const at::Generator& generator);

}  // namespace moeforge::emulated
