#include "launch/commands/hang_command.h"

#include "parallel/comm/hang_analysis.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstdio>
#include <filesystem>
#include <set>

namespace moeforge {

namespace fs = std::filesystem;

int run_check_hang(const std::string& run_dir) {
  // The run's directory, or its hang/ directory itself.
  fs::path dir = fs::path(run_dir) / kHangDir;
  if (!fs::is_directory(dir) && fs::exists(fs::path(run_dir) / "rank_0.json")) dir = run_dir;
  auto dumps = read_hang_dumps(dir);
  if (dumps.empty()) {
    std::fprintf(stderr,
                 "error: no flight-recorder dumps (rank_N.json) in %s: the ranks write them there when the communication "
                 "watchdog ends a job (parallel.distributed_timeout_minutes) or MPI reports an error; give the run's "
                 "logging.run_dir\n",
                 dir.c_str());
    return 1;
  }
  std::set<int> ranks;
  std::string world_size = "?";
  for (const auto& d : dumps) {
    ranks.insert(d.value("world_rank", -1));
    if (d.contains("world_size")) world_size = d["world_size"].dump();
  }
  std::printf("%zu dumps in %s (world ranks %s of a world of %s)\n", dumps.size(), dir.c_str(),
              fmt::format("{}", fmt::join(ranks, ", ")).c_str(), world_size.c_str());
  for (const auto& d : dumps) {
    std::printf("  rank %d (host %s): %s\n", d.value("world_rank", -1), d.value("host", "?").c_str(), d.value("reason", "").c_str());
  }
  const HangVerdict verdict = analyse_hang(dumps);
  std::printf("verdict:\n");
  for (const auto& line : verdict.lines) std::printf("  %s\n", line.c_str());
  return verdict.found ? 0 : 2;
}

}  // namespace moeforge
