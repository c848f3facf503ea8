// `moeforge train` properties that are about itself: bitwise determinism, resume equal to an
// uninterrupted run, a kill during a save, freezing, and clear errors for bad input.
#include "core/files/safetensors.h"
#include "data/indexed_dataset.h"
#include "test_util.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <limits>
#include <thread>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;
using nlohmann::json;
namespace fs = std::filesystem;

TEST_CASE("train: the same config and seed give bitwise-identical metrics", "[train]") {
  TempDir dir;
  const auto config = write_config(dir);
  const std::string args = "--set training.train_iters=4 --set training.eval_interval=2";
  train(config, args + " --set logging.run_dir=" + (dir.path() / "a").string());
  train(config, args + " --set logging.run_dir=" + (dir.path() / "b").string());
  const auto a = read_metrics(dir.path() / "a" / "metrics.jsonl");
  const auto b = read_metrics(dir.path() / "b" / "metrics.jsonl");
  REQUIRE(a.size() == 4);
  REQUIRE(b.size() == 4);
  for (size_t i = 0; i < 4; ++i) CHECK(without_timing(a[i]).dump() == without_timing(b[i]).dump());
  for (const char* key : {"iteration", "consumed_samples", "lm_loss", "aux_loss", "lr", "grad_norm", "step_time_s",
                          "tokens_per_s_per_device", "tflops_per_device", "mfu", "mfu_6n", "peak_tflops"}) {
    CHECK(a[0].contains(key));
  }
  CHECK(a[1].contains("valid_lm_loss"));  // eval_interval 2
  CHECK(a[3]["consumed_samples"] == 32);
  CHECK(a[0]["peak_tflops"] == 1.0);
}

TEST_CASE("train: a resumed run continues bit for bit, checkpoints are complete and pruned", "[train][checkpoint]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto save = (dir.path() / "ckpt").string();
  const std::string args = "--set training.train_iters=6 --set training.eval_interval=2 --set checkpoint.save_interval=3";
  train(config, args + " --set checkpoint.save=" + save + " --set logging.run_dir=" + (dir.path() / "full").string());
  CHECK(slurp(save + "/latest_checkpointed_iteration.txt") == "6\n");
  for (const char* f : {"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.yaml"}) {
    CHECK(fs::exists(fs::path(save) / "iter_0000003" / f));
  }
  // The model inside a checkpoint is a Hugging Face checkpoint: `moeforge forward` runs it.
  const auto tokens = dir.file("tokens.json", "[116, 104, 101, 32, 101, 120, 112]");
  const auto fwd = run_command(kBin + " forward --checkpoint " + save + "/iter_0000006 --tokens " + tokens);
  CHECK(fwd.exit_code == 0);

  const auto out = train(config, args + " --load " + save + "/iter_0000003 --set logging.run_dir=" + (dir.path() / "resumed").string());
  CHECK_THAT(out, Contains("resumed from") && Contains("at iteration 3"));
  const auto full = read_metrics(dir.path() / "full" / "metrics.jsonl");
  const auto resumed = read_metrics(dir.path() / "resumed" / "metrics.jsonl");
  REQUIRE(full.size() == 6);
  REQUIRE(resumed.size() == 3);
  for (size_t i = 0; i < 3; ++i) CHECK(without_timing(resumed[i]).dump() == without_timing(full[i + 3]).dump());
  // Resuming into a run directory that already logged past the checkpoint keeps each iteration once.
  train(config, args + " --load " + save + "/iter_0000003 --set logging.run_dir=" + (dir.path() / "full").string());
  const auto rerun = read_metrics(dir.path() / "full" / "metrics.jsonl");
  REQUIRE(rerun.size() == 6);
  for (size_t i = 0; i < 6; ++i) CHECK(without_timing(rerun[i]).dump() == without_timing(full[i]).dump());

  // Automatic resume from checkpoint.save, and keep_latest_k.
  const auto again = train(config, "--set training.train_iters=8 --set checkpoint.save_interval=1 --set checkpoint.keep_latest_k=2 "
                                   "--set checkpoint.save=" + save + " --set logging.run_dir=" + (dir.path() / "more").string());
  CHECK_THAT(again, Contains("the latest in checkpoint.save") && Contains("at iteration 6"));
  std::vector<std::string> kept;
  for (const auto& e : fs::directory_iterator(save)) {
    if (e.is_directory()) kept.push_back(e.path().filename().string());
  }
  std::sort(kept.begin(), kept.end());
  CHECK(kept == std::vector<std::string>{"iter_0000007", "iter_0000008"});
}

