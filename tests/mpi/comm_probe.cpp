// A rank that misbehaves, for the timeout tests (tests/unit/test_comm.cpp runs it under mpirun):
//   comm_probe hang TIMEOUT_S [OPERATION]   rank 1 sleeps (a hung or SIGSTOPped rank) instead of joining
//   comm_probe die TIMEOUT_S [OPERATION]    rank 1 kills itself (SIGKILL) instead of joining
//   comm_probe startup TIMEOUT_S            rank 1 stops itself (SIGSTOP) before MPI_Init, under the
//                                           start-up watch (MOEFORGE_STARTUP_TIMEOUT_S) as `train`
//   comm_probe self_stop TIMEOUT_S          one process, no MPI: stops itself (SIGSTOP) in a watched
//                                           operation; the test continues it after the deadline
//   comm_probe desync TIMEOUT_S RUN_DIR     the flight recorder (dumps in RUN_DIR/hang): after three
//                                           all-reduces on world, rank 1 issues its fourth with int32
//                                           where the others use float (same bytes: MPI pairs them),
//                                           then its fifth on a second group "other" while the others
//                                           issue theirs on world: every rank blocks
//   comm_probe truncate TIMEOUT_S RUN_DIR   rank 1 receives a broadcast into a smaller tensor than
//                                           rank 0 sends: MPI's truncation error, through the handler
// OPERATION, what the other ranks are in (default all_reduce):
//   all_reduce          blocking
//   all_reduce_async    a gradient bucket's reduction: on the communication thread, waited on
//   all_to_all_async    an expert all-to-all: on the communication thread, waited on
//   pipeline            a pipeline exchange: rank 0 an asynchronous send to rank 1 (waited on at the
//                       step's end), rank 2 a paired send_recv with rank 1; 4 MB, beyond MPI's eager sends
// The other ranks must end, non-zero, within the timeout, with a message naming the operation.
#include "parallel/comm/flight_recorder.h"
#include "parallel/comm/hang_analysis.h"
#include "parallel/comm/mpi_communicator.h"
#include "parallel/comm/watchdog.h"

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>

using namespace moeforge;

int main(int argc, char** argv) {
  if (argc < 3) return 2;
  const std::string mode = argv[1];
  const std::string operation = argc > 3 ? argv[3] : "all_reduce";
  if (mode == "self_stop") {
    const Watched watched("all_reduce", "world", {0, 1}, std::atof(argv[2]));
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the watchdog thread is running, as in a job
    std::raise(SIGSTOP);
    std::this_thread::sleep_for(std::chrono::seconds(10));  // the watchdog ends the process
    return 0;
  }
  set_job_abort([](int exit_code) {  // as `moeforge train` does
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (initialized) MPI_Abort(MPI_COMM_WORLD, exit_code);
  });
  std::unique_ptr<StartupWatch> startup;
  if (mode == "startup") {
    startup = std::make_unique<StartupWatch>();
    const char* rank = std::getenv("OMPI_COMM_WORLD_RANK");
    if (rank != nullptr && std::string(rank) == "1") std::raise(SIGSTOP);
  }
  MpiRuntime mpi;
  startup.reset();
  auto world = MpiCommunicator::world(std::atof(argv[2]));
  if (mode == "desync" || mode == "truncate") {
    set_hang_dump_dir(std::filesystem::path(operation) / kHangDir);
    auto other = world->split(0, world->rank(), "other");
    if (mode == "truncate") {
      auto t = torch::zeros({world->rank() == 1 ? 4 : 1024});  // host: MPI's tensors
      world->broadcast(t, 0);
      std::printf("rank %d: broadcast completed\n", world->rank());
      return 0;
    }
    for (int i = 0; i < 3; ++i) {
      auto t = torch::ones({4});  // host: MPI's tensors
      world->all_reduce(t, ReduceOp::sum);
    }
    auto t = world->rank() == 1 ? torch::ones({4}, torch::kInt32) : torch::ones({4});  // host: MPI's tensors
    world->all_reduce(t, ReduceOp::sum);
    auto u = torch::ones({4});  // host: MPI's tensors
    (world->rank() == 1 ? other : world)->all_reduce(u, ReduceOp::sum);
    std::printf("rank %d: desync completed\n", world->rank());
    return 0;
  }
  world->barrier();
  if (world->rank() == 1) {
    if (mode == "die") std::raise(SIGKILL);
    std::this_thread::sleep_for(std::chrono::seconds(120));
  }
  auto t = torch::ones({4});
  if (operation == "all_reduce") {
    world->all_reduce(t, ReduceOp::sum);
  } else if (operation == "all_reduce_async") {
    world->all_reduce_async(t, ReduceOp::sum)->wait();
  } else if (operation == "all_to_all_async") {
    const std::vector<int64_t> rows(static_cast<size_t>(world->size()), 2);
    torch::Tensor out;
    world->all_to_all_async(torch::ones({2 * world->size(), 8}), out, rows, rows)->wait();
  } else if (operation == "pipeline") {
    auto big = torch::ones({1 << 20});
    if (world->rank() == 0) {
      world->send_async(big, 1, 7, Transport::host)->wait();
    } else {
      auto in = torch::empty_like(big);
      world->send_recv(big, 1, in, 1, 7, Transport::host);
    }
  } else {
    return 2;
  }
  std::printf("rank %d: %s completed\n", world->rank(), operation.c_str());
  return 0;
}
