// Communicators seen from outside: a group of one, and a hung or dead rank ending an mpirun job on
// every rank within the timeout, with the operation and group named (tests/mpi/comm_probe.cpp).
#include "core/device/device_runtime.h"
#include "parallel/comm/async_error.h"
#include "parallel/comm/communicator.h"
#include "parallel/comm/process_groups.h"
#include "parallel/comm/watchdog.h"
#include "test_util.h"

#include <catch2/catch.hpp>

#include <atomic>
#include <string>
#include <utility>
#include <vector>
#include <chrono>
#include <mutex>
#include <stdexcept>
#include <thread>

using namespace moeforge;
using Catch::Matchers::Contains;

namespace {
// Bounded by an outer timeout so that a broken timeout fails the test instead of hanging it.
const std::string kMpirun = std::string("env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
                                        "OMPI_MCA_btl_vader_single_copy_mechanism=none timeout 100 ") +
                            test::mpiexec() + " --oversubscribe -np 3 " + test::comm_probe();

double seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

TEST_CASE("a group of one communicates with itself", "[comm]") {
  LocalCommunicator c;
  auto t = torch::arange(4, torch::kFloat32);
  c.all_reduce(t, ReduceOp::sum);
  CHECK(torch::equal(t, torch::arange(4, torch::kFloat32)));
  CHECK(torch::equal(c.all_gather(t), t));
  CHECK(torch::equal(c.all_to_all(t, {4}, {4}), t));
  CHECK(c.world_ranks() == std::vector<int>{0});
  CHECK_THROWS(c.all_to_all(t, {3}, {3}));
}

// What the other ranks are in when rank 1 stops, and the operation their message names (in the
// pipeline case the first of rank 0's send and rank 2's send_recv to time out).
const std::vector<std::pair<std::string, std::string>> kOperations{{"all_reduce", "all_reduce on"},
                                                                   {"all_reduce_async", "all_reduce on"},
                                                                   {"all_to_all_async", "all_to_all on"},
                                                                   {"pipeline", "send"}};

TEST_CASE("a hung rank ends the job on every rank within the timeout, naming the operation", "[comm][mpi][slow]") {
  // Blocking, and asynchronous (a gradient bucket, an expert all-to-all, a pipeline send): the
  // communication thread, or the waiter of a posted send, waits against the same timeout and ends
  // the job, not the handle.
  for (const auto& [operation, named] : kOperations) {
    INFO(operation);
    const auto t0 = std::chrono::steady_clock::now();
    const auto r = test::run_command(kMpirun + " hang 3 " + operation);
    INFO(r.output);
    CHECK(r.exit_code != 0);
    CHECK(r.exit_code != 124);  // not the outer timeout
    CHECK(seconds(t0) < 60);
    CHECK_THAT(r.output, Contains(": " + named));
    CHECK_THAT(r.output, Contains(" on group world (world ranks [0, 1, 2]) did not complete within 3.0 s"));
    CHECK_THAT(r.output, !Contains("completed"));
  }
}

TEST_CASE("each rank of a node gets a device of its own, and more ranks than devices is refused naming the counts",
          "[comm][device]") {
  CHECK(device_for_local_rank(0, 4, 4, "cuda") == 0);
  CHECK(device_for_local_rank(3, 4, 8, "cuda") == 3);
  // Four ranks on two GPUs: ranks 2 and 3 would share GPUs 0 and 1 (NCCL refuses that, saying
  // only "invalid usage"): every rank of the node refuses, before any communicator exists.
  for (int r = 0; r < 4; ++r) {
    const auto why = test::user_error([&] { device_for_local_rank(r, 4, 2, "cuda"); });
    CHECK_THAT(why, Contains("runs 4 ranks but only 2 cuda device(s)") && Contains("--map-by ppr:2:node"));
  }
  CHECK_THAT(test::user_error([] { device_for_local_rank(0, 1, 0, "cuda"); }), Contains("no cuda device is visible"));
}

TEST_CASE("work handles: completion in submission order, errors rethrown by wait, pending work run at destruction",
          "[comm][work]") {
  std::vector<int> ran;
  std::shared_ptr<Work> first, second, failing;
  {
    CommThread thread;
    std::atomic<bool> release{false};
    first = thread.submit([&] {
      while (!release) std::this_thread::yield();
      ran.push_back(1);
    });
    second = thread.submit([&] { ran.push_back(2); });
    failing = thread.submit([] { throw std::invalid_argument("a bad collective"); });
    CHECK_FALSE(first->is_completed());
    CHECK_FALSE(second->is_completed());
    release = true;
    second->wait();
    CHECK(first->is_completed());
    CHECK(ran == std::vector<int>{1, 2});
    CHECK_THROWS_WITH(failing->wait(), Contains("a bad collective"));
    CHECK_THROWS_WITH(failing->wait(), Contains("a bad collective"));  // every wait rethrows
    // Destroyed with work pending: it runs first.
    thread.submit([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      ran.push_back(3);
    });
  }
  CHECK(ran == std::vector<int>{1, 2, 3});
  CHECK(completed_work()->is_completed());
}

TEST_CASE("time with a collective in flight counts overlapping ones once, and exposed time is the compute thread's wait",
          "[comm][work]") {
  const CommTimes before = comm_times();
  {
    CommThread thread;
    auto busy = [] {
      const CommInFlight in_flight;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    };
    auto w = thread.submit(busy);
    const CommInFlight also;  // concurrent with the thread's: one wall-time interval
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    w->wait();  // about 80 ms of it exposed
  }
  const CommTimes after = comm_times();
  const double in_flight = after.in_flight_s - before.in_flight_s, exposed = after.exposed_s - before.exposed_s;
  CHECK(in_flight >= 0.095);
  CHECK(in_flight < 0.3);  // not 0.2: the two overlap
  CHECK(exposed >= 0.05);
  CHECK(exposed <= in_flight);
}

TEST_CASE("the watchdog reports an operation past its timeout, once, and leaves completed ones alone", "[comm][work]") {
  std::vector<std::string> reports;
  std::mutex mutex;
  set_timeout_handler([&](const std::string& message) {
    std::lock_guard lock(mutex);
    reports.push_back(message);
  });
  {
    const Watched quick("all_reduce", "dp", {0, 1}, 0.3);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  {
    const Watched hung("all_to_all", "ep", {2, 3}, 0.2);
    std::this_thread::sleep_for(std::chrono::milliseconds(600));
  }
  // Work no thread waits for (NCCL on its stream): polled until it completes, or reported.
  std::atomic<bool> done{false};
  watch_until("reduce_scatter", "dp", {0, 1}, 0.4, [&] { return done.load(); });
  watch_until("send", "pp", {4, 5}, 0.2, [] { return false; });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  done = true;
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  set_timeout_handler({});
  std::lock_guard lock(mutex);
  REQUIRE(reports.size() == 2);
  CHECK_THAT(reports[0], Contains("all_to_all on group ep (world ranks [2, 3]) did not complete within 0.2 s"));
  CHECK_THAT(reports[0], Contains("parallel.distributed_timeout_minutes"));
  CHECK_THAT(reports[1], Contains("send on group pp (world ranks [4, 5]) did not complete within 0.2 s"));
}

TEST_CASE("a killed rank ends the job on every rank", "[comm][mpi][slow]") {
  for (const auto& [operation, named] : kOperations) {
    INFO(operation);
    const auto t0 = std::chrono::steady_clock::now();
    const auto r = test::run_command(kMpirun + " die 3 " + operation);
    INFO(r.output);
    CHECK(r.exit_code != 0);
    CHECK(r.exit_code != 124);
    CHECK(seconds(t0) < 60);
    CHECK_THAT(r.output, !Contains("completed"));
  }
}

TEST_CASE("a rank stopped before MPI_Init ends the job's start-up within MOEFORGE_STARTUP_TIMEOUT_S, naming the phase",
          "[comm][mpi]") {
  // Before the config is read nothing else bounds the wait: the other ranks sat in MPI_Init forever.
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = test::run_command("env MOEFORGE_STARTUP_TIMEOUT_S=3 " + kMpirun + " startup 3");
  INFO(r.output);
  CHECK(r.exit_code != 0);
  CHECK(r.exit_code != 124);  // not the outer timeout
  CHECK(seconds(t0) < 60);
  CHECK_THAT(r.output, Contains("start-up did not finish within 3.0 s (MOEFORGE_STARTUP_TIMEOUT_S), still in MPI_Init"));
  CHECK_THAT(r.output, Contains("a rank that has not joined"));
  CHECK_THAT(r.output, !Contains("completed"));
  // A value that is not a duration is refused before MPI starts.
  const auto bad = test::run_command("env MOEFORGE_STARTUP_TIMEOUT_S=ten " + kMpirun + " startup 3");
  INFO(bad.output);
  CHECK(bad.exit_code != 0);
  CHECK_THAT(bad.output, Contains("MOEFORGE_STARTUP_TIMEOUT_S=ten is not a start-up timeout"));
}

TEST_CASE("a rank that was itself stopped past a deadline says so instead of blaming a peer", "[comm]") {
  // The process stops itself inside a watched operation with a 1 s timeout; continued 4 s later,
  // its watchdog finds the deadline passed while the process was not running.
  const auto r = test::run_command("bash -c '" + test::comm_probe() +
                                   " self_stop 1 & pid=$!; sleep 4; kill -CONT $pid; wait $pid'");
  INFO(r.output);
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("all_reduce on group world (world ranks [0, 1]) did not complete within 1.0 s"));
  CHECK_THAT(r.output, Contains("this rank itself did not run for the last"));
  CHECK_THAT(r.output, Contains("it is the rank that held the job up"));
  CHECK_THAT(r.output, !Contains("a peer rank is hung"));
}

TEST_CASE("an asynchronous error is thrown by the next call and every call after or ends the job unclaimed",
          "[comm][work]") {
  std::vector<std::string> reports;
  std::mutex mutex;
  set_timeout_handler([&](const std::string& message) {
    std::lock_guard lock(mutex);
    reports.push_back(message);
  });
  {
    AsyncError claimed("ep0", {2, 3}, 0.3);
    CHECK_FALSE(claimed.failed());
    CHECK_NOTHROW(claimed.rethrow());
    claimed.record("NCCL", "all_to_all", "remote process exited or there was a network error");
    claimed.record("NCCL", "all_reduce", "a consequence of the first");  // the first error wins
    CHECK(claimed.failed());
    CHECK_THROWS_AS(claimed.rethrow(), CommError);
    CHECK_THROWS_WITH(claimed.rethrow(),  // every call after throws it too
                      Contains("NCCL all_to_all on group ep0 (world ranks [2, 3]) failed: remote process exited") &&
                          Contains("A peer is dead or diverged"));
    AsyncError unclaimed("pp1", {0, 4}, 0.2);
    unclaimed.record("host-staged", "exchange", "failure injected");
    std::this_thread::sleep_for(std::chrono::milliseconds(700));
  }  // the watchdog outlives both: its entries hold only what they poll
  set_timeout_handler({});
  std::lock_guard lock(mutex);
  REQUIRE(reports.size() == 1);  // the claimed error was not reported again
  CHECK_THAT(reports[0], Contains("host-staged exchange on group pp1 (world ranks [0, 4]) failed: failure injected"));
  CHECK_THAT(reports[0], Contains("no call on the group claimed this error within 0.2 s") && Contains("Ending the job"));
}
