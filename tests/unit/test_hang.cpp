// The flight recorder (parallel/comm/flight_recorder.h) and the hang analysis
// (parallel/comm/hang_analysis.h): rings, their comparison on hand-written dumps, `moeforge check
// hang`, and a desynchronised job under mpirun whose cause rank 0 and the command name.
#include "parallel/comm/flight_recorder.h"
#include "parallel/comm/hang_analysis.h"
#include "test_util.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

using namespace moeforge;
using Catch::Matchers::Contains;
using nlohmann::json;

namespace {

json op(uint64_t seq, const char* name, const char* dtype, int64_t count, int peer = -1, const char* kind = "collective") {
  return {{"seq", seq}, {"kind", kind}, {"op", name}, {"dtype", dtype}, {"count", count}, {"peer", peer}};
}

// One rank's dump with one group: `ops` its ring, `issued` its collectives so far.
json dump(int world_rank, std::vector<int> members, uint64_t issued, std::vector<json> ops, const std::string& group = "world") {
  int rank = 0;
  for (size_t i = 0; i < members.size(); ++i) {
    if (members[i] == world_rank) rank = static_cast<int>(i);
  }
  return {{"version", 1},
          {"world_rank", world_rank},
          {"world_size", 4},
          {"host", "h"},
          {"reason", "test"},
          {"groups", json::array({{{"group", group},
                                   {"channel", "main"},
                                   {"world_ranks", members},
                                   {"rank", rank},
                                   {"collectives_issued", issued},
                                   {"p2p_issued", 0},
                                   {"ops", ops}}})}};
}

std::string joined(const HangVerdict& v) {
  std::string all;
  for (const auto& line : v.lines) all += line + "\n";
  return all;
}

}  // namespace

TEST_CASE("the hang analysis names the first collective at which ranks differ", "[hang]") {
  // Rings that no longer hold seq 0..9 (a ring keeps the last 64): the window starts at 10.
  std::vector<json> same{op(10, "all_reduce", "Float", 8), op(11, "all_gather", "BFloat16", 16)};
  auto r0 = same, r1 = same;
  r0.push_back(op(12, "all_reduce", "Float", 8));
  r1.push_back(op(12, "broadcast", "Float", 8, 0));
  r0.push_back(op(13, "all_reduce", "Float", 8));
  const auto v = analyse_hang({dump(0, {0, 1}, 14, r0), dump(1, {0, 1}, 13, r1)});
  INFO(joined(v));
  CHECK(v.found);
  REQUIRE(v.lines.size() == 1);
  CHECK(v.lines[0] == "group world (world ranks [0, 1]): ranks differ first at collective seq 12: rank 0 issued "
                      "all_reduce(Float, 8 elements); rank 1 issued broadcast(Float, 8 elements, root 0)");
}

TEST_CASE("the hang analysis names the rank that never arrived and the rank with no dump", "[hang]") {
  std::vector<json> ring{op(0, "all_reduce", "Float", 4), op(1, "all_reduce", "Float", 4), op(2, "all_to_all", "Float", 6)};
  auto ahead = ring;
  ahead.push_back(op(3, "reduce_scatter", "Float", 12));
  // Ranks 0 and 2 reached seq 3; rank 1 stopped after seq 2; rank 3, a member, wrote nothing.
  // The all-to-all's counts differ (uneven by design) and are not a difference.
  auto r2 = ahead;
  r2[2]["count"] = 9;
  const auto v = analyse_hang({dump(0, {0, 1, 2, 3}, 4, ahead), dump(1, {0, 1, 2, 3}, 3, ring), dump(2, {0, 1, 2, 3}, 4, r2)});
  INFO(joined(v));
  CHECK(v.found);
  REQUIRE(v.lines.size() == 2);
  CHECK(v.lines[0] == "group world (world ranks [0, 1, 2, 3]): rank(s) 1 never arrived at collective seq 3, which rank(s) 0, 2 "
                      "reached with reduce_scatter(Float, 12 elements)");
  CHECK(v.lines[1] == "rank(s) 3 wrote no dump: they did not reach the watchdog (exited, were killed, or were not in a "
                      "communication call)");
}

