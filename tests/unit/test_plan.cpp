// Planner numbers against independent references: the parameter counts and FLOPs published in
// ../shared/reference/qwen-moe.md and flops-mfu.md (computed there from the architecture by hand),
// and closed forms for the batch, bubble and memory arithmetic.
#include "core/config/config_loader.h"
#include "core/flops/model_size.h"
#include "core/kernels/cross_entropy.h"
#include "core/kernels/kernels.h"
#include "parallel/layout/plan.h"
#include "parallel/layout/layout.h"
#include "test_util.h"

#include <catch2/catch.hpp>

using namespace moeforge;

TEST_CASE("Qwen1.5-MoE-A2.7B parameter counts match the published ones", "[plan]") {
  const auto c = load_config(test::source_path("configs/qwen1.5-moe-a2.7b.yaml")).config;
  const ParameterCounts p = count_parameters(c.model);
  CHECK(p.total == 14'315'784'192);
  CHECK(p.activated == 2'689'173'504);
  CHECK(p.activated_non_embedding == 2'066'843'648);
  CHECK(p.flagperf_compute_n == 2'374'762'496);
  const LayerParameters layer = layer_parameters(c.model, 0);
  CHECK(layer.attention == 16'777'216 + 6'144);
  CHECK(layer.router == 122'880);
  CHECK(layer.shared_expert == 34'603'008 + 2'048);
  CHECK(layer.expert == 8'650'752);
  CHECK(layer.total() == 570'560'512);
  CHECK(layer.activated() == 86'118'400);
}

TEST_CASE("Qwen1.5-MoE-A2.7B FLOPs per token at seq 8192", "[plan]") {
  const auto c = load_config(test::source_path("configs/qwen1.5-moe-a2.7b.yaml")).config;
  const auto f = model_flops_per_step(c.model, 512, 8192);
  const double tokens = 512.0 * 8192.0;
  CHECK(static_cast<double>(f.megatron) / tokens / 1e9 == Approx(16.664).margin(0.0005));
  CHECK(static_cast<double>(f.megatron_legacy) / tokens / 1e9 == Approx(19.08).margin(0.005));
  CHECK(static_cast<double>(f.megatron) == Approx(6.99e16).epsilon(0.001));
  CHECK(f.six_n == 6 * 2'374'762'496LL * 512 * 8192);
}

TEST_CASE("the FlagPerf case's compute N is the published 2,337,013,760", "[plan]") {
  const auto c = load_config(test::source_path("configs/flagperf-qwen1.5-moe.yaml")).config;
  CHECK(count_parameters(c.model).flagperf_compute_n == 2'337'013'760);
  // "about 7.52B total" in qwen-moe.md.
  CHECK(static_cast<double>(count_parameters(c.model).total) == Approx(7.52e9).epsilon(0.002));
}

TEST_CASE("batch, bubble and memory arithmetic of the mission plan", "[plan]") {
  const auto c = load_config(test::source_path("configs/qwen1.5-moe-a2.7b.yaml")).config;
  const auto layout = ParallelLayout::create(c, 8);
  const Plan plan = make_plan(c, "q.yaml", layout);
  CHECK(layout.micro_batches_per_step() == 128);
  CHECK(plan.tokens_per_step == 4'194'304);
  CHECK(plan.bubble_fraction == Approx(1.0 / 129.0));
  CHECK(plan.experts_per_ep_rank == 15);
  REQUIRE(plan.stages.size() == 2);

  // Stage parameters: 12 layers of dense parts + 15 of 60 experts, plus embedding (first) or final
  // norm and untied head (last).
  const int64_t dense_layer = 570'560'512 - 60 * 8'650'752;
  const int64_t experts_layer = 15 * 8'650'752;
  const int64_t vh = 151'936LL * 2048;
  CHECK(plan.stages[0].parameters == 12 * (dense_layer + experts_layer) + vh);
  CHECK(plan.stages[1].parameters == 12 * (dense_layer + experts_layer) + vh + 2048);
  // The expert-parallel shares add up to the whole model.
  CHECK(plan.stages[0].parameters + plan.stages[1].parameters + 3 * 24 * experts_layer == 14'315'784'192);
  for (const auto& s : plan.stages) {
    CHECK(s.weight_bytes == 2 * s.parameters);    // bf16
    CHECK(s.gradient_bytes == 4 * s.parameters);  // fp32 gradients
    CHECK(s.optimizer_bytes == 12 * s.parameters);
    // ZeRO-1: dense state over DP 4, expert state over expert-DP 1.
    CHECK(s.optimizer_bytes_distributed == 12 * (s.parameters - s.expert_parameters) / 4 + 12 * s.expert_parameters);
  }
  CHECK(plan.stages[0].micro_batches_in_flight == 2);
  CHECK(plan.stages[1].micro_batches_in_flight == 1);
  // The last stage also holds the LM head's loss. Fused (hardware.device cuda): the input's bf16
  // gradient [T, D] and one 256 MiB chunk of logits; the head is untied, so its weight's gradient
  // goes into main_grad, counted with the gradients.
  REQUIRE(plan.fused_loss);
  CHECK(plan.stages[1].activation_bytes_per_micro_batch - plan.stages[0].activation_bytes_per_micro_batch ==
        8192LL * 2048 * 2 + (256LL << 20));
  // The reference (another accelerator, or model.kernels reference): the logits' fp32 copy,
  // log-softmax's fp32 output and the fp32 gradient: 12 V bytes per token.
  for (const char* set : {"hardware.device=emulated", "model.kernels=reference"}) {
    const auto r = load_config(test::source_path("configs/qwen1.5-moe-a2.7b.yaml"), {std::string(set)}).config;
    const Plan reference = make_plan(r, "q.yaml", ParallelLayout::create(r, 8));
    CHECK_FALSE(reference.fused_loss);
    CHECK(reference.stages[1].activation_bytes_per_micro_batch - reference.stages[0].activation_bytes_per_micro_batch ==
          8192LL * 151'936 * 12);
  }
}

TEST_CASE("the plan's fused-loss rule and chunk size are the kernel layer's", "[plan]") {
  // The plan runs without LibTorch, so it restates both; these keep them the kernels' own.
  CHECK(kLossChunkBytes == kernels::kChunkBytes);
  const auto c = load_config(test::source_path("configs/tiny.yaml"), {"hardware.device=cpu"}).config;
  CHECK(make_plan(c, "t.yaml", ParallelLayout::create(c, 1)).fused_loss ==
        kernels::fused(kernels::Kernel::cross_entropy, c10::DeviceType::CPU));
}

TEST_CASE("what one save of the mission writes and holds, whole and sharded", "[plan][checkpoint]") {
  const int64_t total = 14'315'784'192;  // the published parameter count (test above)
  const auto c = load_config(test::source_path("configs/qwen1.5-moe-a2.7b.yaml")).config;
  CHECK(c.checkpoint.format == CheckpointFormat::sharded);  // the mission saves sharded (issue 34 part 4)
  const Plan plan = make_plan(c, "q.yaml", ParallelLayout::create(c, 8));
  // bf16 weights; fp32 master copy and Adam m, v.
  CHECK(plan.checkpoint.model_bytes == 2 * total);
  CHECK(plan.checkpoint.optimizer_bytes == 12 * total);
  CHECK(plan.checkpoint.whole_rank0_host_bytes == 14 * total);
  // PP 2 x EP 4 writers; the largest is the last stage's EP rank 0: its dense tensors (with the
  // head and final norm) and 15 experts per layer.
  CHECK(plan.checkpoint.sharded_writers == 8);
  CHECK(plan.checkpoint.sharded_largest_shard_bytes == 14 * plan.stages[1].parameters);
  const auto json = plan_to_json(plan, c);
  CHECK(json["checkpoint"]["format"] == "sharded");
  CHECK(json["checkpoint"]["bytes"] == 14 * total);
  const std::string text = format_plan(plan, c);
  CHECK_THAT(text, Catch::Contains("writes 186.66 GiB"));
  CHECK_THAT(text, Catch::Contains("* sharded: 8 ranks write in parallel"));

  // Whole: the plan warns of rank 0's host memory; with TP the sharded format is not available.
  const auto whole = load_config(test::source_path("configs/qwen1.5-moe-a2.7b.yaml"), {"checkpoint.format=whole"}).config;
  const Plan w = make_plan(whole, "q.yaml", ParallelLayout::create(whole, 8));
  REQUIRE(w.warnings.size() == 1);
  CHECK_THAT(w.warnings[0], Catch::Contains("gathers 186.7 GiB into rank 0's host memory") &&
                                Catch::Contains("checkpoint.format: sharded"));
  const auto tp = load_config(test::source_path("configs/qwen1.5-moe-a2.7b.yaml"),
                              {"checkpoint.format=whole", "parallel.tensor_model_parallel_size=2", "parallel.world_size=16"}).config;
  const Plan t = make_plan(tp, "q.yaml", ParallelLayout::create(tp, 16));
  CHECK(t.checkpoint.sharded_writers == 0);
  CHECK_THAT(format_plan(t, tp), Catch::Contains("sharded: not available with tensor_model_parallel_size 2"));
}

TEST_CASE("interleaved stages: the bubble shrinks by V, each chunk-micro-batch holds 1/V of the activations",
          "[plan][pipeline]") {
  // Without recomputation and ZeRO-1, so that a stage's peak is weights, gradients, state and activations.
  auto mission = [](const std::string& vpp) {
    return load_config(test::source_path("configs/qwen1.5-moe-a2.7b.yaml"),
                       {"parallel.virtual_pipeline_model_parallel_size=" + vpp, "training.recompute_granularity=none",
                        "parallel.use_distributed_optimizer=false"})
        .config;
  };
  const auto c = mission("2");
  const Plan one = make_plan(mission("1"), "q.yaml", ParallelLayout::create(mission("1"), 8));
  const Plan plan = make_plan(c, "q.yaml", ParallelLayout::create(c, 8));
  // M = 128 micro-batches, PP 2, V 2: (PP - 1) / (V M + PP - 1).
  CHECK(plan.bubble_fraction == Approx(1.0 / 257.0));
  // Rank 0: layers 0-5 and 12-17; rank 1: 6-11 and 18-23. The same parameters per stage as without
  // interleaving (12 layers each, embedding first, head last).
  CHECK(format_layer_ranges(plan.stages[0].chunks) == "0-5,12-17");
  CHECK(format_layer_ranges(plan.stages[1].chunks) == "6-11,18-23");
  CHECK(plan.stages[0].parameters == one.stages[0].parameters);
  CHECK(plan.stages[1].parameters == one.stages[1].parameters);
  // Warm-up (PP - s - 1) x 2 + (V - 1) x PP forwards, plus the one before the first backward.
  CHECK(plan.stages[0].micro_batches_in_flight == 5);
  CHECK(plan.stages[1].micro_batches_in_flight == 3);
  // Activations: 5 (3) chunk-micro-batches of half the stage's layers, against 2 (1) whole micro-batches.
  const auto layer_activations = [](const Plan& p, size_t s) {
    return p.stages[s].peak_bytes - p.stages[s].weight_bytes - p.stages[s].gradient_bytes - p.stages[s].optimizer_bytes;
  };
  CHECK(layer_activations(plan, 0) * 4 == layer_activations(one, 0) * 5);
  const auto json = plan_to_json(plan, c);
  CHECK(json["pipeline"]["schedule"] == "interleaved_1f1b");
  CHECK(json["pipeline"]["virtual_pipeline_model_parallel_size"] == 2);
}

TEST_CASE("dense models and GQA count as Megatron does", "[plan]") {
  test::TempDir dir;
  const auto c = load_config(dir.file("d.yaml", test::kMinimalModel),
                             {"model.num_experts=null", "model.num_query_groups=2", "model.add_qkv_bias=true"})
                     .config;
  // h=64, heads 4 of 16, 2 kv groups: q 64, kv 32; FFN 4h = 256; vocab 1000 padded to 1024; tied.
  const int64_t attention = 64 * (64 + 2 * 32) + 64 * 64 + (64 + 2 * 32);
  const int64_t per_layer = attention + 2 * 64 + 3 * 64 * 256;
  CHECK(layer_parameters(c.model, 0).total() == per_layer);
  CHECK(count_parameters(c.model).total == 4 * per_layer + 1024 * 64 + 64);
  const auto f = model_flops_per_step(c.model, 8, 32);
  const int64_t macs = 64 * 256 * 3 * 4 + 4 * (64 * (64 + 64) + 64 * 64) + 64 * 1024;
  CHECK(f.megatron == 6 * 8 * 32 * macs + 6 * 8 * 32 * 32 * 64 * 4);
}

TEST_CASE("train --dry-run prints what one save of the layout writes and holds", "[plan][checkpoint][cli]") {
  const auto r = test::run_command(test::moeforge_binary() + " train " + test::source_path("configs/qwen1.5-moe-a2.7b.yaml") +
                                   " --dry-run --set checkpoint.format=whole 2>/dev/null");
  INFO(r.output);
  CHECK_THAT(r.output, Catch::Contains("checkpoint (one save; checkpoint.format: whole)"));
  CHECK_THAT(r.output, Catch::Contains("  * whole:   rank 0 holds all 186.66 GiB in host memory and writes it alone"));
  CHECK_THAT(r.output, Catch::Contains("warning: each whole save gathers 186.7 GiB into rank 0's host memory"));
}

namespace {
// One MoE layer small enough to count by hand: h 4, 2 heads of 2 (q = kv = 4), 4 experts of width
// 3 at top-2, a gated shared expert of width 5, vocabulary 8 (padded to 8), untied head.
ModelConfig hand_counted_moe() {
  ModelConfig m;
  m.num_layers = 1;
  m.hidden_size = 4;
  m.num_attention_heads = 2;
  m.num_query_groups = 2;
  m.kv_channels = 2;
  m.ffn_hidden_size = 8;
  m.vocab_size = 8;
  m.make_vocab_size_divisible_by = 8;
  m.untie_embeddings_and_output_weights = true;
  m.num_experts = 4;
  m.moe_ffn_hidden_size = 3;
  m.moe_router_topk = 2;
  m.moe_shared_expert_intermediate_size = 5;
  m.moe_shared_expert_gate = true;
  return m;
}
}  // namespace

TEST_CASE("every MFU convention of a hand-counted MoE layer", "[plan][mfu]") {
  const ModelConfig m = hand_counted_moe();
  // Parameters: attention 4*(4+8) + 4*4 = 64, norms 8, router 4*4 = 16, one expert 3*4*3 = 36,
  // shared 3*4*5 + 4 = 64; activated layer 64 + 8 + 16 + 64 + 2*36 = 224; embedding 32, head 32,
  // final norm 4: activated 292; torchtitan's N - N_embedding = 292 - 32 = 260.
  const ParameterCounts p = count_parameters(m);
  CHECK(p.activated == 292);
  CHECK(p.torchtitan_n == 260);
  // batch 2 x s 6 = 12 tokens. Megatron: MACs per token 4*(3*2*3 + 5*3) + 64 + 4*8 = 228 (no router,
  // no gate), 6*12*228 = 16416, attention 6*2*6^2*4*1 = 1728 (causal half); legacy: twice that.
  const FlopsPerStep f = model_flops_per_step(m, 2, 6);
  CHECK(f.megatron == 16416 + 1728);
  CHECK(f.megatron_legacy == 16416 + 2 * 1728);
  // torchtitan per token: 6*260 + 12*1*4*6 = 1848; 12 tokens.
  CHECK(f.torchtitan == 12 * 1848);
  // Hardware FLOPs: none = Megatron; full adds the layers' forward, (18144 - head 6*12*4*8) / 3 =
  // 5280; selective adds the core attention's forward 2*2*6^2*4*1 = 576.
  CHECK(hardware_flops_per_step(m, 2, 6, RecomputeGranularity::none) == 18144);
  CHECK(hardware_flops_per_step(m, 2, 6, RecomputeGranularity::full) == 18144 + 5280);
  CHECK(hardware_flops_per_step(m, 2, 6, RecomputeGranularity::selective) == 18144 + 576);
}

TEST_CASE("plan prints every MFU convention with its formula and the peak's source", "[plan][mfu]") {
  const auto c = load_config(test::source_path("configs/flagperf-qwen1.5-moe.yaml")).config;
  const Plan plan = make_plan(c, "f.yaml", ParallelLayout::create(c, 8));
  const std::string text = format_plan(plan, c);
  for (const char* name : {"MFU (Megatron)", "MFU (Megatron legacy)", "MFU (6N, FlagPerf)", "MFU (torchtitan)",
                           "HFU (recomputation counted)", "torchtitan N - N_embedding"}) {
    CHECK_THAT(text, Catch::Contains(name));
  }
  CHECK_THAT(text, Catch::Contains("hardware.peak_tflops = 312 TFLOP/s"));
  const auto j = plan_to_json(plan, c);
  CHECK(j["flops"]["per_step"]["torchtitan"].get<int64_t>() == plan.flops_per_step.torchtitan);
  CHECK(j["flops"]["per_step"]["hardware"].get<int64_t>() == plan.hardware_flops_per_step);
  CHECK(j["flops"]["conventions"]["peak_source"].get<std::string>() == "hardware.peak_tflops = 312 TFLOP/s");
  CHECK(j["parameters"]["torchtitan_n"].get<int64_t>() == plan.parameters.torchtitan_n);
}

TEST_CASE("the mission's torchtitan and hardware FLOPs equal transformers' parameters counted torchtitan's way",
          "[plan][mfu][oracle]") {
  test::TempDir dir;
  const std::string out = (dir.path() / "conventions.json").string();
  test::run_oracle("mfu_conventions_oracle.py", "512 8192 " + out);
  const auto o = nlohmann::json::parse(test::slurp(out));
  const auto mission = [](const char* recompute) {
    return load_config(test::source_path("configs/qwen1.5-moe-a2.7b.yaml"), {std::string("training.recompute_granularity=") + recompute})
        .config.model;
  };
  const ModelConfig m = mission("none");
  CHECK(count_parameters(m).torchtitan_n == o["torchtitan_n"].get<int64_t>());
  CHECK(model_flops_per_step(m, 512, 8192).torchtitan == o["torchtitan"].get<int64_t>());
  CHECK(static_cast<double>(model_flops_per_step(m, 512, 8192).megatron) == Approx(o["megatron"].get<double>()).epsilon(1e-12));
  CHECK(static_cast<double>(hardware_flops_per_step(m, 512, 8192, RecomputeGranularity::full)) ==
        Approx(o["hardware_full"].get<double>()).epsilon(1e-12));
  CHECK(static_cast<double>(hardware_flops_per_step(m, 512, 8192, RecomputeGranularity::selective)) ==
        Approx(o["hardware_selective"].get<double>()).epsilon(1e-12));
}
