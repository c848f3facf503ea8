// A rank that misbehaves, for the timeout tests (tests/unit/test_comm.cpp runs it under mpirun):
//   comm_probe hang TIMEOUT_S   rank 1 sleeps instead of joining an all_reduce
//   comm_probe die TIMEOUT_S    rank 1 kills itself (SIGKILL) before the all_reduce
//   comm_probe hang_async TIMEOUT_S   as hang, the others' all_reduce asynchronous (waited on)
// The other ranks must end, non-zero, within the timeout, with a message naming the operation.
#include "parallel/mpi_communicator.h"

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

int main(int argc, char** argv) {
  if (argc < 3) return 2;
  const std::string mode = argv[1];
  moeforge::MpiRuntime mpi;
  auto world = moeforge::MpiCommunicator::world(std::atof(argv[2]));
  world->barrier();
  if (world->rank() == 1) {
    if (mode == "die") std::raise(SIGKILL);
    std::this_thread::sleep_for(std::chrono::seconds(120));
  }
  auto t = torch::ones({4});
  if (mode == "hang_async") {
    world->all_reduce_async(t, moeforge::ReduceOp::sum)->wait();
  } else {
    world->all_reduce(t, moeforge::ReduceOp::sum);
  }
  std::printf("rank %d: all_reduce completed\n", world->rank());
  return 0;
}