TEST_CASE("the hang analysis finds no mismatch when ranks stopped at the same op", "[hang]") {
  std::vector<json> ring{op(0, "all_reduce", "Float", 4), op(0, "send", "Float", 4, 1, "p2p")};
  std::vector<json> other{op(0, "all_reduce", "Float", 4), op(0, "recv", "Float", 4, 0, "p2p")};  // point-to-point: not compared
  const auto v = analyse_hang({dump(0, {0, 1}, 1, ring), dump(1, {0, 1}, 1, other)});
  CHECK_FALSE(v.found);
  CHECK(v.lines == std::vector<std::string>{"no mismatch found: ranks stopped at the same op"});
  // Two groups of one name but other members are told apart: each agrees within itself.
  const auto two = analyse_hang({dump(0, {0, 2}, 1, ring, "dp"), dump(2, {0, 2}, 1, ring, "dp"), dump(1, {1, 3}, 1, ring, "dp"),
                                 dump(3, {1, 3}, 1, ring, "dp")});
  CHECK_FALSE(two.found);
}

TEST_CASE("a flight recorder keeps the last 64 calls and counts collectives and point-to-point apart", "[hang]") {
  FlightRecorder recorder({"ep", "main", {0, 3}, 0});
  for (int i = 0; i < 70; ++i) recorder.record("all_reduce", "Float", i);
  recorder.record("send", "Float", 5, 1, /*p2p=*/true);
  const auto s = recorder.snapshot();
  CHECK(s.collectives == 70);
  CHECK(s.p2p == 1);
  REQUIRE(s.ops.size() == kFlightRecorderSize);
  CHECK(s.ops.front().seq == 7);  // 71 calls, the last 64 kept: collectives 7..69, then the send
  CHECK(s.ops.front().count == 7);
  CHECK(s.ops.back().p2p);
  CHECK(s.ops.back().seq == 0);
  CHECK(s.ops.back().peer == 1);
}

TEST_CASE("a timeout names the peer's host and the call's sequence number", "[hang]") {
  set_world_hosts({"node0", "node1", "node2", "node3"}, 0);
  FlightRecorder ep({"ep", "main", {0, 3}, 0});
  ep.record("all_reduce", "Float", 4);
  ep.record("all_to_all", "BFloat16", 64);
  const auto in_flight = current_op("ep");
  REQUIRE(in_flight.has_value());
  CHECK(describe_wait(*in_flight) == "waiting for rank 3 on host node3 in all_to_all (seq 1 of group ep)");
  CHECK_FALSE(current_op("dp").has_value());  // this thread's last call was not on dp
  FlightRecorder pp({"pp", "main", {0, 1, 2}, 1});
  pp.record("recv", "Float", 4, 2, /*p2p=*/true);
  CHECK(describe_wait(*current_op("pp")) == "waiting for rank 2 on host node2 in recv (point-to-point seq 0 of group pp)");
  pp.record("barrier", "none", 0);
  CHECK(describe_wait(*current_op("pp")) == "waiting for ranks 0, 2 on hosts node0, node2 in barrier (seq 0 of group pp)");
  set_world_hosts({}, 0);
}

TEST_CASE("a dump holds every live recorder and moeforge check hang compares dumps", "[hang][cli]") {
  test::TempDir run;
  const auto hang = run.path() / kHangDir;
  CHECK(test::run_command(test::moeforge_binary() + " check hang " + run.path().string()).exit_code == 1);
  set_world_hosts({"node0", "node1"}, 0);
  set_hang_dump_dir(hang);
  {
    FlightRecorder world({"world", "main", {0, 1}, 0});
    world.record("all_reduce", "Float", 4);
    world.record("all_reduce", "Float", 4);
    CHECK(dump_flight_recorders("test reason") == hang / "rank_0.json");
  }
  set_hang_dump_dir({});
  set_world_hosts({}, 0);
  auto dumps = read_hang_dumps(hang);
  REQUIRE(dumps.size() == 1);
  CHECK(dumps[0]["world_rank"].get<int>() == 0);
  CHECK(dumps[0]["reason"].get<std::string>() == "test reason");
  CHECK(dumps[0]["ring_size"].get<size_t>() == kFlightRecorderSize);
  json world_group;
  for (const auto& g : dumps[0]["groups"]) {
    if (g["group"].get<std::string>() == "world") world_group = g;
  }
  REQUIRE(world_group.is_object());
  CHECK(world_group["collectives_issued"].get<int>() == 2);
  CHECK((world_group["ops"][1] == op(1, "all_reduce", "Float", 4)));
  // Rank 1 issued one all-reduce fewer: the command names it, exit 0.
  {
    std::ofstream(hang / "rank_1.json") << dump(1, {0, 1}, 1, {op(0, "all_reduce", "Float", 4)}).dump();
  }
  const auto r = test::run_command(test::moeforge_binary() + " check hang " + run.path().string());
  INFO(r.output);
  CHECK(r.exit_code == 0);
  CHECK_THAT(r.output, Contains("group world (world ranks [0, 1]): rank(s) 1 never arrived at collective seq 1, which rank(s) 0 "
                                "reached with all_reduce(Float, 4 elements)"));
  {
    std::ofstream(hang / "rank_2.json") << "{ not json";
  }
  const auto bad = test::run_command(test::moeforge_binary() + " check hang " + run.path().string());
  CHECK(bad.exit_code == 1);
  CHECK_THAT(bad.output, Contains((hang / "rank_2.json").string() + " is not a flight-recorder dump"));
}

