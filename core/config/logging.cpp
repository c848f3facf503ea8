#include "core/config/logging.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <string>

namespace moeforge {

namespace {
spdlog::level::level_enum to_spdlog(LogLevel level) {
  switch (level) {
    case LogLevel::trace: return spdlog::level::trace;
    case LogLevel::debug: return spdlog::level::debug;
    case LogLevel::info: return spdlog::level::info;
    case LogLevel::warn: return spdlog::level::warn;
    case LogLevel::error: return spdlog::level::err;
  }
  return spdlog::level::info;
}
}  // namespace

namespace {
int g_rank = 0;
bool g_all_ranks = false;
}  // namespace

void set_log_level(LogLevel level) {
  spdlog::set_level(g_rank == 0 || g_all_ranks ? to_spdlog(level) : spdlog::level::warn);
}

void init_logging(int rank, LogLevel level, bool all_ranks) {
  g_rank = rank;
  g_all_ranks = all_ranks;
  // stderr, so that `--json` output on stdout stays machine-readable.
  spdlog::drop("moeforge");
  auto logger = spdlog::stderr_color_mt("moeforge");
  logger->set_pattern(fmt::format("[%H:%M:%S.%e] [rank {}] [%^%l%$] %v", rank));
  spdlog::set_default_logger(logger);
  set_log_level(level);
}

ProgressTicker::ProgressTicker(std::string what) : what_(std::move(what)) {
  thread_ = std::thread([this] {
    const auto start = std::chrono::steady_clock::now();
    std::unique_lock lock(mutex_);
    for (auto at = std::chrono::seconds(5); !done_.wait_until(lock, start + at, [this] { return stopping_; });
         at = at < std::chrono::seconds(40) ? at * 2 : at + std::chrono::seconds(60)) {
      spdlog::info("{}: {} s so far", what_, at.count());
    }
  });
}

ProgressTicker::~ProgressTicker() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  done_.notify_one();
  thread_.join();
}

}  // namespace moeforge
