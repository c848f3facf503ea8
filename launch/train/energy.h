// defines: EnergyMeter, default_powercap_root
//
// Energy per step, as FlagPerf collects power: where the device exposes a cumulative energy
// counter. On NVIDIA GPUs, NVML's nvmlDeviceGetTotalEnergyConsumption (millijoules since the driver
// loaded), with libnvidia-ml loaded at run time (dlopen: a build without the driver still runs);
// on CPUs, the RAPL package domains of the Linux powercap interface (energy_uj, wrapping at
// max_energy_range_uj) where they are readable. Otherwise nothing: the report says "not recorded".
// A RAPL package is the whole socket, shared by every rank and process on it: the energy is the
// node's CPUs', not one rank's.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>

namespace moeforge {

// MOEFORGE_POWERCAP_DIR when set (tests point it at a fake tree), else /sys/class/powercap.
std::filesystem::path default_powercap_root();

class EnergyMeter {
 public:
  struct Reader;  // one source: NVML or RAPL

  // device "cuda": NVML for CUDA device `gpu_index`; otherwise (or when NVML is missing) the RAPL
  // packages under `powercap_root`. Unavailable, with the reason in source(), when neither works.
  static EnergyMeter open(const std::string& device, int gpu_index, const std::filesystem::path& powercap_root);

  EnergyMeter(EnergyMeter&&) noexcept;
  EnergyMeter& operator=(EnergyMeter&&) noexcept;
  ~EnergyMeter();

  bool available() const { return reader_ != nullptr; }
  // "RAPL (/sys/class/powercap: intel-rapl:0, intel-rapl:1)", "NVML (GPU 0000:3b:00.0)", or why
  // nothing is measured.
  const std::string& source() const { return source_; }
  // Joules since the previous call; nullopt on the first call, when unavailable, or a read failed.
  std::optional<double> lap();

 private:
  EnergyMeter(std::unique_ptr<Reader> reader, std::string source);
  std::unique_ptr<Reader> reader_;
  std::string source_;
};

}  // namespace moeforge
