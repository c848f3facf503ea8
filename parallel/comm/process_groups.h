// defines: ProcessGroups
//
// The communicators of this rank for a parallel layout, made once at start-up from the
// ParallelLayout's group membership (Megatron's rank order): world, pipeline (PP), data-parallel
// (DP), expert-parallel (EP, inside DP), expert-data-parallel (EDP: the ranks holding the same
// experts, over which expert gradients are reduced) and tensor-parallel (TP: the ranks sharing
// each layer's heads and widths).
#pragma once

#include "core/config/config.h"
#include "parallel/comm/communicator.h"
#include "parallel/layout/layout.h"
#include "parallel/comm/mpi_communicator.h"

#include <memory>
#include <string>

namespace moeforge {

struct ProcessGroups {
  std::shared_ptr<Communicator> world, pp, dp, ep, edp, tp;

  // Splits `world` (collective over it). Throws UserError when the launch's world size is not the
  // layout's. On an accelerator (`device` not the CPU) pp/dp/ep/edp/tp move device tensors as
  // `collectives` says: NcclCommunicators (CUDA only) or HostStagedCommunicators over those MPI
  // groups; CPU tensors go over MPI. The rank's device must be current (select_device(),
  // core/device/device_runtime.h). Throws UserError for nccl in a build without CUDA or off CUDA.
  static ProcessGroups create(const ParallelLayout& layout, const std::shared_ptr<MpiCommunicator>& world,
                              const torch::Device& device = torch::kCPU,
                              DeviceCollectives collectives = DeviceCollectives::nccl);
  // Every group a group of one: a single process, no MPI.
  static ProcessGroups single();
};

// "2.21.5" from the NCCL this build links, or "not built (no CUDA)" (for run fingerprints).
std::string nccl_version();

}  // namespace moeforge
