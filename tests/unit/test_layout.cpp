// ParallelLayout: Megatron's rank order checked against closed forms, and every impossible layout.
#include "core/config/config_loader.h"
#include "core/base/errors.h"
#include "parallel/layout/layout.h"
#include "test_util.h"

#include <catch2/catch.hpp>

using namespace moeforge;
using Catch::Matchers::Contains;

namespace {
// The minimal model, untied so that pipeline layouts are possible.
ExperimentConfig config_with(std::vector<std::string> overrides) {
  test::TempDir dir;
  overrides.insert(overrides.begin(), "model.untie_embeddings_and_output_weights=true");
  return load_config(dir.file("c.yaml", test::kMinimalModel), overrides).config;
}
std::string layout_error(const ExperimentConfig& c, int64_t world) {
  return test::user_error([&] { ParallelLayout::create(c, world); });
}
}  // namespace

TEST_CASE("rank order is tp-cp-ep-dp-pp: stages contiguous, EP ranks consecutive", "[layout]") {
  // world 8 = PP 2 x DP 4, EP 2 -> expert-DP 2.
  const auto c = config_with({"parallel.pipeline_model_parallel_size=2", "parallel.expert_model_parallel_size=2",
                              "training.global_batch_size=16"});
  const auto L = ParallelLayout::create(c, 8);
  CHECK(L.dp() == 4);
  CHECK(L.edp() == 2);
  CHECK(L.micro_batches_per_step() == 4);  // 16 / (1 * 4)
  CHECK(L.layers_per_stage() == std::vector<int64_t>{2, 2});
  CHECK(L.pipeline_group(5) == std::vector<int64_t>{1, 5});
  CHECK(L.data_parallel_group(5) == std::vector<int64_t>{4, 5, 6, 7});
  CHECK(L.expert_parallel_group(5) == std::vector<int64_t>{4, 5});
  CHECK(L.expert_parallel_group(6) == std::vector<int64_t>{6, 7});
  CHECK(L.expert_data_parallel_group(5) == std::vector<int64_t>{5, 7});
  // Every rank appears in exactly one group of each kind: group sizes sum to the world.
  for (int64_t r = 0; r < 8; ++r) {
    const auto xy = L.coordinates(r);
    CHECK(xy.pp * L.dp() + xy.edp * L.ep() + xy.ep == r);
  }
}

TEST_CASE("tensor-parallel ranks are innermost: TP groups consecutive, every other group TP apart", "[layout][tp]") {
  // world 16 = PP 2 x DP 4 x TP 2, EP 2 -> expert-DP 2. rank = (pp * DP + dp) * TP + tp.
  const auto c = config_with({"parallel.pipeline_model_parallel_size=2", "parallel.expert_model_parallel_size=2",
                              "parallel.tensor_model_parallel_size=2", "training.global_batch_size=16"});
  const auto L = ParallelLayout::create(c, 16);
  CHECK(L.tp() == 2);
  CHECK(L.dp() == 4);
  CHECK(L.edp() == 2);
  CHECK(L.micro_batches_per_step() == 4);  // 16 / (1 * DP 4): TP ranks share their micro-batches
  // rank 11: tp 1, dp 1 (ep 1, edp 0), pp 1.
  const auto x = L.coordinates(11);
  CHECK(x.tp == 1);
  CHECK(x.dp == 1);
  CHECK(x.ep == 1);
  CHECK(x.edp == 0);
  CHECK(x.pp == 1);
  CHECK(L.tensor_parallel_group(11) == std::vector<int64_t>{10, 11});
  CHECK(L.pipeline_group(11) == std::vector<int64_t>{3, 11});
  CHECK(L.data_parallel_group(11) == std::vector<int64_t>{9, 11, 13, 15});
  CHECK(L.expert_parallel_group(11) == std::vector<int64_t>{9, 11});
  CHECK(L.expert_data_parallel_group(11) == std::vector<int64_t>{11, 15});
  for (int64_t r = 0; r < 16; ++r) {
    const auto xy = L.coordinates(r);
    CHECK((xy.pp * L.dp() + xy.edp * L.ep() + xy.ep) * L.tp() + xy.tp == r);
  }
  CHECK_THAT(L.describe(), Contains("world 16 = PP 2 x DP 4 (EP 2 x expert-DP 2) x TP 2"));
}

