// defines: run_check_hang (`moeforge check hang RUN_DIR`, launch/commands/hang_command.cpp)
#pragma once

#include <string>

namespace moeforge {

// The flight recorders' dumps of a run that hung (`RUN_DIR/hang/rank_N.json`, or a directory of
// them) compared as rank 0 compares them at the timeout (parallel/comm/hang_analysis.h). Prints the
// verdict. Exit 0: a cause named; 1: no dumps there (a message says where it looked); 2: dumps
// that agree ("no mismatch found").
int run_check_hang(const std::string& run_dir);

}  // namespace moeforge
