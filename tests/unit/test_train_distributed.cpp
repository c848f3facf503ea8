// `mpirun -np N moeforge train`: data- and expert-parallel runs, with and without the distributed
// optimizer, equal the single-process run of the same global batch (losses, gradient norms,
// validation loss, every parameter and the optimizer state after 3 iterations, fp32, relative
// 1e-5); checkpoints move between layouts; a killed rank ends the job.
#include "core/config/config_loader.h"
#include "core/flops/model_size.h"
#include "core/files/safetensors.h"
#include "test_util.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <thread>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

// One layout's run against the single-process run of the same global batch.
struct Layout {
  int ranks = 1, ep = 1;
  bool distributed_optimizer = false;
  int pp = 1;
  int vpp = 1;  // model chunks per stage (interleaved 1F1B)
  int tp = 1;
  bool sp = false;  // sequence parallelism
  int dp() const { return ranks / pp / tp; }
  std::string name() const {
    return fmt::format("pp{}_vpp{}_tp{}{}_dp{}_ep{}{}", pp, vpp, tp, sp ? "sp" : "", dp(), ep,
                       distributed_optimizer ? "_zero1" : "");
  }
  std::string args() const {
    return fmt::format(" --set parallel.expert_model_parallel_size={} --set parallel.use_distributed_optimizer={} --set "
                       "parallel.pipeline_model_parallel_size={} --set parallel.virtual_pipeline_model_parallel_size={} "
                       "--set parallel.tensor_model_parallel_size={} --set parallel.sequence_parallel={}",
                       ep, distributed_optimizer, pp, vpp, tp, sp);
  }
};

