#include "parallel/comm/process_groups.h"

#include "core/base/errors.h"
#include "parallel/comm/host_staged_communicator.h"

#ifdef MOEFORGE_WITH_NCCL
#include "parallel/comm/nccl_communicator.h"
#endif

namespace moeforge {

ProcessGroups ProcessGroups::create(const ParallelLayout& layout, const std::shared_ptr<MpiCommunicator>& world,
                                    const torch::Device& device, DeviceCollectives collectives) {
  if (world->size() != layout.world()) {
    fail_user("the launcher started {} ranks, but the layout is {}: launch with mpirun -np {} or change the layout",
              world->size(), layout.describe(), layout.world());
  }
  const int64_t me = world->rank();
  // The MPI groups, then (on an accelerator) the device communicators over them, in the same order
  // on every rank: each is made collectively.
  const std::shared_ptr<MpiCommunicator> pp = world->group_of(layout.pipeline_group(me), "pp");
  const std::shared_ptr<MpiCommunicator> dp = world->group_of(layout.data_parallel_group(me), "dp");
  const std::shared_ptr<MpiCommunicator> ep = world->group_of(layout.expert_parallel_group(me), "ep");
  const std::shared_ptr<MpiCommunicator> edp = world->group_of(layout.expert_data_parallel_group(me), "edp");
  const std::shared_ptr<MpiCommunicator> tp = world->group_of(layout.tensor_parallel_group(me), "tp");
  const auto on_device = [&](const std::shared_ptr<MpiCommunicator>& group) -> std::shared_ptr<Communicator> {
    if (device.is_cpu()) return group;
    if (collectives == DeviceCollectives::host) return std::make_shared<HostStagedCommunicator>(group, device);
    if (!device.is_cuda()) {
      fail_user("parallel.device_collectives is nccl but the device is {}: NCCL moves CUDA memory only; use host",
                device.str());
    }
#ifdef MOEFORGE_WITH_NCCL
    return std::make_shared<NcclCommunicator>(group, world->timeout_seconds());
#else
    fail_user("GPU training across ranks needs NCCL, and this build has no CUDA (see the GPU line of the CMake "
              "summary). Build on a machine with nvcc matching the torch wheel, train with hardware.device: cpu, or "
              "set parallel.device_collectives: host.");
#endif
  };
  ProcessGroups g;
  g.world = world;
  g.pp = on_device(pp);
  g.dp = on_device(dp);
  g.ep = on_device(ep);
  g.edp = on_device(edp);
  g.tp = on_device(tp);
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
