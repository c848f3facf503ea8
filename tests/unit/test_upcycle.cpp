// `moeforge upcycle`: the invariants of docs/upcycling.md as exact tests on tiny dense models made
// by `transformers` (the upcycled checkpoints are loaded back by `transformers`, and the expert
// sums recomputed there from the raw tensors), router-only training and its no-op warning, and a
// short continual pretraining run from an upcycled model.
#include "core/files/safetensors.h"
#include "test_util.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <set>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

const std::vector<std::vector<int64_t>> kTokens = {{3, 14, 15, 92, 65, 35, 89, 79, 32, 38}, {2, 71, 82, 81, 82, 84, 59, 4, 5, 23}};

// The oracle's tiny dense models: hidden 32, FFN 64, 3 layers, 4 heads (2 KV), vocab 256.
struct Fixture {
  TempDir dir;
  std::string tokens = dir.file("tokens.json", json(kTokens).dump());

  std::string dense(const std::string& kind) {
    const auto path = (dir.path() / ("dense_" + kind)).string();
    if (!fs::exists(path)) run_oracle("hf_model_oracle.py", "save " + kind + " 3 " + path);
    return path;
  }
  // An experiment config: the tiny model as MoE (`moe` holds the MoE keys) plus training (with
  // `training_extra` lines) and data.
  std::string config(const std::string& name, const std::string& kind, const std::string& moe,
                     const std::string& training_extra = "") {
    if (!fs::exists(dir.path() / "text.idx")) write_text_dataset((dir.path() / "text").string(), 300);
    const bool llama = kind == "llama";
    return dir.file(name + ".yaml", fmt::format(R"(
model:
  num_layers: 3
  hidden_size: 32
  num_attention_heads: 4
  num_query_groups: 2
  vocab_size: 256
  rotary_base: 10000
  norm_epsilon: 1.0e-6
  add_qkv_bias: {}
  untie_embeddings_and_output_weights: {}
{}
training:
  seq_length: 16
  micro_batch_size: 2
  global_batch_size: 4
  train_iters: 2
  lr: 1.0e-3
  lr_warmup_iters: 0
  eval_iters: 0
{}data:
  data_path: [{}]
  split: "98,2,0"
)",
                                                llama ? "false" : "true", llama ? "true" : "false", moe,
                                                training_extra, (dir.path() / "text").string()));
  }
  CommandResult upcycle(const std::string& from, const std::string& to, const std::string& config,
                        const std::string& args) {
    return run_command(kBin + " upcycle --from " + from + " --to " + (dir.path() / to).string() + " --config " + config +
                       " " + args);
  }
  torch::Tensor hf_logits(const std::string& model_dir) {
    const auto out = (dir.path() / (fs::path(model_dir).filename().string() + "_logits.json")).string();
    run_oracle("hf_model_oracle.py", "logits " + model_dir + " " + tokens + " " + out);
    return torch::tensor(json::parse(std::ifstream(out))["logits"].get<std::vector<float>>());
  }
  torch::Tensor our_logits(const std::string& model_dir) {
    const auto out = (dir.path() / (fs::path(model_dir).filename().string() + "_ours.safetensors")).string();
    const auto r = run_command(kBin + " forward --checkpoint " + model_dir + " --tokens " + tokens + " --out " + out);
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    return SafetensorsFile(out).tensor("logits").reshape(-1);
  }
  json experts(const std::string& dense_dir, const std::string& moe_dir) {
    const auto out = (dir.path() / "experts.json").string();
    run_oracle("hf_model_oracle.py", "experts " + dense_dir + " " + moe_dir + " " + out);
    return json::parse(std::ifstream(out));
  }
  fs::path path(const std::string& p) const { return dir.path() / p; }
};

double rel(const torch::Tensor& a, const torch::Tensor& b) { return ((a - b).norm() / b.norm()).item<double>(); }

const std::string kMixtralCopy = R"(  model_type: mixtral
  num_experts: 4
  moe_ffn_hidden_size: 64
  moe_router_topk: 2
  moe_router_pre_softmax: true
  moe_router_norm_topk_prob: true)";

