#include "launch/train/profiler.h"

#include "core/files/durable_file.h"
#include "core/base/errors.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <tuple>

namespace fs = std::filesystem;
namespace kineto = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;

namespace moeforge {

namespace {

constexpr const char* kKinetoLogLevelEnv = "KINETO_LOG_LEVEL";
constexpr const char* kKinetoSilent = "6";

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// The host's operators, and CUDA's kernels on a GPU (another backend's kernels need its own
// profiler plugin, which LibTorch does not ship: its ops are recorded on the host side only).
std::set<ActivityType> activities(const torch::Device& device) {
  std::set<ActivityType> a{ActivityType::CPU};
  if (device.is_cuda()) a.insert(ActivityType::CUDA);
  return a;
}

}  // namespace

StepProfiler::StepProfiler(const LoggingConfig& c, bool this_rank, const torch::Device& device)
    : enabled_(c.profile && this_rank), device_(device), start_(c.profile_step_start), end_(c.profile_step_end),
      dir_(fs::path(c.run_dir) / "profile") {
  // Kineto in a CUDA build of LibTorch asks the CUDA runtime for every GPU's properties when it
  // processes a trace, even a CPU-only one; on a machine without a GPU driver that fails and it
  // prints `ERROR ... gpuGetDeviceCount failed with code 35` to stderr, beside its
  // `profiler_start` / `profiler_stop` lines: noise about devices a CPU profile does not record.
  // Kineto reads its level from KINETO_LOG_LEVEL once, when the process's first profile starts
  // (after this); above its highest level (USDT = 5) it prints nothing. A level the user set is
  // kept, and a CUDA run keeps Kineto's messages: they are about what it records.
  if (enabled_ && !device_.is_cuda()) setenv(kKinetoLogLevelEnv, kKinetoSilent, /*overwrite=*/0);
}

void StepProfiler::before_step(int64_t iteration) {
  if (!enabled_ || running_ || iteration != start_) return;
  fs::create_directories(dir_);
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  kineto::prepareProfiler(config, activities(device_));
  kineto::enableProfiler(config, activities(device_));
  running_ = true;
  wall_start_s_ = now_s();
  spdlog::info("profiling iterations {}..{} (logging.profile)", start_, end_ - 1);
}

void StepProfiler::after_step(int64_t iteration) {
  if (!running_ || iteration != end_ - 1) return;
  if (!device_.is_cpu()) c10::impl::getDeviceGuardImpl(device_.type())->synchronizeDevice(device_.index());
  const double wall_us = (now_s() - wall_start_s_) * 1e6;
  const auto result = kineto::disableProfiler();
  running_ = false;
  const fs::path trace = dir_ / "trace.json";
  result->save(trace.string());
  // Self time: an operator's time minus that of the operators it called (nested on its thread).
  struct Interval {
    uint64_t start, end;
    std::string name;
    bool device;
    uint64_t thread;
  };
  std::vector<Interval> events;
  for (const auto& e : result->events()) {
    events.push_back({e.startNs(), e.endNs(), e.name(), e.deviceType() != c10::DeviceType::CPU, e.startThreadId()});
  }
  std::sort(events.begin(), events.end(), [](const Interval& a, const Interval& b) {
    return std::tie(a.device, a.thread, a.start, b.end) < std::tie(b.device, b.thread, b.start, a.end);
  });
  std::map<std::pair<std::string, bool>, ProfiledOp> by_name;
  std::vector<std::pair<const Interval*, uint64_t>> open;  // an enclosing operator, its children's time
  auto close = [&](const Interval& e, uint64_t children) {
    auto& op = by_name[{e.name, e.device}];
    op.name = e.name;
    op.device = e.device;
    op.total_us += static_cast<double>(e.end - e.start - std::min(children, e.end - e.start)) / 1e3;
    ++op.calls;
  };
  for (size_t i = 0; i < events.size(); ++i) {
    const Interval& e = events[i];
    while (!open.empty() && (open.back().first->device != e.device || open.back().first->thread != e.thread ||
                             open.back().first->end <= e.start)) {
      close(*open.back().first, open.back().second);
      open.pop_back();
    }
    if (!e.device && !open.empty()) open.back().second += e.end - e.start;
    if (e.device) {
      close(e, 0);  // kernels do not nest
    } else {
      open.emplace_back(&e, 0);
    }
  }
  for (; !open.empty(); open.pop_back()) close(*open.back().first, open.back().second);
  std::vector<ProfiledOp> ops;
  for (auto& [key, op] : by_name) ops.push_back(std::move(op));
  const fs::path table = dir_ / "top_ops.txt";
  write_file_durably(table, fmt::format("profile of iterations {}..{} ({:.1f} ms wall)\n", start_, end_ - 1, wall_us / 1e3) +
                                top_ops_table(std::move(ops), wall_us));
  spdlog::info("profile: {} and {}", trace.string(), table.string());
}

std::string top_ops_table(std::vector<ProfiledOp> ops, double wall_us, size_t rows) {
  std::string out;
  for (const bool device : {true, false}) {
    std::vector<ProfiledOp> part;
    for (const auto& op : ops) {
      if (op.device == device) part.push_back(op);
    }
    if (part.empty()) continue;
    std::sort(part.begin(), part.end(), [](const auto& a, const auto& b) { return a.total_us > b.total_us; });
    out += fmt::format("\n{} (self time: an operator's own, without the operators it calls)\n",
                       device ? "GPU kernels and copies" : "CPU operators");
    out += fmt::format("  {:>12}  {:>7}  {:>8}  {}\n", "self ms", "% wall", "calls", "name");
    for (size_t i = 0; i < std::min(rows, part.size()); ++i) {
      const auto& op = part[i];
      // Kernel names of templates run long: the first 120 characters tell them apart.
      const std::string_view name(op.name);
      out += fmt::format("  {:>12.3f}  {:>6.1f}%  {:>8}  {}{}\n", op.total_us / 1e3, 100 * op.total_us / wall_us, op.calls,
                         name.substr(0, 117), name.size() > 120 ? "..." : name.substr(std::min<size_t>(117, name.size())));
    }
  }
  return out;
}

}  // namespace moeforge