TEST_CASE("tensor parallelism needs heads and widths it divides, and the whole checkpoint format", "[layout][tp]") {
  CHECK_THAT(layout_error(config_with({"parallel.tensor_model_parallel_size=3"}), 3),
             Contains("model.num_attention_heads 4 is not divisible by parallel.tensor_model_parallel_size 3") &&
                 Contains("model.moe_ffn_hidden_size 32 is not divisible") && Contains("TP=3"));
  CHECK_THAT(layout_error(config_with({"parallel.tensor_model_parallel_size=2"}), 3),
             Contains("world size 3 is not divisible by parallel.pipeline_model_parallel_size x "
                      "tensor_model_parallel_size (1 x 2)"));
  CHECK_THAT(layout_error(config_with({"parallel.tensor_model_parallel_size=2", "checkpoint.format=sharded"}), 2),
             Contains("checkpoint.format sharded does not split tensors over tensor-parallel ranks yet"));
  CHECK_NOTHROW(ParallelLayout::create(config_with({"parallel.tensor_model_parallel_size=4"}), 4));
}

TEST_CASE("sequence parallelism needs a sequence its TP divides, and is off with TP 1", "[layout][tp][sp]") {
  CHECK_THAT(layout_error(config_with({"parallel.tensor_model_parallel_size=4", "parallel.sequence_parallel=true",
                                       "training.seq_length=30"}),
                          4),
             Contains("training.seq_length 30 is not divisible by parallel.tensor_model_parallel_size 4") &&
                 Contains("parallel.sequence_parallel: false"));
  const auto sp = ParallelLayout::create(config_with({"parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"}), 2);
  CHECK(sp.sequence_parallel());
  CHECK_THAT(sp.describe(), Contains("x TP 2 (sequence-parallel)"));
  CHECK_FALSE(ParallelLayout::create(config_with({"parallel.sequence_parallel=true"}), 1).sequence_parallel());
}

TEST_CASE("uneven pipelines split the middle evenly", "[layout]") {
  const auto c = config_with({"model.num_layers=10", "parallel.pipeline_model_parallel_size=4",
                              "parallel.decoder_first_pipeline_num_layers=1", "parallel.decoder_last_pipeline_num_layers=3",
                              "training.global_batch_size=8"});
  const auto L = ParallelLayout::create(c, 4);
  CHECK(L.layers_per_stage() == std::vector<int64_t>{1, 3, 3, 3});
  CHECK(L.chunks(2).size() == 1);
  CHECK(L.chunks(2).front().begin == 4);
  CHECK(L.chunks(2).front().end == 7);
}

TEST_CASE("interleaved stages hold every PP-th chunk of the layers", "[layout][pipeline]") {
  // 8 layers in PP 2 x V 2 = 4 chunks of 2: rank 0 runs layers 0-1 and 4-5, rank 1 2-3 and 6-7.
  const auto c = config_with({"model.num_layers=8", "parallel.pipeline_model_parallel_size=2",
                              "parallel.virtual_pipeline_model_parallel_size=2", "training.global_batch_size=4"});
  const auto L = ParallelLayout::create(c, 2);
  CHECK(L.vpp() == 2);
  CHECK(L.layers_per_stage() == std::vector<int64_t>{4, 4});
  REQUIRE(L.chunks(0).size() == 2);
  CHECK(format_layer_ranges(L.chunks(0)) == "0-1,4-5");
  CHECK(format_layer_ranges(L.chunks(1)) == "2-3,6-7");
  for (int64_t l = 0; l < 8; ++l) {
    CHECK(L.stage_of_layer(l) == (l / 2) % 2);
    CHECK(L.chunk_of_layer(l) == l / 4);
  }
  CHECK_THAT(L.describe(), Contains("layers per stage [4, 4] in 2 interleaved chunks of 2"));
}