// `single_extra`: arguments of the single-process run only (its micro-batch size, where the loss
// depends on what one micro-batch holds across DP ranks).
void check_equals_single_process(const std::vector<Layout>& layouts, const std::string& extra = "", int layers = 2,
                                 const std::string& single_extra = "") {
  TempDir dir;
  const auto config = write_config(dir);
  const std::string args =
      " --set training.train_iters=3 --set training.eval_interval=2 --set training.eval_iters=1" + extra;
  auto run = [&](const Layout& l) {
    const std::string cmd = (l.ranks == 1 ? kBin : kMpirun + " -np " + std::to_string(l.ranks) + " " + kBin) + " train " +
                            config + args + (l.ranks == 1 ? single_extra : "") + l.args() + " --set checkpoint.save=" + (dir.path() / l.name() / "ckpt").string() +
                            " --set logging.run_dir=" + (dir.path() / l.name()).string();
    const auto r = run_command(cmd);
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    return r.output;
  };
  const Layout one;
  run(one);
  const auto single = read_metrics(dir.path() / one.name() / "metrics.jsonl");
  const SafetensorsCheckpoint reference((dir.path() / one.name() / "ckpt" / "iter_0000003").string());
  for (const auto& layout : layouts) {
    INFO(layout.name());
    const auto out = run(layout);
    CHECK_THAT(out, Contains(fmt::format("world {} = PP {} x DP {} (EP {}", layout.ranks, layout.pp, layout.dp(), layout.ep)));
    if (layout.sp) CHECK_THAT(out, Contains(fmt::format("x TP {} (sequence-parallel)", layout.tp)));
    const auto m = read_metrics(dir.path() / layout.name() / "metrics.jsonl");  // written once, by rank 0
    REQUIRE(m.size() == 3);
    for (size_t i = 0; i < 3; ++i) {
      INFO("iteration " << i + 1);
      for (const char* key : {"lm_loss", "aux_loss", "grad_norm"}) {
        INFO(key << ": " << m[i][key] << " vs " << single[i][key]);
        CHECK(relative(m[i][key].get<double>(), single[i][key].get<double>()) < 1e-5);
      }
      CHECK(m[i]["consumed_samples"] == single[i]["consumed_samples"]);
      CHECK(m[i]["lr"] == single[i]["lr"]);
      CHECK(m[i]["expert_load_per_layer"] == single[i]["expert_load_per_layer"]);
      CHECK(m[i]["expert_idle_per_layer"] == single[i]["expert_idle_per_layer"]);
      // Rank 0's host syncs (core/device/host_sync.h): the dispatcher's counts once per MoE layer of its
      // stage and micro-batch, then the losses' read, the gradient norm's and the step's end.
      const int micro_batches = 8 / (2 * layout.dp());
      CHECK(m[i]["host_syncs"].get<int>() == micro_batches * layers / layout.pp + 3);
      if (layout.ep > 1) {
        // Every routed slot of the global batch arrives at exactly one EP rank: the rows received
        // per layer, summed over DP ranks, are all slots (global batch x seq x top-k), and routing
        // by a random router is uneven across ranks.
        const auto received = m[i]["ep_tokens_received"];
        REQUIRE(received.size() == static_cast<size_t>(layers));
        for (const auto& layer : received) {
          REQUIRE(layer.size() == static_cast<size_t>(layout.dp()));
          int64_t total = 0;
          for (const auto& r : layer) total += r.get<int64_t>();
          if (extra.empty()) CHECK(total == 8 * 32 * 4);  // a capacity factor drops some
          CHECK(total <= 8 * 32 * 4);
        }
        CHECK(m[i]["ep_tokens_received_max_over_mean"].get<double>() > 1.0);
        CHECK(m[i]["all_to_all_bytes_sent"].get<int64_t>() > 0);
      } else {
        CHECK_FALSE(m[i].contains("ep_tokens_received"));
      }
    }
    CHECK(relative(m[1]["valid_lm_loss"].get<double>(), single[1]["valid_lm_loss"].get<double>()) < 1e-5);
    const SafetensorsCheckpoint trained((dir.path() / layout.name() / "ckpt" / "iter_0000003").string());
    REQUIRE(trained.names() == reference.names());
    double worst = 0, worst_k_bias = 0;
    for (const auto& tensor : reference.names()) {
      const auto a = trained.tensor(tensor, torch::kFloat64), b = reference.tensor(tensor, torch::kFloat64);
      if (tensor.find("k_proj.bias") != std::string::npos) {
        // The key bias has an exactly zero gradient (softmax ignores a shift shared by all keys): it
        // moves only by Adam normalizing rounding noise, so only an absolute bound (lr-sized) applies.
        worst_k_bias = std::max(worst_k_bias, (a - b).abs().max().item<double>());
        continue;
      }
      worst = std::max(worst, (a - b).norm().item<double>() / std::max(b.norm().item<double>(), 1e-30));
    }
    INFO("largest relative parameter difference " << worst << ", key bias " << worst_k_bias);
    CHECK(worst < 1e-5);
    CHECK(worst_k_bias < 2e-3 * 3);
    // The optimizer state is saved whole, whatever the layout: the same tensors as one process.
    const SafetensorsFile opt((dir.path() / layout.name() / "ckpt" / "iter_0000003" / "optimizer.safetensors").string());
    const SafetensorsFile opt_ref((dir.path() / one.name() / "ckpt" / "iter_0000003" / "optimizer.safetensors").string());
    double worst_state = 0;
    for (const auto& name : opt_ref.names()) {
      if (name.rfind("exp_avg.", 0) != 0 || name.find("k_proj.bias") != std::string::npos) continue;
      REQUIRE(opt.contains(name));
      const auto a = opt.tensor(name, torch::kFloat64), b = opt_ref.tensor(name, torch::kFloat64);
      worst_state = std::max(worst_state, (a - b).norm().item<double>() / std::max(b.norm().item<double>(), 1e-30));
    }
    INFO("largest relative exp_avg difference " << worst_state);
    CHECK(worst_state < 1e-4);
  }
}

}  // namespace

TEST_CASE("data-parallel training equals the single-process run", "[train][distributed][mpi]") {
  check_equals_single_process({{2, 1, false}, {4, 1, false}});
}

