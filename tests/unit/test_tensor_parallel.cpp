// Tensor parallelism's cuts against closed forms: which rows and columns each TP rank keeps, that
// the parts join back into the whole, and the partition's cut of every weight of the model by its
// module (column-parallel by rows, row-parallel by columns, routers and norms whole).
#include "core/config/config_loader.h"
#include "moe/moe_layer.h"
#include "parallel/layout/layout.h"
#include "parallel/parallelize.h"
#include "parallel/tensor_parallel.h"
#include "test_util.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

using namespace moeforge;

TEST_CASE("a tensor-parallel cut keeps contiguous blocks, each half on its own for stacked gate/up rows", "[tp]") {
  const auto whole = torch::arange(2 * 8 * 3, torch::kFloat32).view({2, 8, 3});
  // Rows of dim 1 in two blocks: rank 1 keeps rows 4-7.
  const TensorParallelCut rows{1, false};
  CHECK(torch::equal(tensor_parallel_part(whole, rows, 1, 2), whole.narrow(1, 4, 4)));
  // Gate rows 0-3, up rows 4-7: rank 1 keeps gate rows 2-3 and up rows 6-7.
  const TensorParallelCut halves{1, true};
  const auto part = tensor_parallel_part(whole, halves, 1, 2);
  CHECK(torch::equal(part, torch::cat({whole.narrow(1, 2, 2), whole.narrow(1, 6, 2)}, 1)));
  for (const auto& cut : {rows, halves, TensorParallelCut{2, false}, TensorParallelCut{0, false}}) {
    for (const int64_t tp : {1, 2}) {
      std::vector<torch::Tensor> parts;
      for (int64_t r = 0; r < tp; ++r) parts.push_back(tensor_parallel_part(whole, cut, r, tp));
      CHECK(torch::equal(tensor_parallel_join(parts, cut), whole));
    }
  }
  CHECK(torch::equal(tensor_parallel_part(whole, TensorParallelCut{}, 1, 2), whole));  // not cut
}

TEST_CASE("the partition cuts projections by heads and widths and keeps routers, norms and embeddings whole",
          "[tp][parallel]") {
  test::TempDir dir;
  const auto c = load_config(dir.file("c.yaml", test::kMinimalModel),
                             {"parallel.tensor_model_parallel_size=2", "parallel.expert_model_parallel_size=2",
                              "model.moe_shared_expert_intermediate_size=64", "model.moe_shared_expert_gate=true",
                              "model.moe_layer_freq=2"})
                     .config;
  const auto layout = ParallelLayout::create(c, 4);
  auto model = moe::build_model(c.model);
  const ModelPartition partition(*model, layout);
  auto cut = [&](const std::string& name) { return partition.at(name).tp; };
  CHECK(cut("layers.0.self_attn.q_proj.weight").dim == 0);
  CHECK(cut("layers.0.self_attn.k_proj.weight").dim == 0);
  CHECK(cut("layers.0.self_attn.o_proj.weight").dim == 1);
  CHECK(cut("layers.0.mlp.experts.gate_up_proj").dim == 1);
  CHECK(cut("layers.0.mlp.experts.gate_up_proj").halves);
  CHECK(cut("layers.0.mlp.experts.down_proj").dim == 2);
  CHECK(cut("layers.0.mlp.shared_expert.up_proj.weight").dim == 0);
  CHECK(cut("layers.0.mlp.shared_expert.down_proj.weight").dim == 1);
  CHECK(cut("layers.1.mlp.gate_proj.weight").dim == 0);  // layer 1 is dense
  CHECK(cut("layers.1.mlp.down_proj.weight").dim == 1);
  for (const char* whole : {"embed_tokens.weight", "norm.weight", "layers.0.input_layernorm.weight", "layers.0.mlp.gate.weight",
                            "layers.0.mlp.shared_expert_gate.weight"}) {
    INFO(whole);
    CHECK_FALSE(cut(whole).splits());
  }
  // EP rank 1 and TP rank 1 of the experts' [8, 64, 64] gate/up: experts 4-7, gate rows 16-31 and
  // up rows 48-63.
  const auto gate_up = torch::randn({8, 64, 64});
  const auto mine = partition.local_part("layers.0.mlp.experts.gate_up_proj", gate_up, 1, 1);
  CHECK(torch::equal(mine, torch::cat({gate_up.narrow(0, 4, 4).narrow(1, 16, 16), gate_up.narrow(0, 4, 4).narrow(1, 48, 16)}, 1)));
}

TEST_CASE("sequence parallelism marks the parameters fed a chunk of the sequence: norms, embedding and head",
          "[tp][sp][parallel]") {
  test::TempDir dir;
  const auto path = dir.file("c.yaml", test::kMinimalModel);
  auto partition_of = [&](bool sp) {
    const auto c = load_config(path, {"parallel.tensor_model_parallel_size=2", fmt::format("parallel.sequence_parallel={}", sp),
                                      "model.untie_embeddings_and_output_weights=true"})
                       .config;
    auto model = moe::build_model(c.model);
    return ModelPartition(*model, ParallelLayout::create(c, 2));
  };
  const auto sp = partition_of(true), plain = partition_of(false);
  for (const auto& p : sp.parameters()) {
    INFO(p.name);
    const bool chunk_fed = p.name.find("layernorm") != std::string::npos || p.name == "norm.weight" ||
                           p.name == "embed_tokens.weight" || p.name == "lm_head.weight";
    CHECK(p.sequence_parallel == chunk_fed);
    CHECK_FALSE(plain.at(p.name).sequence_parallel);
    // The router sees the gathered sequence on every rank: its gradient is whole, not partial.
    if (p.name.find("mlp.gate.") != std::string::npos) CHECK_FALSE(p.sequence_parallel);
  }
}

TEST_CASE("the router's view of a gathered sequence sends its gradient to this rank's chunk only", "[tp][sp]") {
  // Rank 1 of 2 holds positions 3-5 of a [2, 6, 4] sequence; the gathered values are reused.
  const auto gathered = torch::randn({2, 6, 4});
  const auto mine = gathered.narrow(1, 3, 3).clone().requires_grad_(true);
  const auto whole = sequence_parallel_whole(mine, gathered, 1, 2);
  CHECK(torch::equal(whole, gathered));
  CHECK(whole.data_ptr() == gathered.data_ptr());  // a view: the router keeps no second copy
  const auto weight = torch::randn({2, 6, 4});
  (whole * weight).sum().backward();
  CHECK(torch::equal(mine.grad(), weight.narrow(1, 3, 3)));
}
