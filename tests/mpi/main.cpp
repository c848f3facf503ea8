// Catch2 under MPI: every rank runs every test in the same order (the collectives need all of them);
// MPI is initialized before and finalized after.
#define CATCH_CONFIG_RUNNER
#include "parallel/comm/mpi_communicator.h"

#include <catch2/catch.hpp>

int main(int argc, char** argv) {
  moeforge::MpiRuntime mpi;
  const int failed = Catch::Session().run(argc, argv);
  return failed == 0 ? 0 : 1;
}
