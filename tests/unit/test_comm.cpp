// Communicators seen from outside: a group of one, and a hung or dead rank ending an mpirun job on
// every rank within the timeout, with the operation and group named (tests/mpi/comm_probe.cpp).
#include "parallel/communicator.h"
#include "test_util.h"

#include <catch2/catch.hpp>

#include <chrono>

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
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = test::run_command(kMpirun + " hang 3");
  INFO(r.output);
  CHECK(r.exit_code != 0);
  CHECK(r.exit_code != 124);  // not the outer timeout
  CHECK(seconds(t0) < 60);
  CHECK_THAT(r.output, Contains("all_reduce on group world (world ranks [0, 1, 2]) did not complete within 3.0 s"));
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
