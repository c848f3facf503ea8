#include "parallel/comm/hang_analysis.h"

#include "core/base/errors.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>

namespace moeforge {

namespace fs = std::filesystem;
using nlohmann::json;

std::vector<json> read_hang_dumps(const fs::path& dir) {
  std::vector<json> dumps;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return dumps;
  const std::regex name(R"(rank_(\d+)\.json)");
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (std::regex_match(entry.path().filename().string(), name)) files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  for (const auto& file : files) {
    std::ifstream in(file);
    json dump = json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (dump.is_discarded() || !dump.is_object() || !dump.contains("world_rank") || !dump.contains("groups")) {
      fail_user("{} is not a flight-recorder dump (a JSON object with world_rank and groups, docs/hang.md): "
                "remove it or the file it was copied over",
                file.string());
    }
    dump["file"] = file.string();
    dumps.push_back(std::move(dump));
  }
  return dumps;
}

namespace {

// One member's view of a group.
struct Member {
  int world_rank = 0;
  uint64_t issued = 0;               // collectives issued
  std::map<uint64_t, json> by_seq;   // the ring's collectives
};

std::string describe(const json& op) {
  std::string text = fmt::format("{}({}, {} elements", op.value("op", "?"), op.value("dtype", "?"), op.value("count", int64_t{0}));
  const int peer = op.value("peer", -1);
  if (peer >= 0) text += fmt::format(", {} {}", op.value("op", "") == std::string("broadcast") ? "root" : "peer", peer);
  return text + ")";
}

bool same_call(const json& a, const json& b) {
  if (a.value("op", "") != b.value("op", "") || a.value("dtype", "") != b.value("dtype", "") ||
      a.value("peer", -1) != b.value("peer", -1)) {
    return false;
  }
  // An all-to-all's rows per peer differ between ranks by design.
  return a.value("op", "") == std::string("all_to_all") || a.value("count", int64_t{0}) == b.value("count", int64_t{0});
}

std::string group_label(const json& g) {
  const std::string channel = g.value("channel", "main");
  return fmt::format("group {}{} (world ranks [{}])", g.value("group", "?"), channel == "main" ? "" : " (" + channel + " calls)",
                     fmt::join(g.value("world_ranks", std::vector<int>{}), ", "));
}

}  // namespace

HangVerdict analyse_hang(const std::vector<json>& dumps) {
  HangVerdict verdict;
  // The likeliest cause first: calls that differ, then ranks behind, then ranks without a dump.
  std::vector<std::string> differing, behind_lines;
  std::set<int> absent;  // members of a dumped group with no dump of their own
  std::set<int> dumped;
  for (const auto& d : dumps) dumped.insert(d.value("world_rank", -1));
  // Groups by identity, each with the members that dumped it.
  std::map<std::string, std::pair<json, std::vector<Member>>> groups;
  for (const auto& d : dumps) {
    for (const auto& g : d.value("groups", json::array())) {
      const std::string key = group_label(g);
      auto& [identity, members] = groups[key];
      identity = g;
      Member m;
      m.world_rank = d.value("world_rank", -1);
      m.issued = g.value("collectives_issued", uint64_t{0});
      for (const auto& op : g.value("ops", json::array())) {
        if (op.value("kind", "") == std::string("collective")) m.by_seq[op.value("seq", uint64_t{0})] = op;
      }
      members.push_back(std::move(m));
    }
  }
  for (auto& [label, entry] : groups) {
    auto& [identity, members] = entry;
    for (int r : identity.value("world_ranks", std::vector<int>{})) {
      if (!dumped.count(r)) absent.insert(r);
    }
    if (members.size() < 2) continue;
    std::sort(members.begin(), members.end(), [](const Member& a, const Member& b) { return a.world_rank < b.world_rank; });
    // The sequence numbers every member's ring still holds.
    uint64_t lo = 0, hi = UINT64_MAX;
    for (const auto& m : members) {
      lo = std::max(lo, m.by_seq.empty() ? m.issued : m.by_seq.begin()->first);
      hi = std::min(hi, m.issued);
    }
    bool differ = false;
    for (uint64_t s = lo; s < hi && !differ; ++s) {
      const auto first = members[0].by_seq.find(s);
      for (const auto& m : members) {
        const auto it = m.by_seq.find(s);
        if (it == m.by_seq.end() || first == members[0].by_seq.end() || !same_call(it->second, first->second)) differ = true;
      }
      if (!differ) continue;
      std::vector<std::string> each;
      for (const auto& m : members) {
        const auto it = m.by_seq.find(s);
        each.push_back(fmt::format("rank {} issued {}", m.world_rank, it == m.by_seq.end() ? "?" : describe(it->second)));
      }
      verdict.found = true;
      differing.push_back(fmt::format("{}: ranks differ first at collective seq {}: {}", label, s, fmt::join(each, "; ")));
    }
    if (differ) continue;
    // Same calls as far as all went: who stopped short of the furthest.
    const auto furthest = std::max_element(members.begin(), members.end(),
                                           [](const Member& a, const Member& b) { return a.issued < b.issued; });
    std::vector<int> behind;
    uint64_t behind_at = furthest->issued;
    for (const auto& m : members) {
      if (m.issued < furthest->issued) {
        behind.push_back(m.world_rank);
        behind_at = std::min(behind_at, m.issued);
      }
    }
    if (behind.empty()) continue;
    std::vector<int> reached;
    std::string what = "?";
    for (const auto& m : members) {
      if (m.issued > behind_at) {
        reached.push_back(m.world_rank);
        if (const auto it = m.by_seq.find(behind_at); it != m.by_seq.end()) what = describe(it->second);
      }
    }
    verdict.found = true;
    behind_lines.push_back(fmt::format("{}: rank(s) {} never arrived at collective seq {}, which rank(s) {} reached with {}", label,
                                        fmt::join(behind, ", "), behind_at, fmt::join(reached, ", "), what));
  }
  for (auto* part : {&differing, &behind_lines}) verdict.lines.insert(verdict.lines.end(), part->begin(), part->end());
  if (!absent.empty()) {
    verdict.found = true;
    verdict.lines.push_back(fmt::format("rank(s) {} wrote no dump: they did not reach the watchdog (exited, were killed, or "
                                        "were not in a communication call)",
                                        fmt::join(absent, ", ")));
  }
  if (!verdict.found) verdict.lines.push_back("no mismatch found: ranks stopped at the same op");
  return verdict;
}

}  // namespace moeforge