TEST_CASE("train: a process killed during a save leaves the previous checkpoint loadable", "[train][checkpoint][slow]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto save = dir.path() / "ckpt";
  // A larger vocabulary makes each save take long enough to be caught in the middle.
  const std::string args = " --set model.vocab_size=65536 --set training.lr_decay_iters=100 --set checkpoint.save_interval=1 "
                           "--set checkpoint.save=" +
                           save.string() + " --set logging.run_dir=" + (dir.path() / "run").string();
  bool caught = false;
  for (int attempt = 0; attempt < 8 && !caught; ++attempt) {
    const auto pid_file = dir.path() / "pid";
    fs::remove(pid_file);
    run_command("(" + kBin + " train " + config + args + " --set training.train_iters=" + std::to_string(40 + attempt) +
                " > " + (dir.path() / "log").string() + " 2>&1 & echo $! > " + pid_file.string() + ")");
    const auto pid = std::stol(slurp(pid_file.string()));
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (std::chrono::steady_clock::now() < deadline && !caught) {
      if (fs::exists(save / "latest_checkpointed_iteration.txt") && fs::exists(save)) {
        for (const auto& e : fs::directory_iterator(save)) {
          if (e.path().filename().string().find(".tmp-") != std::string::npos) {
            ::kill(static_cast<pid_t>(pid), SIGKILL);
            caught = fs::exists(e.path());  // still mid-save after the kill
            break;
          }
        }
      }
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
    ::kill(static_cast<pid_t>(pid), SIGKILL);
    run_command("while kill -0 " + std::to_string(pid) + " 2>/dev/null; do sleep 0.05; done");
  }
  REQUIRE(caught);
  const auto latest = std::stol(slurp((save / "latest_checkpointed_iteration.txt").string()));
  CHECK(fs::exists(save / fmt::format("iter_{:07d}", latest) / "trainer_state.json"));
  // The run resumes from that checkpoint and saves again, cleaning up the torn save.
  const auto out = train(config, args + " --set training.train_iters=" + std::to_string(latest + 1));
  CHECK_THAT(out, Contains(fmt::format("at iteration {}", latest)));
  for (const auto& e : fs::directory_iterator(save)) CHECK(e.path().filename().string().find(".tmp-") == std::string::npos);
}

TEST_CASE("train: frozen parameters stay bit-identical and get no optimizer state", "[train][freeze][oracle]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto init = (dir.path() / "init").string();
  run_oracle("train_oracle.py", "init " + init + " 3");
  const auto save = (dir.path() / "ckpt").string();
  train(config, "--load " + init + " --set training.train_iters=3 --set checkpoint.save=" + save +
                    " --set 'training.trainable=[\"layers.*.mlp.gate.weight\"]'");
  const SafetensorsCheckpoint before(init), after(save + "/iter_0000003");
  int changed = 0;
  for (const auto& name : before.names()) {
    const bool router = name.find("mlp.gate.weight") != std::string::npos;
    const bool equal = torch::equal(before.tensor(name), after.tensor(name));
    INFO(name);
    CHECK(equal != router);
    changed += router && !equal;
  }
  CHECK(changed == 2);
  const SafetensorsFile opt(save + "/iter_0000003/optimizer.safetensors");
  CHECK(opt.names().size() == 2 * 2 + 1);  // exp_avg and exp_avg_sq of the two routers, and the RNG state
}

TEST_CASE("train: bf16 keeps fp32 master weights, trains close to fp32 and resumes bit for bit", "[train][bf16]") {
  TempDir dir;
  const auto config = write_config(dir);
  const std::string args = " --set training.train_iters=10 --set training.lr_warmup_iters=0 --set training.eval_interval=100";
  train(config, args + " --set logging.run_dir=" + (dir.path() / "fp32").string());
  const auto save = (dir.path() / "ckpt").string();
  train(config, args + " --set training.bf16=true --set checkpoint.save_interval=5 --set checkpoint.save=" + save +
                    " --set logging.run_dir=" + (dir.path() / "bf16").string());
  const auto fp32 = read_metrics(dir.path() / "fp32" / "metrics.jsonl");
  const auto bf16 = read_metrics(dir.path() / "bf16" / "metrics.jsonl");
  REQUIRE(bf16.size() == 10);
  for (size_t i = 0; i < 10; ++i) CHECK(bf16[i]["lm_loss"].get<double>() == Approx(fp32[i]["lm_loss"].get<double>()).epsilon(0.02));
  CHECK(bf16[9]["lm_loss"].get<double>() < 0.8 * bf16[0]["lm_loss"].get<double>());  // it trains
  // The fp32 master weights carry more than the bf16 weights the model runs with.
  const SafetensorsFile opt(save + "/iter_0000010/optimizer.safetensors");
  const SafetensorsCheckpoint model(save + "/iter_0000010");
  CHECK(opt.info("master.embed_tokens.weight").dtype == "F32");
  CHECK(model.info("model.embed_tokens.weight").dtype == "BF16");
  const auto master = opt.tensor("master.embed_tokens.weight");
  const auto weights = model.tensor("model.embed_tokens.weight").to(torch::kFloat32);
  CHECK(torch::equal(master.to(torch::kBFloat16).to(torch::kFloat32), weights));
  CHECK_FALSE(torch::equal(master, weights));
  // A bf16 run resumes exactly; a resume in the other precision is refused.
  train(config, args + " --set training.bf16=true --load " + save + "/iter_0000005 --set logging.run_dir=" +
                    (dir.path() / "resumed").string());
  const auto resumed = read_metrics(dir.path() / "resumed" / "metrics.jsonl");
  REQUIRE(resumed.size() == 5);
  for (size_t i = 0; i < 5; ++i) CHECK(without_timing(resumed[i]).dump() == without_timing(bf16[i + 5]).dump());
  const auto r = run_command(kBin + " train " + config + args + " --load " + save + "/iter_0000005");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("training.bf16 = true, this config says false"));
}

