// defines: kHangDir, kHangVerdictFile, HangVerdict, read_hang_dumps, analyse_hang
//
// The comparison of the flight recorders' dumps (parallel/comm/flight_recorder.h): rank 0 runs it
// after a timeout, `moeforge check hang RUN_DIR` afterwards. Per group (name, channel and members,
// so the two data-parallel groups of a 4-rank job are told apart), over the collectives every
// member's ring still holds: the first sequence number at which the members' fingerprints differ
// and what each issued there; else the member(s) that never arrived at a sequence number others
// reached; a member with no dump at all is named too. All-to-all counts are left out of the
// fingerprint (uneven by design), and point-to-point calls are not compared (a pipeline's ranks
// issue different ones by design).
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>
#include <vector>

namespace moeforge {

inline constexpr const char* kHangDir = "hang";  // under logging.run_dir
// Rank 0's verdict at the timeout, beside the dumps; the other ranks wait for it before ending.
inline constexpr const char* kHangVerdictFile = "verdict.txt";

struct HangVerdict {
  bool found = false;              // a cause was named
  std::vector<std::string> lines;  // the verdict, one finding a line
};

// Every `rank_N.json` of `dir`, each with the file it came from under "file"; a file that is not a
// dump is a UserError naming it. Empty when there are none.
std::vector<nlohmann::json> read_hang_dumps(const std::filesystem::path& dir);

HangVerdict analyse_hang(const std::vector<nlohmann::json>& dumps);

}  // namespace moeforge
