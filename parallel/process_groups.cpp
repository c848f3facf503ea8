#include "parallel/process_groups.h"

#include "core/errors.h"

namespace moeforge {

ProcessGroups ProcessGroups::create(const ParallelLayout& layout, const std::shared_ptr<MpiCommunicator>& world) {
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
  return g;
}

ProcessGroups ProcessGroups::single() {
  ProcessGroups g;
  g.world = std::make_shared<LocalCommunicator>("world");
  g.pp = std::make_shared<LocalCommunicator>("pp");
  g.dp = std::make_shared<LocalCommunicator>("dp");
  g.ep = std::make_shared<LocalCommunicator>("ep");
  g.edp = std::make_shared<LocalCommunicator>("edp");
  return g;
}

}  // namespace moeforge