TEST_CASE("the distributed optimizer (ZeRO-1) equals the single-process run", "[train][distributed][mpi]") {
  check_equals_single_process({{2, 1, true}, {4, 1, true}});
}

TEST_CASE("expert-parallel training equals the single-process run", "[train][distributed][mpi]") {
  check_equals_single_process({{2, 2, false}, {4, 4, false}});
}

TEST_CASE("expert parallel with the distributed optimizer equals the single-process run", "[train][distributed][mpi]") {
  check_equals_single_process({{2, 2, true}, {4, 4, true}, {4, 2, true}});
}

TEST_CASE("expert parallel with a capacity factor (dropped slots) equals the single-process run",
          "[train][distributed][mpi]") {
  check_equals_single_process({{2, 2, false}}, " --set model.moe_expert_capacity_factor=0.8");
}

TEST_CASE("pipeline-parallel (1F1B) training equals the single-process run", "[train][distributed][mpi]") {
  check_equals_single_process({{2, 1, false, 2}, {4, 1, false, 4}}, kPipelineModel, 4);
}

TEST_CASE("pipeline with expert and data parallel, and with ZeRO-1, equals the single-process run",
          "[train][distributed][mpi]") {
  check_equals_single_process({{4, 2, false, 2}, {4, 1, true, 2}}, kPipelineModel, 4);
}

TEST_CASE("interleaved pipeline stages (virtual pipeline 2) equal the single-process run", "[train][distributed][mpi]") {
  // 4 layers in PP 2 x V 2 chunks of one layer. PP 2 x DP 1: 4 micro-batches per step (warm-up,
  // steady state, cool-down); PP 2 x DP 2 x EP 2 and with ZeRO-1: 2 micro-batches (= PP: all
  // forwards first).
  check_equals_single_process({{2, 1, false, 2, 2}, {4, 2, false, 2, 2}, {4, 1, true, 2, 2}}, kPipelineModel, 4);
}

TEST_CASE("tensor-parallel training (TP 2) equals the single-process run", "[train][distributed][mpi][tp]") {
  // Heads, the shared expert's and every routed expert's width split in two; TP 2 alone, with
  // DP 2 x EP 2 (the all-to-all between TP slices), and with ZeRO-1 over DP 2.
  check_equals_single_process({{2, 1, false, 1, 1, 2}, {4, 2, false, 1, 1, 2}, {4, 1, true, 1, 1, 2}});
}

TEST_CASE("tensor parallel with dense layers, and with pipeline stages, equals the single-process run",
          "[train][distributed][mpi][tp]") {
  // Layer 1 a dense SwiGLU FFN (split by width); then TP 2 x PP 2 (with interleaving, too).
  // One MoE layer of the two: the host-sync count has one dispatcher read per micro-batch.
  check_equals_single_process({{2, 1, false, 1, 1, 2}},
                              " --set model.moe_layer_freq=2 --set model.moe_router_load_balancing_type=aux_loss", 1);
  check_equals_single_process({{4, 1, false, 2, 1, 2}, {4, 1, false, 2, 2, 2}}, kPipelineModel, 4);
}

TEST_CASE("sequence parallelism (TP 2) equals the single-process run", "[train][distributed][mpi][tp][sp]") {
  // Each TP rank keeps 16 of the 32 positions of both samples of a micro-batch outside the split
  // blocks: alone, with DP 2 x EP 2, with ZeRO-1; then with a capacity factor (which slots drop
  // depends on every token's place in the gathered sequence).
  check_equals_single_process({{2, 1, false, 1, 1, 2, true}, {4, 2, false, 1, 1, 2, true}, {4, 1, true, 1, 1, 2, true}});
  check_equals_single_process({{2, 1, false, 1, 1, 2, true}}, " --set model.moe_expert_capacity_factor=0.8");
}