const std::string kQwenCopy = R"(  model_type: qwen2_moe
  num_experts: 4
  moe_ffn_hidden_size: 64
  moe_router_topk: 2
  moe_router_pre_softmax: true
  moe_aux_loss_coeff: 0.01)";

}  // namespace

TEST_CASE("upcycle copy: Llama -> Mixtral with renormalized routing equals the dense model in transformers",
          "[upcycle]") {
  Fixture f;
  const auto dense = f.dense("llama");
  const auto r = f.upcycle(dense, "copy", f.config("copy", "llama", kMixtralCopy), "--method copy --verify --seed 5");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK_THAT(r.output, Contains("MoE logits = dense logits") && Contains("every exact invariant of this method holds"));
  const auto moe_logits = f.hf_logits(f.path("copy").string());
  CHECK(rel(moe_logits, f.hf_logits(dense)) < 1e-5);  // transformers' Mixtral = transformers' Llama
  CHECK(rel(f.our_logits(f.path("copy").string()), moe_logits) < 1e-5);
  const auto manifest = json::parse(std::ifstream(f.path("copy/upcycle.json")));
  CHECK(manifest["method"] == "copy");
  CHECK(manifest["seed"] == 5);
  CHECK(manifest["router"]["init"] == "random");

  SECTION("warm boot copies another MoE's routers") {
    const auto w = f.upcycle(dense, "warm", f.config("warm", "llama", kMixtralCopy),
                             "--method copy --seed 9 --router-from " + f.path("copy").string());
    INFO(w.output);
    REQUIRE(w.exit_code == 0);
    const SafetensorsCheckpoint a(f.path("warm").string()), b(f.path("copy").string());
    for (int l = 0; l < 3; ++l) {
      const auto name = fmt::format("model.layers.{}.block_sparse_moe.gate.weight", l);
      CHECK(torch::equal(a.tensor(name), b.tensor(name)));
    }
    CHECK(json::parse(std::ifstream(f.path("warm/upcycle.json")))["router"]["init"] == "warm_boot");
  }
  SECTION("training only the routers of this model is a no-op, and train says so") {
    const auto cfg = f.config("routers", "llama", kMixtralCopy, "  trainable: [\"*.mlp.gate.weight\"]\n");
    const auto t = run_command(kBin + " train " + cfg + " --load " + f.path("copy").string() +
                               " --set logging.run_dir=" + f.path("routers_run").string());
    INFO(t.output);
    REQUIRE(t.exit_code == 0);
    CHECK_THAT(t.output, Contains("exactly zero gradient"));
  }
}

TEST_CASE("upcycle copy with Qwen routing (no renormalization): routed output = selected probability x dense FFN",
          "[upcycle]") {
  Fixture f;
  const auto r = f.upcycle(f.dense("qwen2"), "qwen_copy", f.config("qwen_copy", "qwen2", kQwenCopy), "--method copy --verify");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK_THAT(r.output, Contains("(sum of the k combine weights) x dense FFN: relative difference") &&
                           Contains("not renormalized") && Contains("every exact invariant of this method holds"));
  CHECK(rel(f.our_logits(f.path("qwen_copy").string()), f.hf_logits(f.path("qwen_copy").string())) < 1e-5);

  SECTION("router-only training changes only the routers") {
    const auto cfg = f.config("router_only", "qwen2", kQwenCopy, "  trainable: [\"*.mlp.gate.weight\"]\n");
    const auto t = run_command(kBin + " train " + cfg + " --load " + f.path("qwen_copy").string() +
                               " --set checkpoint.save=" + f.path("ro_ckpt").string() + " --set logging.run_dir=" +
                               f.path("ro_run").string());
    INFO(t.output);
    REQUIRE(t.exit_code == 0);
    CHECK_THAT(t.output, !Contains("zero gradient"));  // the aux loss moves the routers
    const SafetensorsCheckpoint before(f.path("qwen_copy").string()), after(f.path("ro_ckpt/iter_0000002").string());
    int changed = 0;
    for (const auto& name : before.names()) {
      INFO(name);
      const bool router = name.ends_with(".mlp.gate.weight");
      const bool same = torch::equal(before.tensor(name, torch::kFloat32), after.tensor(name, torch::kFloat32));
      CHECK(same != router);
      changed += !same;
    }
    CHECK(changed == 3);
  }
}

