// The process groups of a layout under mpirun: each group's members are the layout's, and a
// reduction inside each group sums exactly its members (closed form).
#include "core/config/config_loader.h"
#include "parallel/comm/process_groups.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

using namespace moeforge;

namespace {
ParallelLayout layout_for(int pp, int ep, int world) {
  const auto path = std::filesystem::temp_directory_path() / fmt::format("moeforge-groups-{}.yaml", ::getpid());
  std::ofstream(path) << fmt::format(R"(
model:
  num_layers: 4
  hidden_size: 64
  num_attention_heads: 4
  vocab_size: 1000
  num_experts: 12
  moe_ffn_hidden_size: 32
  untie_embeddings_and_output_weights: true  # required under PP
parallel:
  pipeline_model_parallel_size: {}
  expert_model_parallel_size: {}
training:
  seq_length: 32
  global_batch_size: 24
  train_iters: 10
  lr: 1.0e-3
)",
                                     pp, ep);
  const auto loaded = load_config(path.string());
  std::filesystem::remove(path);
  return ParallelLayout::create(loaded.config, world);
}

int64_t sum(const std::vector<int64_t>& v) {
  int64_t s = 0;
  for (auto x : v) s += x;
  return s;
}
}  // namespace

TEST_CASE("process groups match the layout's membership", "[mpi][groups]") {
  auto world = std::shared_ptr<MpiCommunicator>(MpiCommunicator::world(60.0));
  const int n = world->size();
  for (const auto& [pp, ep] : std::vector<std::pair<int, int>>{{1, 1}, {1, n}, {n, 1}, {2, 2}}) {
    if (n % pp != 0 || (n / pp) % ep != 0 || 4 % pp != 0 || 12 % ep != 0 || (pp == 2 && n != 4)) continue;
    const auto layout = layout_for(pp, ep, n);
    const auto g = ProcessGroups::create(layout, world);
    const int64_t me = world->rank();
    INFO(layout.describe());
    const std::vector<std::pair<Communicator*, std::vector<int64_t>>> groups{
        {g.pp.get(), layout.pipeline_group(me)},
        {g.dp.get(), layout.data_parallel_group(me)},
        {g.ep.get(), layout.expert_parallel_group(me)},
        {g.edp.get(), layout.expert_data_parallel_group(me)}};
    for (const auto& [comm, members] : groups) {
      INFO(comm->name());
      CHECK(comm->world_ranks() == std::vector<int>(members.begin(), members.end()));
      auto t = torch::full({1}, me, torch::kInt64);
      comm->all_reduce(t, ReduceOp::sum);
      CHECK(t.item<int64_t>() == sum(members));
    }
  }
}