TEST_CASE("sequence parallelism with dense layers, a per-sequence aux loss and pipeline stages equals the single-process run",
          "[train][distributed][mpi][tp][sp]") {
  check_equals_single_process({{2, 1, false, 1, 1, 2, true}},
                              " --set model.moe_layer_freq=2 --set model.moe_router_load_balancing_type=seq_aux_loss", 1);
  check_equals_single_process({{4, 1, false, 2, 1, 2, true}, {4, 1, false, 2, 2, 2, true}}, kPipelineModel, 4);
}

TEST_CASE("global_aux_loss on DP, EP and PP ranks equals one process holding their micro-batches together",
          "[train][distributed][mpi][balance]") {
  // The loads are the global batch's, summed over the DP ranks: each rank's micro-batch of 2
  // samples is half of one process's micro-batch of 4. A coefficient large enough that a gradient
  // scaled by 1/DP (Megatron-LM #3672) moves the gradient norm far beyond the tolerance.
  const std::string global = " --set model.moe_router_load_balancing_type=global_aux_loss --set model.moe_aux_loss_coeff=0.5";
  check_equals_single_process({{2, 1, false}, {2, 2, false}}, global, 2, " --set training.micro_batch_size=4");
  check_equals_single_process({{4, 2, false, 2}, {4, 2, false, 2, 2}}, global + " --set model.num_layers=4", 4,
                              " --set training.micro_batch_size=4");
}

TEST_CASE("communication overlapped with compute (parallel.overlap_comm) equals the blocking path bit for bit",
          "[train][distributed][mpi][overlap]") {
  // Buckets of 5,000 elements: the backward starts many (the fixture has ~200K parameters). DP 2,
  // DP 2 with EP 2 (experts over EDP; the all-to-all beside the shared expert), PP 2 x DP 2 with
  // full recomputation (asynchronous pipeline sends), ZeRO-1 on DP 2 and on PP 2 x DP 2 x EP 2;
  // 4, 4, 2, 4 and 2 micro-batches per rank, so the hooks act only on the last; then DP 2 x EP 2,
  // ZeRO-1 on DP 2 and PP 2 x DP 2 with full recomputation (fused additions inside the
  // recomputation's own backward) in bf16; then interleaved PP 2 x V 2 x DP 2 with ZeRO-1.
  TempDir dir;
  const auto config = write_config(dir);
  const std::string common = " --set training.train_iters=3 --set training.eval_iters=0 --set parallel.ddp_bucket_size=5000";
  auto run = [&](const std::string& name, int ranks, const std::string& extra) {
    const auto r = run_command(kMpirun + fmt::format(" -np {} ", ranks) + kBin + " train " + config + common + extra +
                               " --set checkpoint.save=" + (dir.path() / name).string() + " --set logging.run_dir=" +
                               (dir.path() / name).string());
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    return read_metrics(dir.path() / name / "metrics.jsonl");
  };
  const std::vector<std::pair<int, std::string>> layouts{
      {2, ""},
      {2, " --set parallel.expert_model_parallel_size=2"},
      {4, kPipelineModel + " --set parallel.pipeline_model_parallel_size=2 --set training.recompute_granularity=full"},
      // ZeRO-1: reduce-scatters during the backward, all-gathers during the update.
      {2, " --set parallel.use_distributed_optimizer=true"},
      {4, kPipelineModel + " --set parallel.pipeline_model_parallel_size=2 --set parallel.expert_model_parallel_size=2"
              " --set parallel.use_distributed_optimizer=true"},
      // bf16: the fused weight gradients (kernels/wgrad_accumulation.h) add into main_grad and mark
      // their buckets ready themselves, the other parameters through the hooks.
      {2, " --set training.bf16=true --set parallel.expert_model_parallel_size=2"},
      {2, " --set training.bf16=true --set parallel.use_distributed_optimizer=true"},
      {4, kPipelineModel + " --set parallel.pipeline_model_parallel_size=2 --set training.recompute_granularity=full"
              " --set training.bf16=true"},
      // Interleaved stages: each chunk's parameters become final in that chunk's last backward
      // (4 micro-batches per rank: the chunks' last backwards are apart).
      {4, kPipelineModel + " --set parallel.pipeline_model_parallel_size=2 --set parallel.virtual_pipeline_model_parallel_size=2"
              " --set training.micro_batch_size=1 --set parallel.use_distributed_optimizer=true"}};
  for (size_t l = 0; l < layouts.size(); ++l) {
    const auto& [ranks, extra] = layouts[l];
    INFO("layout " << ranks << " ranks" << extra);
    const auto on = run(fmt::format("on{}", l), ranks, extra + " --set parallel.overlap_comm=true");
    const auto off = run(fmt::format("off{}", l), ranks, extra + "");
    REQUIRE(on.size() == 3);
    REQUIRE(off.size() == 3);
    for (size_t i = 0; i < 3; ++i) {
      CHECK(on[i]["lm_loss"] == off[i]["lm_loss"]);
      CHECK(on[i]["grad_norm"] == off[i]["grad_norm"]);
      CHECK(on[i]["time_comm_s"].get<double>() > 0);
      // A waiter stops its clock when it wakes, after the communication thread has stopped the
      // in-flight clock: on an oversubscribed machine (4 ranks and their communication threads on 2
      // cores) each wake-up can take a scheduling slice, counted as exposed but not in flight.
      CHECK(on[i]["time_comm_exposed_s"].get<double>() <= on[i]["time_comm_s"].get<double>() * 1.05 + 0.01);
      CHECK(on[i]["rank_times"]["comm_exposed_s"].size() == static_cast<size_t>(ranks));
    }
    const SafetensorsCheckpoint a((dir.path() / fmt::format("on{}", l) / "iter_0000003").string());
    const SafetensorsCheckpoint b((dir.path() / fmt::format("off{}", l) / "iter_0000003").string());
    REQUIRE(a.names() == b.names());
    for (const auto& name : a.names()) {
      INFO(name);
      CHECK(torch::equal(a.tensor(name, torch::kFloat32), b.tensor(name, torch::kFloat32)));
    }
  }
}