TEST_CASE("upcycle split: the experts partition the dense FFN (sum at unit weight = scale x dense)", "[upcycle]") {
  Fixture f;
  const auto dense = f.dense("qwen2");
  const std::string moe = R"(  model_type: qwen2_moe
  num_experts: 4
  moe_ffn_hidden_size: 16
  moe_router_topk: 2
  moe_router_pre_softmax: true)";
  const auto r = f.upcycle(dense, "split", f.config("split", "qwen2", moe),
                           "--method split --split-order random --scale 2 --verify --seed 11");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK_THAT(r.output, Contains("sum of all experts at unit weight = 2 x dense FFN"));
  const auto e = f.experts(dense, f.path("split").string());
  for (const auto& [layer, v] : e.items()) {
    INFO("layer " << layer);
    const auto sum = torch::tensor(v["sum"].get<std::vector<double>>());
    const auto dense_out = torch::tensor(v["dense"].get<std::vector<double>>());
    CHECK(rel(sum, 2 * dense_out) < 1e-5);
    int rows = 0;
    for (const auto& n : v["rows_from_dense"]) rows += n.get<int>();
    CHECK(rows == 64);  // every expert row is a dense neuron, 4 x 16 of them
  }
  // A wrong width is refused, naming the arithmetic, and nothing is written.
  const auto bad = f.upcycle(dense, "bad", f.config("bad", "qwen2", moe), "--method split --set model.num_experts=3");
  CHECK(bad.exit_code == 1);
  CHECK_THAT(bad.output, Contains("moe_ffn_hidden_size must be 64 / 3"));
  CHECK_FALSE(fs::exists(f.path("bad")));
}

TEST_CASE("upcycle granular (G = 2) with renormalized routing equals the dense model in transformers", "[upcycle]") {
  Fixture f;
  const auto dense = f.dense("llama");
  const std::string moe = R"(  model_type: mixtral
  num_experts: 4
  moe_ffn_hidden_size: 32
  moe_router_topk: 2
  moe_router_pre_softmax: true
  moe_router_norm_topk_prob: true)";
  const auto r = f.upcycle(dense, "granular", f.config("granular", "llama", moe), "--method granular --granularity 2 --verify");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK(rel(f.hf_logits(f.path("granular").string()), f.hf_logits(dense)) < 1e-5);
}

TEST_CASE("upcycle fine-grained with a shared expert (Qwen1.5-MoE recipe), then continual pretraining", "[upcycle]") {
  Fixture f;
  const auto dense = f.dense("qwen2");
  const std::string moe = R"(  model_type: qwen2_moe
  num_experts: 8
  moe_ffn_hidden_size: 24
  moe_router_topk: 4
  moe_router_pre_softmax: true
  moe_shared_expert_intermediate_size: 48
  moe_shared_expert_gate: true
  moe_aux_loss_coeff: 0.001)";
  const auto cfg = f.config("fine", "qwen2", moe);
  const std::string args = "--method fine_grained --reinit-fraction 0.5 --seed 7 --verify";
  const auto r = f.upcycle(dense, "fine", cfg, args);
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK_THAT(r.output, Contains("no exact invariant"));
  CHECK(rel(f.our_logits(f.path("fine").string()), f.hf_logits(f.path("fine").string())) < 1e-5);
  // 64 / 24 -> 3 slices of 21 neurons per shuffled copy, padded with 3 random rows; then half of
  // each expert's 24 neurons re-initialized: at most 12 of them are dense neurons.
  const auto e = f.experts(dense, f.path("fine").string());
  for (const auto& [layer, v] : e.items()) {
    for (const auto& n : v["rows_from_dense"]) {
      CHECK(n.get<int>() <= 12);
      CHECK(n.get<int>() >= 9);
    }
  }
  const auto manifest = json::parse(std::ifstream(f.path("fine/upcycle.json")));
  CHECK(manifest["reinit_fraction"] == 0.5);
  CHECK(manifest["random_rows_per_moe_layer"].size() == 3);
  // The seed makes it reproducible.
  REQUIRE(f.upcycle(dense, "fine_again", cfg, args).exit_code == 0);
  const SafetensorsCheckpoint a(f.path("fine").string()), b(f.path("fine_again").string());
  for (const auto& name : a.names()) CHECK(torch::equal(a.tensor(name), b.tensor(name)));

  // Continual pretraining from the upcycled model: the loss goes down.
  const auto t = run_command(kBin + " train " + cfg + " --load " + f.path("fine").string() +
                             " --set training.train_iters=12 --set training.lr=3.0e-3 --set logging.run_dir=" +
                             f.path("cpt").string());
  INFO(t.output);
  REQUIRE(t.exit_code == 0);
  const auto m = read_metrics(f.path("cpt/metrics.jsonl"));
  REQUIRE(m.size() == 12);
  CHECK(m[11]["lm_loss"].get<double>() < m[0]["lm_loss"].get<double>());
}

