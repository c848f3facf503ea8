#include "launch/train/energy.h"

#include <dlfcn.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <vector>

#ifdef MOEFORGE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace fs = std::filesystem;

namespace moeforge {

struct EnergyMeter::Reader {
  virtual ~Reader() = default;
  // Joules since the previous read (nullopt on the first or when a read fails).
  virtual std::optional<double> lap() = 0;
};

namespace {

std::optional<double> read_counter(const fs::path& p) {
  std::ifstream in(p);
  double v = 0;
  if (!(in >> v)) return std::nullopt;
  return v;
}

// RAPL: the top-level package domains (intel-rapl:N; their sub-domains intel-rapl:N:M are parts of
// them and would count twice), each a microjoule counter wrapping at its max_energy_range_uj.
class RaplReader : public EnergyMeter::Reader {
 public:
  explicit RaplReader(std::vector<fs::path> packages) : packages_(std::move(packages)) {}
  std::optional<double> lap() override {
    std::vector<double> now;
    for (const auto& p : packages_) {
      const auto v = read_counter(p / "energy_uj");
      if (!v) return std::nullopt;
      now.push_back(*v);
    }
    std::optional<double> joules;
    if (previous_.size() == now.size()) {
      double sum = 0;
      for (size_t i = 0; i < now.size(); ++i) {
        double d = now[i] - previous_[i];
        if (d < 0) d += read_counter(packages_[i] / "max_energy_range_uj").value_or(0);  // the counter wrapped
        sum += d;
      }
      joules = sum / 1e6;
    }
    previous_ = std::move(now);
    return joules;
  }

 private:
  std::vector<fs::path> packages_;
  std::vector<double> previous_;
};

// NVML, resolved by dlopen: libnvidia-ml ships with the driver, not the toolkit.
class NvmlReader : public EnergyMeter::Reader {
 public:
  using GetEnergy = int (*)(void*, unsigned long long*);
  NvmlReader(void* library, void* device, GetEnergy get) : library_(library), device_(device), get_(get) {}
  ~NvmlReader() override {
    if (auto shutdown = reinterpret_cast<int (*)()>(dlsym(library_, "nvmlShutdown"))) shutdown();
    dlclose(library_);
  }
  std::optional<double> lap() override {
    unsigned long long mj = 0;
    if (get_(device_, &mj) != 0) return std::nullopt;  // NVML_SUCCESS is 0
    std::optional<double> joules;
    if (previous_) joules = static_cast<double>(mj - *previous_) / 1e3;
    previous_ = mj;
    return joules;
  }

 private:
  void* library_;
  void* device_;
  GetEnergy get_;
  std::optional<unsigned long long> previous_;
};

// The CUDA device's PCI bus id, as NVML names devices whatever CUDA_VISIBLE_DEVICES renumbers.
std::string cuda_pci_bus_id(int index) {
#ifdef MOEFORGE_WITH_CUDA
  const auto* p = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(index));
  return fmt::format("{:08x}:{:02x}:{:02x}.0", p->pciDomainID, p->pciBusID, p->pciDeviceID);
#else
  (void)index;
  return {};
#endif
}

std::unique_ptr<EnergyMeter::Reader> open_nvml(int gpu_index, std::string& source, std::string& why) {
  void* lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    why = "libnvidia-ml.so.1 not found";
    return nullptr;
  }
  auto init = reinterpret_cast<int (*)()>(dlsym(lib, "nvmlInit_v2"));
  auto by_bus = reinterpret_cast<int (*)(const char*, void**)>(dlsym(lib, "nvmlDeviceGetHandleByPciBusId_v2"));
  auto get = reinterpret_cast<NvmlReader::GetEnergy>(dlsym(lib, "nvmlDeviceGetTotalEnergyConsumption"));
  const std::string bus = cuda_pci_bus_id(gpu_index);
  void* device = nullptr;
  unsigned long long probe = 0;
  if (!init || !by_bus || !get || init() != 0 || bus.empty() || by_bus(bus.c_str(), &device) != 0 || get(device, &probe) != 0) {
    why = fmt::format("NVML has no energy counter for GPU {}", bus.empty() ? std::to_string(gpu_index) : bus);
    dlclose(lib);
    return nullptr;
  }
  source = fmt::format("NVML total energy (GPU {})", bus);
  return std::make_unique<NvmlReader>(lib, device, get);
}

std::unique_ptr<EnergyMeter::Reader> open_rapl(const fs::path& root, std::string& source, std::string& why) {
  static const std::regex package(R"(intel-rapl:\d+)");
  std::vector<fs::path> packages;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    if (std::regex_match(e.path().filename().string(), package) && read_counter(e.path() / "energy_uj")) {
      packages.push_back(e.path());
    }
  }
  if (packages.empty()) {
    why = fmt::format("no readable RAPL package (intel-rapl:N/energy_uj) under {}", root.string());
    return nullptr;
  }
  std::sort(packages.begin(), packages.end());
  std::string names;
  for (const auto& p : packages) names += (names.empty() ? "" : ", ") + p.filename().string();
  source = fmt::format("RAPL packages ({}: {}), the whole node's CPUs", root.string(), names);
  return std::make_unique<RaplReader>(std::move(packages));
}

}  // namespace

fs::path default_powercap_root() {
  const char* dir = std::getenv("MOEFORGE_POWERCAP_DIR");
  return dir && *dir ? fs::path(dir) : fs::path("/sys/class/powercap");
}

EnergyMeter::EnergyMeter(std::unique_ptr<Reader> reader, std::string source) : reader_(std::move(reader)), source_(std::move(source)) {}
EnergyMeter::EnergyMeter(EnergyMeter&&) noexcept = default;
EnergyMeter& EnergyMeter::operator=(EnergyMeter&&) noexcept = default;
EnergyMeter::~EnergyMeter() = default;

EnergyMeter EnergyMeter::open(const std::string& device, int gpu_index, const fs::path& powercap_root) {
  std::string source, why_nvml, why_rapl;  // why each source is missing: what the report says
  if (device == "cuda") {  // a GPU run's energy is its GPU's: the CPUs' would be another number
    if (auto r = open_nvml(gpu_index, source, why_nvml)) return {std::move(r), source};
    return {nullptr, why_nvml};
  }
  if (auto r = open_rapl(powercap_root, source, why_rapl)) return {std::move(r), source};
  return {nullptr, why_rapl};
}

std::optional<double> EnergyMeter::lap() { return reader_ ? reader_->lap() : std::nullopt; }

}  // namespace moeforge