TEST_CASE("checkpoints move between layouts: EP=2 / PP=2 with ZeRO-1 resume on one process and back", "[train][distributed][mpi]") {
  // Training 3 iterations in one go equals training 2 under one layout and resuming the third under
  // another: the saved state (experts gathered, optimizer shards gathered) is layout-independent.
  TempDir dir;
  const auto config = write_config(dir);
  const std::string common = " --set training.eval_iters=0 --set training.lr_decay_iters=30";
  auto train = [&](const std::string& launcher, const std::string& name, int iters, const std::string& extra) {
    const auto r = run_command(launcher + " train " + config + common + extra +
                               fmt::format(" --set training.train_iters={}", iters) + " --set checkpoint.save=" +
                               (dir.path() / name).string() + " --set logging.run_dir=" + (dir.path() / name).string());
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    return read_metrics(dir.path() / name / "metrics.jsonl");
  };
  const std::string ep2 = " --set parallel.expert_model_parallel_size=2 --set parallel.use_distributed_optimizer=true";
  const std::string mpi2 = kMpirun + " -np 2 " + kBin;
  const auto whole = train(kBin, "whole", 3, "");
  train(mpi2, "to_single", 2, ep2);
  const auto resumed_single = train(kBin, "to_single", 3, "");
  train(kBin, "to_ep", 2, "");
  const auto resumed_ep = train(mpi2, "to_ep", 3, ep2);
  for (const auto* resumed : {&resumed_single, &resumed_ep}) {
    REQUIRE(resumed->size() == 3);
    for (const char* key : {"lm_loss", "grad_norm"}) {
      INFO(key);
      CHECK(relative((*resumed)[2][key].get<double>(), whole[2][key].get<double>()) < 1e-5);
    }
  }
  // And across pipeline layouts: PP=2 x DP=2 with EP=2 and ZeRO-1 saves, one process resumes.
  const std::string pp = kPipelineModel;
  const auto whole_pp = train(kBin, "whole_pp", 3, pp);
  train(kMpirun + " -np 4 " + kBin, "from_pp", 2,
        pp + " --set parallel.pipeline_model_parallel_size=2" + ep2);
  const auto resumed_pp = train(kBin, "from_pp", 3, pp);
  REQUIRE(resumed_pp.size() == 3);
  CHECK(relative(resumed_pp[2]["lm_loss"].get<double>(), whole_pp[2]["lm_loss"].get<double>()) < 1e-5);
  CHECK(relative(resumed_pp[2]["grad_norm"].get<double>(), whole_pp[2]["grad_norm"].get<double>()) < 1e-5);
}

