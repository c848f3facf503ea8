// defines: kFlightRecorderSize, kNoPeer, OpRecord, GroupIdentity, FlightRecorder, InFlightOp, current_op,
//          attach_flight_recorder, flight_recorder_of, detach_flight_recorder, describe_wait, set_world_hosts, world_host, set_hang_dump_dir, report_hang, dump_flight_recorders
//
// The flight recorder (the model of PyTorch's NCCL flight recorder): every communicator keeps a
// sequence number and a fingerprint (operation, dtype, element count, peer or root) of each call
// it issues, in a ring of the last kFlightRecorderSize. Every backend records through
// FlightRecorder::record at the point it issues the call (MpiCommunicator, which the host-staged
// backend issues through, and NcclCommunicator), and MPI's errors on a group come to one handler
// (mpi_communicator.cpp) that names the call and dumps the recorders. When the watchdog ends the job on a timeout
// (parallel/comm/watchdog.h) or MPI reports an error, every rank writes its rings to
// `<run_dir>/hang/rank_N.json`; after a grace period world rank 0 compares them and names the
// first sequence number at which ranks differ, or the rank that never arrived
// (parallel/comm/hang_analysis.h, and `moeforge check hang RUN_DIR` afterwards). The JSON schema
// is in docs/hang.md.
//
// Collectives and point-to-point calls are numbered apart (as PyTorch's flight recorder does): a
// pipeline group's ranks legitimately issue different point-to-point calls (one sends, the other
// receives), and their collective sequence must still line up.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace moeforge {

// The ring's length: enough to see past a step's worth of calls on a group to where ranks split,
// small enough (64 x 40 bytes) to cost nothing.
inline constexpr size_t kFlightRecorderSize = 64;
inline constexpr int kNoPeer = -1;

// One issued call: its fingerprint. `op` and `dtype` are string literals (c10's dtype names are
// static), so recording copies no string.
struct OpRecord {
  uint64_t seq = 0;          // from 0, collectives and point-to-point counted apart
  const char* op = "";       // "all_reduce", "send", ...
  const char* dtype = "";    // what travels ("Float", "BFloat16", "Byte"...)
  int64_t count = 0;         // elements
  int32_t peer = kNoPeer;    // point-to-point: the peer's group rank; broadcast: the root
  bool p2p = false;
};

// What names a group in a dump: its name, which of its communicators (an MPI group's asynchronous
// calls run on their own duplicate: channel "async"), and its members.
struct GroupIdentity {
  std::string group;
  std::string channel;  // "main" or "async"
  std::vector<int> world_ranks;
  int rank = 0;  // this process's rank in the group
};

class FlightRecorder {
 public:
  explicit FlightRecorder(GroupIdentity identity);  // registers it for the dump
  ~FlightRecorder();
  FlightRecorder(const FlightRecorder&) = delete;
  FlightRecorder& operator=(const FlightRecorder&) = delete;

  // Called where a call is issued: a counter and one ring slot under an uncontended lock (the
  // cost is measured in docs/hang.md). Also remembers it as this thread's call in
  // flight, for the watchdog's message.
  void record(const char* op, const char* dtype, int64_t count, int peer = kNoPeer, bool p2p = false);

  struct Snapshot {
    uint64_t collectives = 0, p2p = 0;  // issued so far
    std::vector<OpRecord> ops;          // oldest first
  };
  Snapshot snapshot() const;
  const std::shared_ptr<const GroupIdentity>& identity() const { return identity_; }

 private:
  std::shared_ptr<const GroupIdentity> identity_;
  mutable std::mutex mutex_;  // the recording thread and a dump (or a second thread) may meet
  std::array<OpRecord, kFlightRecorderSize> ring_{};
  uint64_t collectives_ = 0, p2p_ = 0, total_ = 0;
};

// Recorders held for the communicator objects whose headers cannot hold one (MpiCommunicator:
// most of the project includes its header), found by the object's address: attach in its
// constructor, detach in its destructor. The lookup is a hash-map find under a shared lock
// (measured with the record in docs/hang.md).
FlightRecorder& attach_flight_recorder(const void* owner, GroupIdentity identity);
FlightRecorder* flight_recorder_of(const void* owner);  // null if none is attached
void detach_flight_recorder(const void* owner);

// The call this thread issued last, if it was on group `group` (the watchdog's Watched takes it).
struct InFlightOp {
  std::shared_ptr<const GroupIdentity> identity;
  OpRecord op;
};
std::optional<InFlightOp> current_op(const std::string& group);
// "waiting for rank 3 on host node2 in all_to_all (seq 1234 of group ep)".
std::string describe_wait(const InFlightOp& in_flight);

// Every world rank's host name, by world rank (gathered once, when the world group is made).
void set_world_hosts(std::vector<std::string> hosts, int world_rank);
std::string world_host(int world_rank);  // "?" when unknown

// Where the dumps go (`<run_dir>/hang`); empty (the default): no dump.
void set_hang_dump_dir(std::filesystem::path dir);

// The watchdog's and the MPI error handler's report: this rank's rings written to
// `<dir>/rank_N.json` (durably) with `reason`; then world rank 0 waits up to `grace_s` for every
// rank's dump, compares them, prints the verdict and writes it to `<dir>/verdict.txt`; the other
// ranks wait for that file up to `grace_s`, so that ending the job does not cut rank 0's analysis
// short. Nothing when no dump directory is set.
void report_hang(const std::string& reason, double grace_s);
// Only the dump (the MPI error path, which ends the job at once). Returns the file, or empty.
std::filesystem::path dump_flight_recorders(const std::string& reason);

}  // namespace moeforge
