// defines: init_logging, set_log_level, ProgressTicker
//
// Rank-aware logging on spdlog's default logger. Rank 0 logs at the configured level; other ranks
// log warnings and errors only (unless all_ranks), each line tagged with its rank, so an
// 8-rank run prints one readable stream.
#pragma once

#include "core/config/config.h"

#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

namespace moeforge {

// `rank`: this process's world rank (0 until MPI has said otherwise).
void init_logging(int rank, LogLevel level, bool all_ranks = false);

// Applies a level (e.g. the config's logging.log_level) to the logger init_logging made.
void set_log_level(LogLevel level);

// While alive, logs "{what}: N s so far" after 5, 10, 20 and 40 s, then every minute: progress of
// one long step that reports nothing itself (a save), so a user (and the ranks' logs) can tell a
// slow step from a hung one.
class ProgressTicker {
 public:
  explicit ProgressTicker(std::string what);
  ~ProgressTicker();
  ProgressTicker(const ProgressTicker&) = delete;
  ProgressTicker& operator=(const ProgressTicker&) = delete;

 private:
  std::string what_;
  std::mutex mutex_;
  std::condition_variable done_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace moeforge
