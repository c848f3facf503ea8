// Sharded checkpoints (checkpoint.format: sharded) and `moeforge convert`: a PP=2 x DP=2 (EP=2,
// ZeRO-1) run writes one shard per stage and EP rank; it resumes on the same layout, and after
// conversion on another layout, or resharded on load on fewer ranks, each time continuing exactly
// as the uninterrupted run; the conversion to a whole checkpoint gives bit for bit the
// checkpoint the same run saves whole; a damaged shard is refused. Also `train --dry-run`.
#include "core/files/safetensors.h"
#include "test_util.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

const std::string kCommon = kPipelineModel + " --set training.eval_iters=0 --set training.lr_decay_iters=30";
const std::string kPP2EP2 = " --set parallel.pipeline_model_parallel_size=2 --set parallel.expert_model_parallel_size=2 "
                            "--set parallel.use_distributed_optimizer=true";

struct Runner {
  TempDir dir;
  std::string config = write_config(dir);

  std::vector<nlohmann::json> train(const std::string& launcher, const std::string& name, int iters,
                                    const std::string& extra, int expect_exit = 0, std::string* output = nullptr) {
    const auto r = run_command(launcher + " train " + config + kCommon + extra +
                               fmt::format(" --set training.train_iters={}", iters) + " --set checkpoint.save=" +
                               (dir.path() / name).string() + " --set logging.run_dir=" + (dir.path() / name).string());
    INFO(r.output);
    REQUIRE(r.exit_code == expect_exit);
    if (output) *output = r.output;
    return expect_exit == 0 ? read_metrics(dir.path() / name / "metrics.jsonl") : std::vector<nlohmann::json>{};
  }
  CommandResult convert(const std::string& from, const std::string& to, const std::string& args) {
    return run_command(kBin + " convert " + from + " " + (dir.path() / to).string() + " " + args);
  }
  fs::path path(const std::string& p) const { return dir.path() / p; }
};

void check_continues(const std::vector<nlohmann::json>& resumed, const std::vector<nlohmann::json>& whole) {
  // A converted checkpoint's new run directory starts its metrics at the resumed iteration.
  REQUIRE(!resumed.empty());
  REQUIRE(resumed.back()["iteration"] == 3);
  for (const char* key : {"lm_loss", "grad_norm"}) {
    INFO(key << ": " << resumed.back()[key] << " vs " << whole[2][key]);
    CHECK(relative(resumed.back()[key].get<double>(), whole[2][key].get<double>()) < 1e-5);
  }
}

// Every tensor of two safetensors files equal, bit for bit.
void check_identical(const std::string& a_path, const std::string& b_path) {
  INFO(a_path << " vs " << b_path);
  const SafetensorsCheckpoint a(a_path), b(b_path);
  auto sorted = [](std::vector<std::string> v) {
    std::sort(v.begin(), v.end());
    return v;
  };
  REQUIRE(sorted(a.names()) == sorted(b.names()));
  for (const auto& name : a.names()) {
    INFO(name);
    CHECK(torch::equal(a.tensor(name), b.tensor(name)));
  }
}

}  // namespace