TEST_CASE("train: resuming from an earlier checkpoint re-saves atomically and prunes only older ones", "[train][checkpoint]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto save = (dir.path() / "ckpt").string();
  // lr_decay_iters fixed, so runs of different lengths share one schedule.
  const std::string args = " --set training.lr_decay_iters=6 --set training.eval_interval=100 --set checkpoint.save_interval=1"
                           " --set checkpoint.save=" + save;
  train(config, args + " --set training.train_iters=6 --set logging.run_dir=" + (dir.path() / "a").string());
  train(config, args + " --set training.train_iters=4 --set checkpoint.keep_latest_k=2 --load " + save +
                    "/iter_0000003 --set logging.run_dir=" + (dir.path() / "b").string());
  CHECK(slurp(save + "/latest_checkpointed_iteration.txt") == "4\n");
  std::vector<std::string> entries;
  for (const auto& e : fs::directory_iterator(save)) entries.push_back(e.path().filename().string());
  std::sort(entries.begin(), entries.end());
  // iter_4 replaced in place, 1 and 2 pruned, 5 and 6 (past the resumed point) left alone.
  CHECK(entries == std::vector<std::string>{"iter_0000003", "iter_0000004", "iter_0000005", "iter_0000006",
                                            "latest_checkpointed_iteration.txt"});
  const auto a = read_metrics(dir.path() / "a" / "metrics.jsonl");
  const auto b = read_metrics(dir.path() / "b" / "metrics.jsonl");
  REQUIRE(b.size() == 1);
  for (const char* key : {"iteration", "consumed_samples", "lm_loss", "aux_loss", "grad_norm", "lr"}) CHECK(b[0][key] == a[3][key]);
  // Re-running with weights-only --load while checkpoint.save holds a checkpoint resumes it.
  const auto init = (dir.path() / "init").string();
  run_oracle("train_oracle.py", "init " + init + " 3");
  const auto out = train(config, args + " --set training.train_iters=5 --load " + init + " --set logging.run_dir=" +
                                     (dir.path() / "c").string());
  CHECK_THAT(out, Contains("resuming it instead of starting again") && Contains("at iteration 4"));
}