TEST_CASE("impossible interleaved layouts say which rule and how to fix it", "[layout][pipeline][errors]") {
  CHECK_THAT(layout_error(config_with({"parallel.virtual_pipeline_model_parallel_size=2"}), 1),
             Contains("needs parallel.pipeline_model_parallel_size > 1") && Contains("VPP=2"));
  CHECK_THAT(layout_error(config_with({"parallel.pipeline_model_parallel_size=2",
                                       "parallel.virtual_pipeline_model_parallel_size=4"}),
                          2),
             Contains("model.num_layers (4) is not divisible by parallel.pipeline_model_parallel_size x "
                      "virtual_pipeline_model_parallel_size (2 x 4 = 8 model chunks)"));
  CHECK_THAT(layout_error(config_with({"parallel.pipeline_model_parallel_size=2",
                                       "parallel.virtual_pipeline_model_parallel_size=2",
                                       "parallel.decoder_first_pipeline_num_layers=1"}),
                          2),
             Contains("cannot be combined with parallel.virtual_pipeline_model_parallel_size > 1"));
  // 3 micro-batches per step do not make whole groups of PP 2.
  CHECK_THAT(layout_error(config_with({"parallel.pipeline_model_parallel_size=2",
                                       "parallel.virtual_pipeline_model_parallel_size=2", "training.global_batch_size=3"}),
                          2),
             Contains("= 3, to be a multiple of parallel.pipeline_model_parallel_size 2: choose a global batch that is "
                      "a multiple of 2"));
}

TEST_CASE("impossible layouts list the problem and every factor", "[layout][errors]") {
  const auto c = config_with({});
  CHECK_THAT(layout_error(config_with({"parallel.pipeline_model_parallel_size=4"}), 6),
             Contains("world size 6 is not divisible by parallel.pipeline_model_parallel_size 4") &&
                 Contains("factors: world=6, PP=4"));
  CHECK_THAT(layout_error(config_with({"parallel.expert_model_parallel_size=3"}), 4),
             Contains("expert_model_parallel_size 3 does not divide the data-parallel size 4") &&
                 Contains("model.num_experts 8 is not divisible by parallel.expert_model_parallel_size 3"));
  CHECK_THAT(layout_error(config_with({"parallel.pipeline_model_parallel_size=3"}), 3),
             Contains("model.num_layers (4) is not divisible by parallel.pipeline_model_parallel_size (3)"));
  CHECK_THAT(layout_error(c, 3),
             Contains("global_batch_size 8 is not divisible by training.micro_batch_size 1 x data-parallel size 3") &&
                 Contains("global_batch_size=8, micro_batch_size=1"));
  CHECK_THAT(layout_error(config_with({"model.num_experts=null", "parallel.expert_model_parallel_size=2"}), 2),
             Contains("the model is dense"));
  CHECK_THAT(layout_error(config_with({"parallel.pipeline_model_parallel_size=2",
                                       "parallel.decoder_first_pipeline_num_layers=1",
                                       "parallel.decoder_last_pipeline_num_layers=1"}),
                          2),
             Contains("puts 1 + 1 layers on its 2 stages but model.num_layers is 4"));
  CHECK_THAT(layout_error(c, 0), Contains("world size must be at least 1"));
}

TEST_CASE("pipeline rules and the run's world size are layout rules too", "[layout][errors]") {
  CHECK_THAT(layout_error(config_with({"model.untie_embeddings_and_output_weights=false",
                                       "parallel.pipeline_model_parallel_size=2"}),
                          2),
             Contains("pipeline parallel training needs untied embeddings"));
  CHECK_THAT(layout_error(config_with({"model.moe_router_load_balancing_type=hf_pooled_aux_loss",
                                       "parallel.pipeline_model_parallel_size=2"}),
                          2),
             Contains("hf_pooled_aux_loss pools the router statistics of all layers"));
  CHECK_THAT(layout_error(config_with({"parallel.world_size=8"}), 4),
             Contains("parallel.world_size is 8 but the run has 4 ranks"));
  // One stage may tie and pool: the head sits next to the embedding, every layer's router is local.
  CHECK_NOTHROW(ParallelLayout::create(config_with({"model.untie_embeddings_and_output_weights=false",
                                                    "model.moe_router_load_balancing_type=hf_pooled_aux_loss"}),
                                       2));
  const auto L = ParallelLayout::create(config_with({"parallel.expert_model_parallel_size=2"}), 2);
  CHECK(L.experts_per_rank() == 4);
  CHECK(L.stage_of_layer(3) == 0);
  const auto P = ParallelLayout::create(config_with({"parallel.pipeline_model_parallel_size=2"}), 2);
  CHECK(P.stage_of_layer(1) == 0);
  CHECK(P.stage_of_layer(2) == 1);
}