TEST_CASE("checkpoints move between tensor-parallel layouts: TP 2 x EP 2 resumes on one process and back",
          "[train][distributed][mpi][tp]") {
  // The whole format joins each tensor-parallel weight (and its optimizer state) from its parts:
  // training 2 iterations under TP 2 x DP 2 x EP 2 and the third on one process equals 3 in one go,
  // and the other way round.
  TempDir dir;
  const auto config = write_config(dir);
  const std::string common = " --set training.eval_iters=0 --set training.lr_decay_iters=30";
  auto train = [&](const std::string& launcher, const std::string& name, int iters, const std::string& extra) {
    const auto r = run_command(launcher + " train " + config + common + extra +
                               fmt::format(" --set training.train_iters={}", iters) + " --set checkpoint.save=" +
                               (dir.path() / name).string() + " --set logging.run_dir=" + (dir.path() / name).string());
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    return read_metrics(dir.path() / name / "metrics.jsonl");
  };
  const std::string tp2 = " --set parallel.tensor_model_parallel_size=2 --set parallel.expert_model_parallel_size=2"
                          " --set parallel.use_distributed_optimizer=true";
  const std::string mpi4 = kMpirun + " -np 4 " + kBin;
  const auto whole = train(kBin, "whole", 3, "");
  train(mpi4, "to_single", 2, tp2);
  const auto resumed_single = train(kBin, "to_single", 3, "");
  train(kBin, "to_tp", 2, "");
  const auto resumed_tp = train(mpi4, "to_tp", 3, tp2);
  for (const auto* resumed : {&resumed_single, &resumed_tp}) {
    REQUIRE(resumed->size() == 3);
    for (const char* key : {"lm_loss", "grad_norm"}) {
      INFO(key);
      CHECK(relative((*resumed)[2][key].get<double>(), whole[2][key].get<double>()) < 1e-5);
    }
  }
}