TEST_CASE("train: unwritable output directories are refused before training", "[train][errors]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto file = dir.file("a-file", "x");
  auto r = run_command(kBin + " train " + config + " --set checkpoint.save=" + file + "/ckpt");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("checkpoint.save " + file + "/ckpt cannot be created"));
  CHECK_THAT(r.output, !Contains("iteration 1/"));
  r = run_command(kBin + " train " + config + " --set logging.run_dir=" + file + "/run");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("logging.run_dir"));
}

TEST_CASE("train: non-finite losses stop the run or are skipped and counted", "[train][errors]") {
  TempDir dir;
  const auto config = write_config(dir);
  // An absurd learning rate overflows the weights after the first update.
  const std::string args = " --set training.train_iters=4 --set training.lr=1e30 --set training.min_lr=0 "
                           "--set training.lr_warmup_iters=0 --set training.clip_grad=0";
  auto r = run_command(kBin + " train " + config + args);
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("error: iteration 2") && Contains("training.on_nonfinite: skip"));
  r = run_command(kBin + " train " + config + args + " --set training.on_nonfinite=skip");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  const auto m = read_metrics(dir.path() / "run" / "metrics.jsonl");
  REQUIRE(m.size() == 4);
  CHECK(m[3]["skipped_iterations"] == 3);
  CHECK(m[3]["skipped"] == true);
  CHECK(m[3]["lm_loss"].is_null());
}

TEST_CASE("train: weights that are not finite are never saved, and the tracker keeps the last good checkpoint",
          "[train][errors][checkpoint]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto save = (dir.path() / "ckpt").string();
  const std::string common =
      " --set checkpoint.save=" + save + " --set checkpoint.save_interval=1 --set training.lr_warmup_iters=0";
  train(config, " --set training.train_iters=1" + common);
  // One weight of the saved model made NaN (as an overflowing update leaves it), then resumed with
  // non-finite steps skipped: the weights stay NaN until the next save.
  const auto model_file = save + "/iter_0000001/model.safetensors";
  NamedTensors tensors;
  {
    const SafetensorsFile f(model_file);
    for (const auto& name : f.names()) tensors.emplace_back(name, f.tensor(name));
    tensors.front().second.view(-1)[0] = std::numeric_limits<float>::quiet_NaN();
    save_safetensors(model_file, tensors, f.metadata());
  }
  const auto r = run_command(kBin + " train " + config + " --set training.train_iters=2 --set training.on_nonfinite=skip" +
                             common + " --load " + save + "/iter_0000001");
  INFO(r.output);
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("iteration 2: the weights or optimizer state hold NaN or infinity") &&
                           Contains(tensors.front().first) && Contains("no checkpoint was written") &&
                           Contains("lower training.lr"));
  CHECK(slurp(save + "/latest_checkpointed_iteration.txt") == "1\n");
  CHECK_FALSE(fs::exists(fs::path(save) / "iter_0000002"));
}