TEST_CASE("sharded checkpoints resume on their layout and, after moeforge convert, on others", "[train][distributed][mpi]") {
  Runner r;
  const std::string mpi4 = kMpirun + " -np 4 " + kBin, mpi2 = kMpirun + " -np 2 " + kBin;
  const auto whole = r.train(kBin, "single", 3, "");
  const auto first = r.train(mpi4, "sharded", 2, kPP2EP2 + " --set checkpoint.format=sharded");
  // Every rank's time breakdown is in the metrics.
  REQUIRE(first[0]["rank_times"]["step_s"].size() == 4);
  REQUIRE(first[0]["rank_times"]["pipeline_wait_s"].size() == 4);

  // One directory per (stage, EP rank); dense tensors only in EP rank 0's, experts split.
  const fs::path it2 = r.path("sharded/iter_0000002");
  REQUIRE(fs::exists(it2 / "shards.json"));
  CHECK_FALSE(fs::exists(it2 / "model.safetensors"));
  for (const char* shard : {"mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_00_001_000", "mp_rank_00_001_001"}) {
    INFO(shard);
    REQUIRE(fs::exists(it2 / shard / "model.safetensors"));
    REQUIRE(fs::exists(it2 / shard / "optimizer.safetensors"));
  }
  {
    const SafetensorsFile stage0_ep0((it2 / "mp_rank_00_000_000" / "model.safetensors").string());
    const SafetensorsFile stage1_ep1((it2 / "mp_rank_00_001_001" / "model.safetensors").string());
    CHECK(stage0_ep0.contains("embed_tokens.weight"));
    CHECK_FALSE(stage0_ep0.contains("lm_head.weight"));
    CHECK_FALSE(stage0_ep0.contains("layers.2.mlp.experts.down_proj"));
    CHECK(stage0_ep0.info("layers.0.mlp.experts.down_proj").shape[0] == 4);  // 8 experts over EP 2
    for (const auto& name : stage1_ep1.names()) CHECK(name.find("mlp.experts.") != std::string::npos);
    CHECK(stage1_ep1.contains("layers.3.mlp.experts.gate_up_proj"));
  }

  {
    INFO("forward wants one Hugging Face checkpoint: it names the conversion");
    const auto f = run_command(kBin + " forward --checkpoint " + it2.string() + " --tokens " +
                               r.dir.file("tokens.json", "[1, 2, 3]"));
    CHECK(f.exit_code == 1);
    CHECK_THAT(f.output, Contains("moeforge convert"));
  }
  {
    INFO("one process reshards it on load, saying so, and continues as the uninterrupted run");
    std::string out;
    check_continues(r.train(kBin, "resharded_single", 3, " --load " + it2.string(), 0, &out), whole);
    CHECK_THAT(out, Contains("resharded " + it2.string() + " on load from PP 2 x EP 2") &&
                        Contains("to PP 1 x EP 1, layers per stage [4]"));
  }
  {
    INFO("the dry run says the checkpoint will be resharded");
    const auto dry = run_command(kBin + " train " + r.config + kCommon + " --dry-run --load " + it2.string());
    INFO(dry.output);
    CHECK(dry.exit_code == 0);
    CHECK_THAT(dry.output, Contains("sharded as another layout, resharded " + it2.string() + " on load"));
  }
  {
    INFO("a tensor-parallel run cannot read shards: the dry run names the conversion to whole");
    const auto tp = run_command(kBin + " train " + r.config + kCommon + " --dry-run --world-size 2 --set "
                                "parallel.tensor_model_parallel_size=2 --load " + it2.string());
    INFO(tp.output);
    CHECK(tp.exit_code == 1);
    CHECK_THAT(tp.output, Contains("tensor-parallel") && Contains("moeforge convert " + it2.string()) &&
                              Contains("--format whole"));
  }
  {
    INFO("converted to whole: bit for bit the whole checkpoint of the same run; one process resumes it");
    r.train(mpi4, "whole_ref", 2, kPP2EP2);
    const auto c = r.convert(it2.string(), "as_whole", "--format whole");
    INFO(c.output);
    REQUIRE(c.exit_code == 0);
    for (const char* file : {"model.safetensors", "optimizer.safetensors"}) {
      // The RNG is each writer's own; everything else must be identical.
      const fs::path a = r.path("as_whole/iter_0000002") / file, b = r.path("whole_ref/iter_0000002") / file;
      if (std::string(file) == "model.safetensors") {
        check_identical(a.string(), b.string());
      } else {
        const SafetensorsFile x(a.string()), y(b.string());
        for (const auto& name : y.names()) {
          if (name == "rng.cpu") continue;
          INFO(name);
          REQUIRE(x.contains(name));
          CHECK(torch::equal(x.tensor(name), y.tensor(name)));
        }
        CHECK(x.names().size() == y.names().size());
      }
    }
    check_continues(r.train(kBin, "as_whole", 3, ""), whole);
  }
  {
    INFO("converted to PP 1 x EP 2 shards: an EP=2 run resumes them");
    const auto c = r.convert(it2.string(), "as_ep2",
                             "--format sharded --set parallel.pipeline_model_parallel_size=1 --set "
                             "parallel.expert_model_parallel_size=2");
    INFO(c.output);
    REQUIRE(c.exit_code == 0);
    REQUIRE(fs::exists(r.path("as_ep2/iter_0000002/mp_rank_00_000_001/model.safetensors")));
    CHECK_FALSE(fs::exists(r.path("as_ep2/iter_0000002/mp_rank_00_001_000")));
    check_continues(r.train(mpi2, "as_ep2", 3,
                            " --set parallel.expert_model_parallel_size=2 --set checkpoint.format=sharded"),
                    whole);
  }
  {
    INFO("resumes on the same layout");
    check_continues(r.train(mpi4, "sharded", 3, kPP2EP2 + " --set checkpoint.format=sharded"), whole);
  }
  {
    INFO("a damaged shard is refused and nothing is written");
    const fs::path shard = it2 / "mp_rank_00_001_001" / "model.safetensors";
    NamedTensors tensors;
    {
      const SafetensorsFile f(shard.string());
      for (const auto& name : f.names()) {
        if (name != "layers.3.mlp.experts.down_proj") tensors.emplace_back(name, f.tensor(name));
      }
    }
    tensors.emplace_back("layers.3.mlp.unexpected", torch::zeros({2}));
    save_safetensors(shard.string(), tensors);
    const auto c = r.convert(it2.string(), "damaged", "--format whole");
    INFO(c.output);
    CHECK(c.exit_code == 1);
    CHECK_THAT(c.output, Contains("layers.3.mlp.experts.down_proj missing from") &&
                             Contains("layers.3.mlp.unexpected") && Contains("Nothing was converted"));
    CHECK_FALSE(fs::exists(r.path("damaged/latest_checkpointed_iteration.txt")));
  }
}

