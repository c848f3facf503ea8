#include "parallel/comm/process_groups.h"

#include "core/base/errors.h"

#ifdef MOEFORGE_WITH_NCCL
#include "parallel/comm/nccl_communicator.h"
#endif

namespace moeforge {

ProcessGroups ProcessGroups::create(const ParallelLayout& layout, const std::shared_ptr<MpiCommunicator>& world,
                                    bool nccl) {
  if (world->size() != layout.world()) {
    fail_user("the launcher started {} ranks, but the layout is {}: launch with mpirun -np {} or change the layout",
              world->size(), layout.describe(), layout.world());
  }
  const int64_t me = world->rank();
  ProcessGroups g;
  g.world = world;
  g.pp = world->group_of(layout.pipeline_group(me), "pp");
  g.dp = world->group_of(layout.data_parallel_group(me), "dp");
  g.ep = world->group_of(layout.expert_parallel_group(me), "ep");
  g.edp = world->group_of(layout.expert_data_parallel_group(me), "edp");
  g.tp = world->group_of(layout.tensor_parallel_group(me), "tp");
  if (nccl) {
#ifdef MOEFORGE_WITH_NCCL
    for (auto* group : {&g.pp, &g.dp, &g.ep, &g.edp, &g.tp}) {
      *group = std::make_shared<NcclCommunicator>(*group, world->timeout_seconds());
    }
#else
    fail_user("GPU training across ranks needs NCCL, and this build has no CUDA (see the GPU line of the CMake "
              "summary). Build on a machine with nvcc matching the torch wheel, or train with hardware.device: cpu.");
#endif
  }
  return g;
}

#ifndef MOEFORGE_WITH_NCCL
std::string nccl_version() { return "not built (no CUDA)"; }
#endif

ProcessGroups ProcessGroups::single() {
  ProcessGroups g;
  g.world = std::make_shared<LocalCommunicator>("world");
  g.pp = std::make_shared<LocalCommunicator>("pp");
  g.dp = std::make_shared<LocalCommunicator>("dp");
  g.ep = std::make_shared<LocalCommunicator>("ep");
  g.edp = std::make_shared<LocalCommunicator>("edp");
  g.tp = std::make_shared<LocalCommunicator>("tp");
  return g;
}

}  // namespace moeforge