TEST_CASE("no rank holds the whole model: PP 2 x EP 2 trains within a per-process memory budget the whole model exceeds",
          "[train][distributed][mpi][memory]") {
  TempDir dir;
  write_text_dataset((dir.path() / "text").string(), 200);
  // 4 MoE layers of 32 experts of width 4096: 1.6 GB of fp32 weights in all, 0.4 GB per rank of
  // PP 2 x EP 2. The experts are frozen so that each rank's share is its weights alone.
  const auto config = dir.file("big.yaml", fmt::format(R"(
model:
  num_layers: 4
  hidden_size: 256
  num_attention_heads: 4
  vocab_size: 256
  untie_embeddings_and_output_weights: true
  num_experts: 32
  moe_ffn_hidden_size: 4096
  moe_router_topk: 2
  moe_aux_loss_coeff: 0.01
training:
  seq_length: 16
  micro_batch_size: 1
  global_batch_size: 2
  train_iters: 1
  lr: 1.0e-4
  frozen: ["*.experts.*"]
  eval_iters: 0
data:
  data_path: [{}/text]
  split: "98,2,0"
logging:
  run_dir: {}/run
hardware:
  peak_tflops: 1.0
  num_threads: 1
)",
                                                          dir.path().string(), dir.path().string()));
  const int64_t whole_bytes = 4 * count_parameters(load_config(config).config.model).total;
  REQUIRE(whole_bytes > 1'500'000'000);
  // Private writable memory per process (RLIMIT_DATA counts anonymous mappings, so every
  // allocation): less than the whole model, more than a rank's share with LibTorch's own and the
  // communication threads' (a stack and a malloc arena each: about 0.1 GB of address space).
  const int64_t budget = 1'200'000'000;
  const std::string limit = fmt::format("prlimit --data={}: ", budget);
  const auto one = run_command(limit + kBin + " train " + config);
  INFO(one.output);
  CHECK(one.exit_code != 0);  // the whole model does not fit
  const auto four = run_command(kMpirun + " -np 4 " + limit + kBin + " train " + config +
                                " --set parallel.pipeline_model_parallel_size=2 --set parallel.expert_model_parallel_size=2");
  INFO(four.output);
  REQUIRE(four.exit_code == 0);
  const auto m = read_metrics(dir.path() / "run" / "metrics.jsonl");
  REQUIRE(m.size() == 1);
  const auto peaks = m[0]["rank_times"]["peak_memory_bytes"].get<std::vector<double>>();
  REQUIRE(peaks.size() == 4);
  for (size_t r = 0; r < peaks.size(); ++r) {
    INFO("rank " << r << " peak " << peaks[r] / 1e9 << " GB, whole model " << static_cast<double>(whole_bytes) / 1e9 << " GB");
    CHECK(peaks[r] < static_cast<double>(budget));
  }
  std::cout << fmt::format("[memory] whole model {:.2f} GB fp32; per-rank peak resident memory of PP 2 x EP 2: {:.2f} GB "
                           "(max over ranks)\n",
                           static_cast<double>(whole_bytes) / 1e9, *std::max_element(peaks.begin(), peaks.end()) / 1e9);
}

TEST_CASE("a rank killed during data-parallel training ends the job", "[train][distributed][mpi][slow]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto run_dir = dir.path() / "run";
  const auto pid_file = dir.path() / "pid";
  run_command("(" + kMpirun + " -np 2 " + kBin + " train " + config + " --set training.train_iters=100000 " +
              "--set training.lr_warmup_iters=0 --set parallel.distributed_timeout_minutes=0.1 --set logging.run_dir=" +
              run_dir.string() + " > " + (dir.path() / "log").string() + " 2>&1; echo $? > " +
              (dir.path() / "exit").string() + ") > /dev/null 2>&1 & echo $! > " + pid_file.string());
  // Once training runs, kill one rank: the newest process of this run (the ranks start after mpirun).
  // `[.]` keeps the pattern from matching the shell that runs pkill.
  const std::string pattern = "'logging[.]run_dir=" + run_dir.string() + "'";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!fs::exists(run_dir / "metrics.jsonl") || fs::file_size(run_dir / "metrics.jsonl") == 0) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const auto t0 = std::chrono::steady_clock::now();
  REQUIRE(run_command("pkill -9 -n -f " + pattern).exit_code == 0);
  while (!fs::exists(dir.path() / "exit") && std::chrono::steady_clock::now() < t0 + std::chrono::seconds(60)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  INFO(slurp((dir.path() / "log").string()));
  REQUIRE(fs::exists(dir.path() / "exit"));
  CHECK(std::stoi(slurp((dir.path() / "exit").string())) != 0);
  CHECK(seconds < 30);
  run_command("pkill -9 -f " + pattern);
}