TEST_CASE("a sharded checkpoint of PP 2 x DP 2 x EP 2 resumes on 2 ranks at DP 2 x EP 1 as on its own layout",
          "[train][distributed][mpi]") {
  // Issue 37's resume on fewer nodes: saved at (PP 2, TP 1, DP 2, EP 2) on 4 ranks, resumed by
  // --load at (1, 1, 2, 1) on 2, both with ZeRO-1. The reference is the same checkpoint continued
  // on its own layout: losses per iteration, then the weights and the Adam state both save (whole).
  Runner r;
  const std::string mpi4 = kMpirun + " -np 4 " + kBin, mpi2 = kMpirun + " -np 2 " + kBin;
  r.train(mpi4, "saved", 2, kPP2EP2 + " --set checkpoint.format=sharded");
  const std::string load = " --load " + r.path("saved").string();
  const auto same = r.train(mpi4, "same", 4, kPP2EP2 + load);
  std::string out;
  const auto fewer = r.train(mpi2, "fewer", 4, " --set parallel.use_distributed_optimizer=true" + load, 0, &out);
  CHECK_THAT(out, Contains("on load from PP 2 x EP 2, layers per stage [2, 2] to PP 1 x EP 1, layers per stage [4]"));
  REQUIRE(same.size() == 2);
  REQUIRE(fewer.size() == 2);
  for (size_t i = 0; i < 2; ++i) {
    CHECK(fewer[i]["iteration"] == same[i]["iteration"]);
    for (const char* key : {"lm_loss", "grad_norm"}) {
      INFO(key << " at iteration " << same[i]["iteration"] << ": " << fewer[i][key] << " vs " << same[i][key]);
      CHECK(relative(fewer[i][key].get<double>(), same[i][key].get<double>()) < 1e-5);
    }
  }
  for (const char* file : {"model.safetensors", "optimizer.safetensors"}) {
    const SafetensorsFile a(r.path("fewer/iter_0000004").string() + "/" + file),
        b(r.path("same/iter_0000004").string() + "/" + file);
    CHECK(a.names().size() == b.names().size());
    for (const auto& name : b.names()) {
      if (name == "rng.cpu") continue;
      INFO(file << ": " << name);
      REQUIRE(a.contains(name));
      const auto x = a.tensor(name, torch::kFloat64), y = b.tensor(name, torch::kFloat64);
      REQUIRE(x.sizes() == y.sizes());
      // Two layouts sum gradients in different orders: equal to rounding, relative to the tensor's scale.
      const double scale = std::max(y.abs().max().item<double>(), 1e-12);
      CHECK((x - y).abs().max().item<double>() / scale < 1e-4);
    }
  }
  const auto state = [&](const char* run) {
    return nlohmann::json::parse(std::ifstream(r.path(run) / "iter_0000004" / "trainer_state.json"));
  };
  CHECK(state("fewer")["optimizer_steps"] == state("same")["optimizer_steps"]);
  CHECK(state("fewer")["consumed_train_samples"] == state("same")["consumed_train_samples"]);
}

