// Communicators seen from outside: a group of one, and a hung or dead rank ending an mpirun job on
// every rank within the timeout, with the operation and group named (tests/mpi/comm_probe.cpp).
#include "parallel/communicator.h"
#include "test_util.h"

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>

using namespace moeforge;
using Catch::Matchers::Contains;

namespace {
// Bounded by an outer timeout so that a broken timeout fails the test instead of hanging it.
const std::string kMpirun = std::string("env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "
                                        "OMPI_MCA_btl_vader_single_copy_mechanism=none timeout 100 ") +
                            MOEFORGE_MPIEXEC + " --oversubscribe -np 3 " + MOEFORGE_COMM_PROBE;

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

TEST_CASE("a hung rank ends the job on every rank within the timeout, naming the operation", "[comm][mpi][slow]") {
  // Blocking, and asynchronous: the communication thread waits against the same timeout and ends
  // the job, not the handle.
  for (const char* mode : {"hang", "hang_async"}) {
    INFO(mode);
    const auto t0 = std::chrono::steady_clock::now();
    const auto r = test::run_command(kMpirun + " " + mode + " 3");
    INFO(r.output);
    CHECK(r.exit_code != 0);
    CHECK(r.exit_code != 124);  // not the outer timeout
    CHECK(seconds(t0) < 60);
    CHECK_THAT(r.output, Contains("all_reduce on group world (world ranks [0, 1, 2]) did not complete within 3.0 s"));
  }
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

TEST_CASE("time with a collective in flight counts overlapping ones once; exposed time is the compute thread's wait",
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

TEST_CASE("a killed rank ends the job on every rank", "[comm][mpi][slow]") {
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = test::run_command(kMpirun + " die 3");
  INFO(r.output);
  CHECK(r.exit_code != 0);
  CHECK(r.exit_code != 124);
  CHECK(seconds(t0) < 60);
  CHECK_THAT(r.output, !Contains("all_reduce completed"));
}
