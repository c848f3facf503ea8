#include "launch/train/exit_conditions.h"

#include "core/base/signals.h"

#include <fmt/format.h>
#include <unistd.h>

#include <csignal>
#include <ctime>
#include <fstream>
#include <sstream>
#include <string>

namespace moeforge {

namespace {

volatile std::sig_atomic_t g_signal_received = 0;
struct sigaction g_previous {};

extern "C" void on_exit_signal(int) { g_signal_received = 1; }

double boot_clock_s() {
  timespec ts{};
  clock_gettime(CLOCK_BOOTTIME, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// When this process started, on the boot clock: Megatron counts exit_duration_in_mins from the
// program's start (start-up, index building and loading included), not from the first step.
double process_start_s() {
  std::ifstream in("/proc/self/stat");
  std::string stat;
  std::getline(in, stat);
  // Field 22 (starttime, clock ticks after boot) counts from the one after the command's ")".
  const auto close = stat.rfind(')');
  if (close != std::string::npos) {
    std::istringstream fields(stat.substr(close + 2));
    std::string field;
    for (int i = 3; i <= 22 && fields >> field; ++i) {
      if (i == 22) return std::stod(field) / static_cast<double>(sysconf(_SC_CLK_TCK));
    }
  }
  return boot_clock_s();  // no /proc: from now
}

}  // namespace

ExitConditions::ExitConditions(const TrainingConfig& t)
    : duration_s_(t.exit_duration_in_mins ? std::optional<double>(*t.exit_duration_in_mins * 60) : std::nullopt),
      interval_(t.exit_interval), process_start_s_(process_start_s()) {
  if (!t.exit_signal_handler) return;
  signal_ = *exit_signal_number(t.exit_signal);  // validated with the config
  signal_name_ = t.exit_signal;
  g_signal_received = 0;
  struct sigaction action {};
  action.sa_handler = on_exit_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;  // file writes and MPI calls in progress go on
  sigaction(signal_, &action, &g_previous);
}

ExitConditions::~ExitConditions() {
  if (signal_ >= 0) sigaction(signal_, &g_previous, nullptr);
}

StopVotes ExitConditions::vote() const {
  return {signal_ >= 0 && g_signal_received != 0, duration_s_ && boot_clock_s() - process_start_s_ > *duration_s_};
}

std::optional<std::string> ExitConditions::reason(const StopVotes& agreed, int64_t iteration) const {
  if (agreed.signal) return fmt::format("{} received (training.exit_signal_handler)", signal_name_);
  if (agreed.duration) {
    return fmt::format("the run has lasted more than training.exit_duration_in_mins ({:g} minutes)", *duration_s_ / 60);
  }
  if (interval_ && iteration % *interval_ == 0) {
    return fmt::format("iteration {} is a multiple of training.exit_interval ({})", iteration, *interval_);
  }
  return std::nullopt;
}

}  // namespace moeforge