TEST_CASE("upcycle refuses a dense checkpoint that does not match the config, and an MoE source", "[upcycle]") {
  Fixture f;
  const auto dense = f.dense("llama");
  const auto r = f.upcycle(dense, "out", f.config("c", "llama", kMixtralCopy), "--set model.hidden_size=48");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("model.hidden_size: dense checkpoint 32, config 48"));
  CHECK_FALSE(fs::exists(f.path("out")));
  REQUIRE(f.upcycle(dense, "moe", f.config("c", "llama", kMixtralCopy), "").exit_code == 0);
  const auto again = f.upcycle(f.path("moe").string(), "out2", f.config("c", "llama", kMixtralCopy), "");
  CHECK(again.exit_code == 1);
  CHECK_THAT(again.output, Contains("already an MoE checkpoint"));
}

TEST_CASE("upcycle writes into a new or empty --to, and replaces a full one only with --overwrite, whole",
          "[upcycle][errors]") {
  Fixture f;
  const auto dense = f.dense("llama");
  const auto cfg = f.config("c", "llama", kMixtralCopy);
  auto names_in = [](const fs::path& dir) {
    std::set<std::string> names;
    for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
    return names;
  };
  fs::create_directories(f.path("empty"));
  REQUIRE(f.upcycle(dense, "empty", cfg, "").exit_code == 0);
  CHECK(fs::exists(f.path("empty/upcycle.json")));

  // A directory with something in it: refused, untouched.
  fs::create_directories(f.path("full"));
  std::ofstream(f.path("full/notes.txt")) << "mine";
  std::ofstream(f.path("full/model-00002-of-00002.safetensors")) << "an older, larger checkpoint";
  auto r = f.upcycle(dense, "full", cfg, "");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains(f.path("full").string()) && Contains("not empty") && Contains("--overwrite"));
  CHECK(names_in(f.path("full")) == std::set<std::string>{"notes.txt", "model-00002-of-00002.safetensors"});

  // --overwrite replaces it whole: none of the old files stay beside the new checkpoint, no
  // temporary stays beside it, and a dead process's leftover temporary is cleared.
  fs::create_directories(f.path("full.tmp-999999999"));
  r = f.upcycle(dense, "full", cfg, "--overwrite");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK(names_in(f.path("full")) == names_in(f.path("empty")));
  CHECK(slurp(f.path("full/model.safetensors").string()) == slurp(f.path("empty/model.safetensors").string()));
  for (const auto& name : names_in(f.path(""))) CHECK_FALSE(name.starts_with("full."));

  // Never over the dense checkpoint it reads, --overwrite or not.
  r = f.upcycle(dense, "dense_llama", cfg, "--overwrite");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("is the dense checkpoint --from reads"));
  CHECK(fs::exists(f.path("dense_llama/config.json")));
}