TEST_CASE("the Qwen1.5-MoE-A2.7B CPU twin trains under mpirun -np 4 (PP 2 x DP 2, EP 2, ZeRO-1) as on one process",
          "[train][distributed][mpi]") {
  // configs/qwen1.5-moe-a2.7b-cpu.yaml on the offline corpus, 9 iterations. Its router concentrates
  // early: at iteration 8 one EP rank's experts receive no token in some layer, the case where the
  // all-to-alls' backward must still run on both ranks.
  TempDir dir;
  REQUIRE(run_command("bash " + source_dir() + "/launch/corpus.sh " + (dir.path() / "corpus").string())
              .exit_code == 0);
  const std::string config = source_dir() + "/configs/qwen1.5-moe-a2.7b-cpu.yaml";
  auto train = [&](const std::string& launcher, const std::string& name, const std::string& extra) {
    const auto r = run_command(launcher + " train " + config + " --set training.train_iters=9 --set training.eval_interval=9" +
                               " --set training.eval_iters=1 --set data.data_path=[" +
                               (dir.path() / "corpus_text_document").string() + "] --set checkpoint.save=" +
                               (dir.path() / name / "ckpt").string() + " --set logging.run_dir=" +
                               (dir.path() / name).string() + extra);
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    return r.output;
  };
  const auto out = train(kMpirun + " -np 4 " + kBin, "twin", "");
  CHECK_THAT(out, Contains("world 4 = PP 2 x DP 2 (EP 2") && Contains("MFU"));
  train(kBin, "single",
        " --set parallel.world_size=1 --set parallel.pipeline_model_parallel_size=1 --set "
        "parallel.expert_model_parallel_size=1");
  const auto twin = read_metrics(dir.path() / "twin" / "metrics.jsonl");
  const auto single = read_metrics(dir.path() / "single" / "metrics.jsonl");
  REQUIRE(twin.size() == 9);
  REQUIRE(single.size() == 9);
  for (size_t i = 0; i < 9; ++i) {
    INFO("iteration " << i + 1);
    CHECK(relative(twin[i]["lm_loss"].get<double>(), single[i]["lm_loss"].get<double>()) < 1e-4);
    CHECK(relative(twin[i]["grad_norm"].get<double>(), single[i]["grad_norm"].get<double>()) < 1e-4);
    CHECK(twin[i]["ep_tokens_received"].size() == 4);
  }
  CHECK(twin[8]["lm_loss"].get<double>() < twin[0]["lm_loss"].get<double>());
  CHECK(relative(twin[8]["valid_lm_loss"].get<double>(), single[8]["valid_lm_loss"].get<double>()) < 1e-4);
  // The twin inherits the mission's sharded saves: one part per (stage, EP rank) and the manifest.
  const auto saved = dir.path() / "twin" / "ckpt" / "iter_0000009";
  CHECK(fs::exists(saved / "shards.json"));
  for (const char* shard : {"mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_00_001_000", "mp_rank_00_001_001"}) {
    CHECK(fs::exists(saved / shard / "model.safetensors"));
  }
}

TEST_CASE("the ranks that wait for a slow save wait for it with progress, bounded by checkpoint.save_timeout_minutes",
          "[train][distributed][mpi][checkpoint]") {
  // Rank 0's save stalls 8 s right after its rename (a slow file system), beyond the 3 s distributed
  // timeout: the other rank aborted the job with "a peer rank is hung or has died".
  TempDir dir;
  const auto config = write_config(dir);
  const std::string run = kMpirun + " -np 2 env MOEFORGE_FAULT_SLOW_AFTER_RENAME=iter_0000002:8 " + kBin + " train " +
                          config + " --set training.train_iters=3 --set checkpoint.save_interval=2 " +
                          "--set parallel.distributed_timeout_minutes=0.05 --set checkpoint.save=";
  const auto slow = run_command(run + (dir.path() / "save").string());
  INFO(slow.output);
  CHECK(slow.exit_code == 0);
  CHECK_THAT(slow.output, Contains("saving the checkpoint of iteration 2: 5 s so far"));
  CHECK(fs::exists(dir.path() / "save" / "iter_0000002"));
  CHECK(slurp((dir.path() / "save" / "latest_checkpointed_iteration.txt").string()) == "3\n");
  // The save's own bound still ends a save that never finishes, naming it.
  const auto bounded = run_command(run + (dir.path() / "save2").string() + " --set checkpoint.save_timeout_minutes=0.05");
  INFO(bounded.output);
  CHECK(bounded.exit_code != 0);
  CHECK_THAT(bounded.output, Contains("the wait for the checkpoint's writers on group world (world ranks [0, 1]) did not "
                                      "complete within 3.0 s (checkpoint.save_timeout_minutes)"));
}