TEST_CASE("train: a damaged trainer_state.json is refused, naming the field, and nothing is overwritten",
          "[train][errors][checkpoint]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto save = (dir.path() / "ckpt").string();
  const std::string common = " --set checkpoint.save=" + save + " --set checkpoint.save_interval=2";
  train(config, " --set training.train_iters=4" + common);
  const auto state_file = fs::path(save) / "iter_0000004" / "trainer_state.json";
  const auto good = slurp(state_file.string());
  constexpr auto kInt64Max = std::numeric_limits<int64_t>::max();
  constexpr auto kUint64Max = std::numeric_limits<uint64_t>::max();
  const std::vector<std::pair<json, std::string>> edits{
      {{{"iteration", -4}}, "\"iteration\" is -4, below 0"},
      {{{"iteration", 2}}, "\"iteration\" is 2, but the directory is iter_0000004 (iteration 4)"},
      {{{"skipped_iterations", 9}}, "\"skipped_iterations\" (9) exceeds \"iteration\" (4)"},
      {{{"consumed_train_samples", -1}}, "\"consumed_train_samples\" is -1, below 4"},
      {{{"optimizer_steps", 5}}, "\"optimizer_steps\" (5) exceeds \"iteration\" (4)"},
      // Counts no run reaches: the loader's sample arithmetic and the LR schedule would overflow.
      {{{"consumed_train_samples", kInt64Max}}, "\"consumed_train_samples\" is 9223372036854775807, above"},
      {{{"lr_num_steps", kInt64Max}}, "\"lr_num_steps\" is 9223372036854775807, above"},
      {{{"iteration", kUint64Max}}, "\"iteration\" is 18446744073709551615, above"},
      // Values of another type name the field (nlohmann's own message does not).
      {{{"lr_num_steps", "abc"}}, "\"lr_num_steps\" must be a whole number, got \"abc\""},
      {{{"consumed_valid_samples", 3.5}}, "\"consumed_valid_samples\" must be a whole number, got 3.5"},
      {{{"bf16", 1}}, "\"bf16\" must be true or false, got 1"},
      {json::parse(R"({"datasets": [{"prefix": "text", "idx_bytes": "12", "idx_hash": "00", "bin_bytes": 1}]})"),
       "\"datasets[0].idx_bytes\" must be a whole number, got \"12\""}};
  for (const auto& [edit, expected] : edits) {
    INFO(edit.dump());
    auto j = json::parse(good);
    j.update(edit);
    std::ofstream(state_file) << j.dump(2);
    // Through the tracker and through the directory itself.
    for (const std::string& load : {save, (fs::path(save) / "iter_0000004").string()}) {
      const auto r = run_command(kBin + " train " + config + " --set training.train_iters=6" + common + " --load " + load);
      CHECK(r.exit_code == 1);
      CHECK_THAT(r.output, Contains("trainer_state.json: the checkpoint's state is damaged") && Contains(expected));
    }
  }
  CHECK(slurp(save + "/latest_checkpointed_iteration.txt") == "4\n");
  for (const auto& entry : fs::directory_iterator(save)) {
    const auto name = entry.path().filename().string();
    CHECK((name == "iter_0000002" || name == "iter_0000004" || name == "latest_checkpointed_iteration.txt"));
  }
}

namespace {

// The documents of `prefix` rewritten under the same name: in reverse order (both files keep their
// sizes, the index's contents change) or with the first appended again (both files grow).
void rewrite_dataset(const std::string& prefix, bool append) {
  std::vector<std::vector<int64_t>> documents;
  {
    const data::IndexedDataset d(prefix);
    for (int64_t i = 0; i < d.num_sequences(); ++i) {
      std::vector<int64_t> ids(static_cast<size_t>(d.sequence_lengths()[static_cast<size_t>(i)]));
      d.read(i, 0, std::ssize(ids), ids.data());
      documents.push_back(std::move(ids));
    }
  }
  if (append) {
    documents.push_back(documents.front());
  } else {
    std::reverse(documents.begin(), documents.end());
  }
  data::IndexedDatasetBuilder b(prefix, data::TokenDType::uint16);
  for (const auto& ids : documents) b.add_document(ids);
  b.finalize();
}

}  // namespace