TEST_CASE("recording a call costs a counter and a ring slot", "[hang]") {
  // As MpiCommunicator records: the recorder found by the communicator's address, then the record.
  const int owner = 0;
  attach_flight_recorder(&owner, {"bench", "main", {0}, 0});
  constexpr int kCalls = 1'000'000;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kCalls; ++i) flight_recorder_of(&owner)->record("all_reduce", "Float", i);
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / kCalls;
  std::printf("flight recorder: %.1f ns per recorded call (lookup and record)\n", ns);
  CHECK(flight_recorder_of(&owner)->snapshot().collectives == static_cast<uint64_t>(kCalls));
  detach_flight_recorder(&owner);
  CHECK(flight_recorder_of(&owner) == nullptr);
  CHECK(ns < 1000);  // an MPI collective takes microseconds; the record must stay far below
}

namespace {
// Bounded by an outer timeout so that a broken timeout fails the test instead of hanging it.
std::string probe(const std::string& mode, const std::filesystem::path& run) {
  return "env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none timeout 100 " +
         test::mpiexec() + " --oversubscribe -np 3 " + test::comm_probe() + " " + mode + " 3 " + run.string();
}
std::string this_host() {
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  return host;
}
}  // namespace

TEST_CASE("a desynchronised collective is named by rank 0 at the timeout and by moeforge check hang", "[hang][mpi][slow]") {
  // tests/mpi/comm_probe.cpp: rank 1's fourth all-reduce on world is int32 where the others' is
  // float; its fifth goes to the group "other" while theirs go to world, where every rank blocks.
  test::TempDir run;
  const auto r = test::run_command(probe("desync", run.path()));
  INFO(r.output);
  CHECK(r.exit_code != 0);
  CHECK(r.exit_code != 124);  // not the outer timeout
  CHECK_THAT(r.output, !Contains("desync completed"));
  for (int rank = 0; rank < 3; ++rank) CHECK(std::filesystem::exists(run.path() / kHangDir / fmt::format("rank_{}.json", rank)));
  const std::string named =
      "group world (world ranks [0, 1, 2]): ranks differ first at collective seq 3: rank 0 issued all_reduce(Float, 4 elements); "
      "rank 1 issued all_reduce(Int, 4 elements); rank 2 issued all_reduce(Float, 4 elements)";
  const std::string never = "group other (world ranks [0, 1, 2]): rank(s) 0, 2 never arrived at collective seq 0, which rank(s) 1 "
                            "reached with all_reduce(Float, 4 elements)";
  CHECK_THAT(r.output, Contains("flight recorder: 3 of 3 ranks dumped to"));  // rank 0's verdict
  CHECK_THAT(r.output, Contains(named));
  CHECK_THAT(r.output, Contains(never));
  // Each timeout names the ranks and host it waited for, the call and its sequence number.
  CHECK_THAT(r.output, Contains("waiting for ranks 1, 2 on host " + this_host() + " in all_reduce (seq 4 of group world)"));
  CHECK_THAT(r.output, Contains("waiting for ranks 0, 2 on host " + this_host() + " in all_reduce (seq 0 of group other)"));
  const auto c = test::run_command(test::moeforge_binary() + " check hang " + run.path().string());
  INFO(c.output);
  CHECK(c.exit_code == 0);
  CHECK_THAT(c.output, Contains(named));
  CHECK_THAT(c.output, Contains(never));
}

TEST_CASE("an MPI error of a mismatched collective names the call and dumps the flight recorder", "[hang][mpi][slow]") {
  // Rank 1 receives rank 0's broadcast of 1024 floats into 4: MPI's truncation error, which Open
  // MPI's default handler makes fatal at once, goes through moeforge's handler.
  test::TempDir run;
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = test::run_command(probe("truncate", run.path()));
  INFO(r.output);
  CHECK(r.exit_code != 0);
  CHECK(r.exit_code != 124);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60));
  CHECK_THAT(r.output, Contains("MPI error in broadcast (seq 0 of group world, world ranks [0, 1, 2])"));
  CHECK(std::filesystem::exists(run.path() / kHangDir / "rank_1.json"));
}
