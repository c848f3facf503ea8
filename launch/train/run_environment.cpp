#include "launch/train/run_environment.h"

#include "parallel/comm/process_groups.h"

#include <fmt/format.h>
#include <mpi.h>
#include <torch/torch.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <iterator>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <set>
#include <sstream>

using nlohmann::json;

namespace moeforge {

namespace {

// stdout of a command, trimmed; empty when it fails or does not exist.
std::string capture(const std::string& command) {
  std::string out;
  FILE* pipe = popen((command + " 2>/dev/null").c_str(), "r");
  if (!pipe) return out;
  std::array<char, 512> buf{};
  while (fgets(buf.data(), static_cast<int>(buf.size()), pipe)) out += buf.data();
  if (pclose(pipe) != 0) return "";
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

std::string first_line_value(const std::string& path, const std::string& key) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) == 0) {
      const auto colon = line.find(':');
      auto v = line.substr(colon + 1);
      v.erase(0, v.find_first_not_of(" \t"));
      return v;
    }
  }
  return "";
}

}  // namespace

std::vector<std::string> gather_hostnames(Communicator& world) {
  constexpr int64_t kMax = 256;
  char name[kMax] = {};
  gethostname(name, kMax - 1);
  auto mine = torch::zeros({1, kMax}, torch::kUInt8);
  std::memcpy(mine.data_ptr(), name, std::strlen(name));
  const auto all = world.size() > 1 ? world.all_gather(mine).contiguous() : mine;
  std::vector<std::string> out;
  for (int64_t r = 0; r < all.size(0); ++r) out.emplace_back(reinterpret_cast<const char*>(all[r].data_ptr<uint8_t>()));
  return out;
}

json run_environment(const ExperimentConfig& c, const std::vector<std::string>& hostnames, const std::string& command) {
  json j;
  j["moeforge_version"] = MOEFORGE_VERSION;
  // A benchmark with forced routing measures the machine under perfect balance, not training.
  j["moe_router_force_load_balancing"] = c.model.moe_router_force_load_balancing;
  const std::string commit = capture(fmt::format("git -C '{}' describe --always --dirty --abbrev=12", MOEFORGE_SOURCE_DIR));
  j["moeforge_commit"] = commit.empty() ? "unknown (not run from a git checkout)" : commit;
  j["compiler"] = fmt::format("gcc {}", __VERSION__);
  j["libtorch"] = TORCH_VERSION;
  char mpi[MPI_MAX_LIBRARY_VERSION_STRING];
  int length = 0;
  MPI_Get_library_version(mpi, &length);
  std::string mpi_version(mpi, static_cast<size_t>(length));
  j["mpi"] = mpi_version.substr(0, mpi_version.find_first_of(",\n"));
  j["nccl"] = nccl_version();
#ifdef MOEFORGE_WITH_CUDA
  j["cuda_build"] = true;
#else
  j["cuda_build"] = false;
#endif
  j["device"] = c.hardware.device;
  // Chips: the GPUs nvidia-smi lists on this node, or the CPU.
  json chips = json::array();
  const std::string smi = capture("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader,nounits");
  if (c.hardware.device == "cuda" && !smi.empty()) {
    std::istringstream lines(smi);
    std::string line;
    while (std::getline(lines, line)) {
      std::vector<std::string> f;
      std::istringstream fields(line);
      for (std::string x; std::getline(fields, x, ',');) f.push_back(x.substr(x.find_first_not_of(' ')));
      if (f.size() < 3) continue;
      chips.push_back({{"name", f[0]}, {"memory_total_bytes", std::stoll(f[2]) * (1LL << 20)}});
      j["driver"] = f[1];
    }
    const std::string cuda = capture("nvidia-smi | grep -o 'CUDA Version: [0-9.]*' | cut -d' ' -f3");
    j["cuda"] = cuda.empty() ? "unknown" : cuda;
  } else {
    const std::string cpu = first_line_value("/proc/cpuinfo", "model name");
    const std::string mem = first_line_value("/proc/meminfo", "MemTotal");  // "24563816 kB"
    chips.push_back({{"name", cpu.empty() ? "CPU" : cpu},
                     {"memory_total_bytes", mem.empty() ? 0 : std::stoll(mem) * 1024},
                     {"cores", static_cast<int64_t>(sysconf(_SC_NPROCESSORS_ONLN))}});
    j["driver"] = "none";
    j["cuda"] = "none";
  }
  j["chips"] = chips;
  // The device that ran, whatever the config says; a hardware.chip that names another is kept apart
  // (it chose the MFU's peak: the report says so).
  j["chip"] = chips.empty() ? "unknown" : chips[0]["name"].get<std::string>();
  if (!c.hardware.chip.empty()) j["config_chip"] = c.hardware.chip;
  j["threads_per_rank"] = at::get_num_threads();
  j["world_size"] = hostnames.size();
  j["hostnames"] = hostnames;
  const std::set<std::string> nodes(hostnames.begin(), hostnames.end());
  j["nodes"] = nodes.size();
  j["devices_per_node"] = hostnames.size() / std::max<size_t>(nodes.size(), 1);
  j["command"] = command;
  // Under mpirun (or srun) the rank's parent is the launcher: its command line is how the job started.
  if (hostnames.size() > 1) {
    std::ifstream in(fmt::format("/proc/{}/cmdline", getppid()), std::ios::binary);
    std::string raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::replace(raw.begin(), raw.end(), '\0', ' ');
    while (!raw.empty() && raw.back() == ' ') raw.pop_back();
    if (!raw.empty()) {
      const char* uri = std::getenv("OMPI_MCA_orte_hnp_uri");
      const std::string launcher = describe_launcher(raw, uri ? uri : "");
      j["launcher"] = launcher;
      if (launcher != raw) j["launcher_daemon"] = raw;  // what the parent really is
    }
  }
  const auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  j["started_at"] = stamp;
  return j;
}

std::string describe_launcher(const std::string& parent_command, const std::string& hnp_uri) {
  const std::string program = parent_command.substr(0, parent_command.find(' '));
  const std::string name = program.substr(program.rfind('/') == std::string::npos ? 0 : program.rfind('/') + 1);
  if (name != "orted" && name != "prted" && name != "prte") return parent_command;
  std::string where;
  if (const auto at = hnp_uri.find("tcp://"); at != std::string::npos) {
    const std::string address = hnp_uri.substr(at + 6);
    const auto port = address.rfind(':');
    const auto end = address.find_first_of(",;");
    where = " on " + address.substr(0, std::min(port, end));
  }
  return fmt::format("mpirun{} (remote daemon {})", where, name);
}

bool chip_matches(std::string_view configured, std::string_view detected) {
  const auto lower = [](std::string_view v) {
    std::string out(v);
    std::transform(out.begin(), out.end(), out.begin(), [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
    return out;
  };
  const std::string a = lower(configured), b = lower(detected);
  return !a.empty() && !b.empty() && (b.find(a) != std::string::npos || a.find(b) != std::string::npos);
}

std::string shell_command_line(int argc, char** argv) {
  std::string out;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    const bool plain = !a.empty() && a.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                                                         "_-./=:,+@%") == std::string::npos;
    if (!plain) {
      std::string q = "'";
      for (char ch : a) q += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
      a = q + "'";
    }
    out += (i ? " " : "") + a;
  }
  return out;
}

}  // namespace moeforge