TEST_CASE("train: a dataset replaced since the checkpoint is refused, naming the file, unless allowed",
          "[train][errors][checkpoint]") {
  for (const std::string format : {"whole", "sharded"}) {
    DYNAMIC_SECTION(format) {
      TempDir dir;
      const auto config = write_config(dir);
      const auto prefix = (dir.path() / "text").string();
      const auto save = (dir.path() / "ckpt").string();
      const std::string common = " --set checkpoint.format=" + format + " --set checkpoint.save=" + save +
                                 " --set training.lr_decay_iters=10 --set training.eval_interval=100";
      train(config, " --set training.train_iters=2" + common);
      // The checkpoint records the dataset: its index's size and hash, its tokens' size.
      const auto state = json::parse(slurp(save + "/iter_0000002/trainer_state.json"));
      REQUIRE(state.contains("datasets"));
      REQUIRE(state["datasets"].size() == 1);
      const json recorded = state["datasets"][0];
      CHECK(recorded["prefix"] == prefix);
      CHECK(recorded["idx_bytes"] == fs::file_size(prefix + ".idx"));
      CHECK(recorded["bin_bytes"] == fs::file_size(prefix + ".bin"));
      CHECK(recorded["idx_hash"].get<std::string>().size() == 16);

      const std::string resume = kBin + " train " + config + " --set training.train_iters=3" + common;
      rewrite_dataset(prefix, /*append=*/false);
      auto r = run_command(resume);
      INFO(r.output);
      CHECK(r.exit_code == 1);
      CHECK_THAT(r.output, Contains(prefix + ".idx: its contents changed") && Contains(save + "/iter_0000002") &&
                               Contains("checkpoint.allow_dataset_change: true"));
      CHECK_THAT(r.output, !Contains(prefix + ".bin:"));  // the same tokens, reordered
      const auto dry = run_command(resume + " --dry-run");
      CHECK(dry.exit_code == 1);
      CHECK_THAT(dry.output, Contains("PROBLEM  checkpoint.load") && Contains(prefix + ".idx: its contents changed"));
      rewrite_dataset(prefix, /*append=*/true);
      r = run_command(resume);
      CHECK(r.exit_code == 1);
      CHECK_THAT(r.output, Contains(prefix + ".idx: its size changed from " + recorded["idx_bytes"].dump()) &&
                               Contains(prefix + ".bin: its size changed"));

      // Accepted when the config says so, with a warning; the next checkpoint records the dataset as it is now.
      const auto out = train(config, " --set training.train_iters=3 --set checkpoint.allow_dataset_change=true" + common);
      CHECK_THAT(out, Contains("checkpoint.allow_dataset_change") && Contains(prefix + ".idx: its size changed") &&
                          Contains("at iteration 2"));
      const auto state_file = save + "/iter_0000003/trainer_state.json";
      auto now = json::parse(slurp(state_file));
      CHECK(now["datasets"][0]["idx_bytes"] == fs::file_size(prefix + ".idx"));
      CHECK(now["datasets"][0]["idx_hash"] != recorded["idx_hash"]);
      // A checkpoint written before datasets were recorded resumes, with a warning.
      now.erase("datasets");
      std::ofstream(state_file) << now.dump(2);
      CHECK_THAT(train(config, " --set training.train_iters=4" + common), Contains("records no datasets"));
    }
  }
}

TEST_CASE("train: a checkpoint tensor whose header says integer where a float was saved is refused",
          "[train][errors][checkpoint]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto save = (dir.path() / "ckpt").string();
  const std::string common = " --set checkpoint.save=" + save + " --set checkpoint.save_interval=2";
  train(config, " --set training.train_iters=4" + common);
  for (const char* file : {"model.safetensors", "optimizer.safetensors"}) {
    INFO(file);
    const auto path = fs::path(save) / "iter_0000004" / file;
    const auto original = slurp(path.string());
    auto damaged = original;
    const auto at = damaged.find("\"F32\"");  // the first tensor's dtype, in the header
    REQUIRE(at != std::string::npos);
    damaged.replace(at, 5, "\"I32\"");
    std::ofstream(path, std::ios::binary) << damaged;
    const auto r = run_command(kBin + " train " + config + " --set training.train_iters=6" + common);
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output, Contains(path.string()) && Contains("is stored as I32"));
    std::ofstream(path, std::ios::binary) << original;
  }
  CHECK(slurp(save + "/latest_checkpointed_iteration.txt") == "4\n");
}

TEST_CASE("train: bad input gets a clear error", "[train][errors]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto init = (dir.path() / "init").string();
  run_oracle("train_oracle.py", "init " + init + " 3");
  auto r = run_command(kBin + " train " + config + " --load " + init + " --set model.hidden_size=32 --set model.ffn_hidden_size=64");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("model.hidden_size: checkpoint 64, config 32") && Contains("Fix the config"));
  r = run_command(kBin + " train " + config + " --load " + (dir.path() / "nowhere").string());
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("nowhere does not exist"));
  r = run_command(kBin + " train " + config + " --set 'training.frozen=[\"layers.*.mlp.gaet.weight\"]'");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("matches no parameter"));
  r = run_command(kBin + " train " + config + " --set parallel.pipeline_model_parallel_size=2");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("hf_pooled_aux_loss pools the router statistics") && Contains("use aux_loss"));
}
