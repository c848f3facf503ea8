// defines: run_environment, gather_hostnames, shell_command_line, chip_matches, describe_launcher
//
// The fingerprint a benchmark report needs about where and how a run ran: chips (names, count,
// memory), driver, CUDA, NCCL, MPI, LibTorch, compiler, moeforge version and commit, hostnames of
// every rank, the exact command. The trainer's rank 0 writes it to <run_dir>/environment.json at
// start-up; `moeforge report` reads it (keys in docs/report.md).
#pragma once

#include "core/config/config.h"
#include "parallel/comm/communicator.h"

#include <nlohmann/json.hpp>

#include <string>
#include <string_view>
#include <vector>

namespace moeforge {

// Every rank's host name, in world-rank order (collective).
std::vector<std::string> gather_hostnames(Communicator& world);

nlohmann::json run_environment(const ExperimentConfig& config, const std::vector<std::string>& hostnames,
                               const std::string& command);

// Whether hardware.chip names the device that ran (environment.json's chips[0].name): either
// inside the other, ignoring case ("H100" and "NVIDIA H100 80GB HBM3").
bool chip_matches(std::string_view configured, std::string_view detected);

// environment.json's "launcher", from the command line of the rank's parent process. Under mpirun a
// rank on a node other than mpirun's is the child of Open MPI's daemon (orted, or prted under PMIx),
// whose command line says nothing of how the job started: that is "mpirun (remote daemon orted)",
// with the address of mpirun's node where the run-time's contact URI gives it (`hnp_uri`, Open MPI's
// OMPI_MCA_orte_hnp_uri, "JOB;tcp://ADDRESS:PORT"; may be empty). Any other parent is itself.
std::string describe_launcher(const std::string& parent_command, const std::string& hnp_uri);

// argv as one line a shell would run again (arguments quoted where needed).
std::string shell_command_line(int argc, char** argv);

}  // namespace moeforge