TEST_CASE("moeforge convert refuses what it cannot convert", "[train][checkpoint]") {
  Runner r;
  r.train(kBin, "run", 1, "");
  SECTION("whole -> PP 2 x EP 4 shards -> whole is bit for bit the original") {
    const auto a = r.convert(r.path("run").string(), "shards",
                             "--format sharded --set parallel.pipeline_model_parallel_size=2 --set "
                             "parallel.expert_model_parallel_size=4");
    INFO(a.output);
    REQUIRE(a.exit_code == 0);
    CHECK(fs::exists(r.path("shards/iter_0000001/mp_rank_00_001_003/model.safetensors")));
    const auto b = r.convert(r.path("shards").string(), "back", "--format whole");
    INFO(b.output);
    REQUIRE(b.exit_code == 0);
    check_identical(r.path("back/iter_0000001/model.safetensors").string(),
                    r.path("run/iter_0000001/model.safetensors").string());
    check_identical(r.path("back/iter_0000001/optimizer.safetensors").string(),
                    r.path("run/iter_0000001/optimizer.safetensors").string());
  }
  SECTION("the save directory it reads from") {
    const auto c = run_command(kBin + " convert " + r.path("run").string() + " " + r.path("run").string());
    CHECK(c.exit_code == 1);
    CHECK_THAT(c.output, Contains("another directory"));
  }
  SECTION("experts that do not divide over the target EP") {
    const auto c = r.convert(r.path("run").string(), "ep3", "--format sharded --set parallel.expert_model_parallel_size=3");
    CHECK(c.exit_code == 1);
    CHECK_THAT(c.output, Contains("expert_model_parallel_size"));
    CHECK_FALSE(fs::exists(r.path("ep3/latest_checkpointed_iteration.txt")));
  }
  SECTION("a Hugging Face checkpoint (weights only)") {
    fs::remove(r.path("run/iter_0000001/trainer_state.json"));
    const auto hf = r.convert(r.path("run/iter_0000001").string(), "y", "");
    CHECK(hf.exit_code == 1);
    CHECK_THAT(hf.output, Contains("Hugging Face checkpoint"));
  }
}

TEST_CASE("train --dry-run shows every rank's share and the start-up checks, allocating nothing", "[train][cli]") {
  TempDir dir;
  const auto config = write_config(dir);
  const std::string base = kBin + " train " + config + kPipelineModel + " --dry-run --set logging.run_dir=" +
                           (dir.path() / "run").string() + " --set checkpoint.save=" + (dir.path() / "ckpt").string();
  const auto ok = run_command(base + " --world-size 8" + kPP2EP2 + " --set checkpoint.format=sharded");
  INFO(ok.output);
  REQUIRE(ok.exit_code == 0);
  CHECK_THAT(ok.output, Contains("world 8 = PP 2 x DP 4 (EP 2") && Contains("dry run passed"));
  // rank 7: stage 1, dp 3, ep 1, edp 1 -> experts 4-7, layers 2-3, writes no shard; rank 5 writes (1, 1).
  CHECK_THAT(ok.output, Contains("mp_rank_00_001_001") && Contains("4-7 of 8"));
  int rank_rows = 0;
  for (size_t at = 0; (at = ok.output.find(" of 8 ", at)) != std::string::npos; ++at) ++rank_rows;
  CHECK(rank_rows == 8);
  CHECK_FALSE(fs::exists(dir.path() / "run"));
  CHECK_FALSE(fs::exists(dir.path() / "ckpt"));

  const auto bad_layout = run_command(base + " --world-size 6 --set parallel.pipeline_model_parallel_size=4");
  CHECK(bad_layout.exit_code == 1);
  CHECK_THAT(bad_layout.output, Contains("6"));

  const auto missing = run_command(base + " --world-size 2 --set checkpoint.load=" + (dir.path() / "nowhere").string() +
                                   " --set data.data_path=[" + (dir.path() / "nodata").string() + "]");
  INFO(missing.output);
  CHECK(missing.exit_code == 1);
  CHECK_THAT(missing.output, Contains("PROBLEM  data") && Contains("PROBLEM  checkpoint.load") &&
                                 Contains("found 2 problem"));
}
