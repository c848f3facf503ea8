#include "parallel/comm/flight_recorder.h"

#include "core/files/durable_file.h"
#include "parallel/comm/hang_analysis.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <set>
#include <shared_mutex>
#include <unordered_map>
#include <thread>
#include <utility>

namespace moeforge {

namespace fs = std::filesystem;

namespace {

// The live recorders (a dump reads them all) and what the process knows of the world.
struct Registry {
  std::mutex mutex;
  std::vector<const FlightRecorder*> recorders;
  std::vector<std::string> hosts;  // by world rank
  int world_rank = 0;
  fs::path dump_dir;
};

Registry& registry() {
  static Registry r;
  return r;
}

// This thread's last issued call (the watchdog's Watched is made on the thread that waits).
// It holds the group's identity, not the recorder, which another thread may destroy meanwhile.
struct LastOp {
  std::shared_ptr<const GroupIdentity> identity;
  OpRecord op;
};
thread_local LastOp t_last;

}  // namespace

FlightRecorder::FlightRecorder(GroupIdentity identity) : identity_(std::make_shared<const GroupIdentity>(std::move(identity))) {
  const std::lock_guard lock(registry().mutex);
  registry().recorders.push_back(this);
}

FlightRecorder::~FlightRecorder() {
  {
    const std::lock_guard lock(registry().mutex);
    auto& all = registry().recorders;
    all.erase(std::remove(all.begin(), all.end(), this), all.end());
  }
}

void FlightRecorder::record(const char* op, const char* dtype, int64_t count, int peer, bool p2p) {
  OpRecord r{0, op, dtype, count, peer, p2p};
  {
    const std::lock_guard lock(mutex_);
    r.seq = p2p ? p2p_++ : collectives_++;
    ring_[total_++ % kFlightRecorderSize] = r;
  }
  // The shared identity is copied only when this thread changes groups: no reference count per call.
  if (t_last.identity != identity_) t_last.identity = identity_;
  t_last.op = r;
}

FlightRecorder::Snapshot FlightRecorder::snapshot() const {
  const std::lock_guard lock(mutex_);
  Snapshot s{collectives_, p2p_, {}};
  const uint64_t kept = std::min<uint64_t>(total_, kFlightRecorderSize);
  for (uint64_t i = total_ - kept; i < total_; ++i) s.ops.push_back(ring_[i % kFlightRecorderSize]);
  return s;
}

namespace {
struct Attached {
  std::shared_mutex mutex;
  std::unordered_map<const void*, std::unique_ptr<FlightRecorder>> by_owner;
};
Attached& attached() {
  static Attached a;
  return a;
}
}  // namespace

FlightRecorder& attach_flight_recorder(const void* owner, GroupIdentity identity) {
  auto recorder = std::make_unique<FlightRecorder>(std::move(identity));
  FlightRecorder& r = *recorder;
  const std::unique_lock lock(attached().mutex);
  attached().by_owner[owner] = std::move(recorder);
  return r;
}

FlightRecorder* flight_recorder_of(const void* owner) {
  const std::shared_lock lock(attached().mutex);
  const auto it = attached().by_owner.find(owner);
  return it == attached().by_owner.end() ? nullptr : it->second.get();
}

void detach_flight_recorder(const void* owner) {
  std::unique_ptr<FlightRecorder> gone;  // destroyed outside the lock
  const std::unique_lock lock(attached().mutex);
  if (const auto it = attached().by_owner.find(owner); it != attached().by_owner.end()) {
    gone = std::move(it->second);
    attached().by_owner.erase(it);
  }
}

std::optional<InFlightOp> current_op(const std::string& group) {
  if (t_last.identity == nullptr || t_last.identity->group != group) return std::nullopt;
  return InFlightOp{t_last.identity, t_last.op};
}

void set_world_hosts(std::vector<std::string> hosts, int world_rank) {
  const std::lock_guard lock(registry().mutex);
  registry().hosts = std::move(hosts);
  registry().world_rank = world_rank;
}

std::string world_host(int world_rank) {
  const std::lock_guard lock(registry().mutex);
  const auto& hosts = registry().hosts;
  return world_rank >= 0 && static_cast<size_t>(world_rank) < hosts.size() ? hosts[static_cast<size_t>(world_rank)] : "?";
}

std::string describe_wait(const InFlightOp& in_flight) {
  const GroupIdentity& g = *in_flight.identity;
  const OpRecord& op = in_flight.op;
  std::vector<int> peers;
  if (op.p2p && op.peer >= 0 && static_cast<size_t>(op.peer) < g.world_ranks.size()) {
    peers.push_back(g.world_ranks[static_cast<size_t>(op.peer)]);
  } else if (!op.p2p) {
    // A collective waits for every other member: which one is late only the dumps can tell.
    for (size_t i = 0; i < g.world_ranks.size(); ++i) {
      if (static_cast<int>(i) != g.rank) peers.push_back(g.world_ranks[i]);
    }
  }
  std::vector<std::string> hosts;
  for (int p : peers) {
    const std::string h = world_host(p);
    if (std::find(hosts.begin(), hosts.end(), h) == hosts.end()) hosts.push_back(h);
  }
  return fmt::format("waiting for rank{} {} on host{} {} in {} ({}seq {} of group {}{})", peers.size() == 1 ? "" : "s",
                     fmt::join(peers, ", "), hosts.size() == 1 ? "" : "s", fmt::join(hosts, ", "), op.op,
                     op.p2p ? "point-to-point " : "", op.seq, g.group, g.channel == "main" ? "" : ", " + g.channel + " calls");
}

void set_hang_dump_dir(fs::path dir) {
  const std::lock_guard lock(registry().mutex);
  registry().dump_dir = std::move(dir);
}

fs::path dump_flight_recorders(const std::string& reason) {
  nlohmann::json dump;
  fs::path dir;
  {
    const std::lock_guard lock(registry().mutex);
    dir = registry().dump_dir;
    if (dir.empty()) return {};
    auto& r = registry();
    char host[256] = {};
    ::gethostname(host, sizeof(host) - 1);
    dump = {{"version", 1},
            {"world_rank", r.world_rank},
            {"world_size", r.hosts.size()},
            {"host", host},
            {"pid", ::getpid()},
            {"reason", reason},
            {"ring_size", kFlightRecorderSize},
            {"groups", nlohmann::json::array()}};
    for (const FlightRecorder* recorder : r.recorders) {
      const auto& id = *recorder->identity();
      const auto snap = recorder->snapshot();
      nlohmann::json ops = nlohmann::json::array();
      for (const auto& op : snap.ops) {
        ops.push_back({{"seq", op.seq},
                       {"kind", op.p2p ? "p2p" : "collective"},
                       {"op", op.op},
                       {"dtype", op.dtype},
                       {"count", op.count},
                       {"peer", op.peer}});
      }
      dump["groups"].push_back({{"group", id.group},
                                {"channel", id.channel},
                                {"world_ranks", id.world_ranks},
                                {"rank", id.rank},
                                {"collectives_issued", snap.collectives},
                                {"p2p_issued", snap.p2p},
                                {"ops", std::move(ops)}});
    }
  }
  const fs::path file = dir / fmt::format("rank_{}.json", dump["world_rank"].get<int>());
  try {
    fs::create_directories(dir);
    write_file_durably(file, dump.dump(1) + "\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: the flight recorder could not write %s: %s\n", file.c_str(), e.what());
    return {};
  }
  return file;
}

void report_hang(const std::string& reason, double grace_s) {
  const fs::path file = dump_flight_recorders(reason);
  if (file.empty()) return;
  std::fprintf(stderr, "flight recorder: wrote %s\n", file.c_str());
  std::fflush(stderr);
  int world_rank = 0;
  size_t world_size = 1;
  {
    const std::lock_guard lock(registry().mutex);
    world_rank = registry().world_rank;
    world_size = std::max<size_t>(registry().hosts.size(), 1);
  }
  const auto grace = std::chrono::duration<double>(grace_s);
  const auto start = std::chrono::steady_clock::now();
  const fs::path verdict_file = file.parent_path() / kHangVerdictFile;
  if (world_rank != 0) {
    // Rank 0 may time out a little later: ending the job now would cut its analysis short. Its
    // verdict file says it is done.
    while (!fs::exists(verdict_file) && std::chrono::steady_clock::now() - start < grace) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return;
  }
  std::vector<nlohmann::json> dumps;
  while (true) {
    try {
      dumps = read_hang_dumps(file.parent_path());
    } catch (const std::exception&) {
      dumps.clear();  // a dump being written while read; read again
    }
    if (dumps.size() >= world_size || std::chrono::steady_clock::now() - start > grace) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  const HangVerdict verdict = analyse_hang(dumps);
  std::fprintf(stderr, "flight recorder: %zu of %zu ranks dumped to %s; verdict:\n", dumps.size(), world_size,
               file.parent_path().c_str());
  std::string text;
  for (const auto& line : verdict.lines) text += "  " + line + "\n";
  std::fprintf(stderr, "%s", text.c_str());
  std::fflush(stderr);
  try {
    write_file_durably(verdict_file, text);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: the flight recorder could not write %s: %s\n", verdict_file.c_str(), e.what());
  }
}

}  // namespace moeforge
