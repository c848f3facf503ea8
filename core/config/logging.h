// defines: init_logging, set_log_level
//
// Rank-aware logging on spdlog's default logger. Rank 0 logs at the configured level; other ranks
// log warnings and errors only (unless all_ranks), each line tagged with its rank, so an
// 8-rank run prints one readable stream.
#pragma once

#include "core/config/config.h"

namespace moeforge {

// `rank`: this process's world rank (0 until MPI has said otherwise).
void init_logging(int rank, LogLevel level, bool all_ranks = false);

// Applies a level (e.g. the config's logging.log_level) to the logger init_logging made.
void set_log_level(LogLevel level);

}  // namespace moeforge
