// `moeforge train --dry-run` refuses every config the trainer refuses at start-up, with the same
// message (both call launch/train/startup_checks.h and ParallelLayout::create).
#include "core/config/config_loader.h"
#include "launch/train/startup_checks.h"
#include "parallel/layout/layout.h"
#include "parallel/layout/plan.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

// The lines of the trainer's error message ("error: [rank N: ]MESSAGE", up to the next log line,
// error or mpirun banner).
std::vector<std::string> trainer_error(const CommandResult& r) {
  static const std::regex error(R"(error: (rank \d+: )?)");
  std::smatch m;
  if (!std::regex_search(r.output, m, error)) return {};
  std::istringstream rest(m.suffix().str());
  std::vector<std::string> lines;
  for (std::string line; std::getline(rest, line);) {
    if (!lines.empty() && (line.starts_with("[") || line.starts_with("---") || line.starts_with("error:"))) break;
    if (!line.empty()) lines.push_back(line);
  }
  return lines;
}

// Runs the trainer (under mpirun when `ranks` > 1) and the dry run for the same world on the same
// config; both must refuse, the dry run with the trainer's message.
// With `plan`, `moeforge plan` (which sizes layouts) must refuse it the same way too.
void same_refusal(const std::string& config, const std::string& args, int ranks = 1, bool plan = false) {
  const std::string train = (ranks > 1 ? fmt::format("{} -np {} ", kMpirun, ranks) : std::string()) + kBin + " train " +
                            config + args;
  const auto trainer = run_command(train);
  INFO("trainer: " << trainer.output);
  REQUIRE(trainer.exit_code == 1);
  const auto message = trainer_error(trainer);
  REQUIRE_FALSE(message.empty());
  const auto dry = run_command(kBin + " train " + config + args + fmt::format(" --dry-run --world-size {}", ranks));
  INFO("dry run: " << dry.output);
  CHECK(dry.exit_code == 1);
  for (const auto& line : message) CHECK_THAT(dry.output, Contains(line));
  if (!plan) return;
  const auto planned = run_command(kBin + " plan " + config + args + fmt::format(" --world-size {}", ranks));
  INFO("plan: " << planned.output);
  CHECK(planned.exit_code == 1);
  for (const auto& line : message) CHECK_THAT(planned.output, Contains(line));
}

}  // namespace

TEST_CASE("the dry run refuses what the trainer refuses, with the same message", "[train][cli][errors]") {
  TempDir dir;
  const auto config = write_config(dir) + " --set training.train_iters=1 --set training.lr_warmup_iters=0";
  SECTION("tied embeddings under pipeline parallelism (a layout rule)") {
    same_refusal(config, kPipelineModel + " --set parallel.pipeline_model_parallel_size=2 "
                                          "--set model.untie_embeddings_and_output_weights=false", 2, /*plan=*/true);
  }
  SECTION("the pooled Hugging Face aux loss under pipeline parallelism (a layout rule)") {
    same_refusal(config, " --set model.num_layers=4 --set parallel.pipeline_model_parallel_size=2", 2, /*plan=*/true);
  }
  SECTION("experts that do not divide over EP (a layout rule)") {
    same_refusal(config, " --set parallel.expert_model_parallel_size=3 --set training.global_batch_size=12", 3,
                 /*plan=*/true);
  }
  SECTION("a split that leaves the train split no documents") {
    same_refusal(config, " --set data.split=0,1,0");
  }
  SECTION("a missing dataset") {
    same_refusal(config, " --set data.data_path=[" + (dir.path() / "nodata").string() + "]");
  }
  SECTION("an output directory that cannot be created") {
    const auto file = dir.file("a-file", "x");
    same_refusal(config, " --set logging.run_dir=" + file + "/run");
    same_refusal(config, " --set checkpoint.save=" + file + "/ckpt");
  }
  SECTION("a checkpoint to load that does not exist") {
    same_refusal(config, " --load " + (dir.path() / "nowhere").string());
  }
  SECTION("a freezing pattern that matches no parameter") {
    same_refusal(config, " --set 'training.trainable=[\"*.nothing_by_this_name\"]'");
  }
  SECTION("a checkpoint of another model or precision") {
    const std::string ckpt = (dir.path() / "ckpt").string();
    train(config, " --set checkpoint.save=" + ckpt + " --set logging.run_dir=" + (dir.path() / "first").string());
    same_refusal(config, " --load " + ckpt + " --set model.rotary_base=20000");
    same_refusal(config, " --load " + ckpt + " --set training.bf16=true");
  }
}

TEST_CASE("the dry run notes a missing GPU instead of refusing (a login node has none)", "[train][cli]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto dry = run_command(kBin + " train " + config + " --set hardware.device=cuda --dry-run");
  INFO(dry.output);
  CHECK(dry.exit_code == 0);
  CHECK_THAT(dry.output, Contains("ok       hardware.device: cuda: 0 GPU(s) visible"));
  const auto trainer = run_command(kBin + " train " + config + " --set hardware.device=cuda");
  CHECK(trainer.exit_code == 1);
  CHECK_THAT(trainer.output, Contains("no cuda device is visible"));
}

TEST_CASE("a device's memory check leaves headroom for the runtime: a plan filling the device is refused",
          "[train][errors][device]") {
  TempDir dir;
  const auto loaded = load_config(write_config(dir));
  const auto layout = ParallelLayout::create(loaded.config, 1);
  const Plan plan = make_plan(loaded.config, "", layout);
  const int64_t need = plan.stages.front().peak_bytes;
  // A device exactly as large as the plan: nothing left for the CUDA context, the library
  // workspaces or the allocator's fragmentation.
  const auto why = user_error([&] { check_memory_fits(loaded.config, layout, need, 1); });
  CHECK_THAT(why, Contains("the memory plan needs") && Contains("for tensors") && Contains("CUDA context"));
  const int64_t gib = int64_t{1} << 30;
  CHECK(usable_device_bytes(80 * gib) == 80 * gib - 4 * gib - 3 * gib / 2);  // 5 % and 1.5 GiB
  CHECK(usable_device_bytes(gib) == 0);
  check_memory_fits(loaded.config, layout, need + 4 * gib, 1);  // fits with room to spare
}

TEST_CASE("the dry run and train refuse a data.tokenizer_model that is not there, needed or not", "[train][cli][errors]") {
  TempDir dir;
  const auto config = write_config(dir) + " --set training.train_iters=1 --set training.lr_warmup_iters=0";
  const std::string missing = (dir.path() / "no-such" / "tokenizer.json").string();
  SECTION("not read (no EOD masking): a typo found now, not when a later run masks EODs") {
    same_refusal(config, " --set data.tokenizer_model=" + missing);
    const auto dry = run_command(kBin + " train " + config + " --set data.tokenizer_model=" + missing + " --dry-run");
    CHECK_THAT(dry.output, Contains("data.tokenizer_model " + missing + " does not exist") &&
                               Contains("Set it to the path of the model's tokenizer.json"));
  }
  SECTION("read, for data.eod_mask_loss") {
    same_refusal(config, " --set data.eod_mask_loss=true --set data.tokenizer_model=" + missing);
  }
  SECTION("a directory: the tokenizer.json inside it is named") {
    const auto model_dir = dir.path() / "model";
    fs::create_directories(model_dir);
    std::ofstream(model_dir / "tokenizer.json") << "{}";
    same_refusal(config, " --set data.tokenizer_model=" + model_dir.string());
    const auto dry = run_command(kBin + " train " + config + " --set data.tokenizer_model=" + model_dir.string() + " --dry-run");
    CHECK_THAT(dry.output, Contains("is a directory") && Contains((model_dir / "tokenizer.json").string()));
  }
  SECTION("the byte tokenizer names no file") {
    const auto dry = run_command(kBin + " train " + config + " --set data.tokenizer_model=byte --set data.eod_mask_loss=true "
                                                             "--dry-run");
    INFO(dry.output);
    CHECK(dry.exit_code == 0);
  }
}

namespace {

// The largest id of a uint16 .bin, read here byte by byte: the reference for what the scan finds.
int64_t largest_uint16_in(const fs::path& bin) {
  std::ifstream in(bin, std::ios::binary);
  int64_t largest = -1;
  unsigned char two[2];
  while (in.read(reinterpret_cast<char*>(two), 2)) largest = std::max<int64_t>(largest, two[0] | two[1] << 8);
  return largest;
}

// The description file of the newest cached token-id scan in the default cache directory, if any
// (an entry of an earlier .bin stays there).
fs::path token_id_cache(const TempDir& dir) {
  const auto cache = dir.path() / "cache" / "GPTDataset_indices";
  std::error_code ec;
  fs::path newest;
  for (const auto& e : fs::directory_iterator(cache, ec)) {
    if (e.path().filename().string().ends_with("-TokenIdRange-description.json") &&
        (newest.empty() || fs::last_write_time(e.path()) > fs::last_write_time(newest))) {
      newest = e.path();
    }
  }
  return newest;
}

// Overwrites token `k` of a uint16 .bin in place (same size, same inode) and moves its mtime on.
void set_token(const fs::path& bin, int64_t k, uint16_t id) {
  const auto mtime = fs::last_write_time(bin);
  std::fstream f(bin, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(2 * k);
  const char two[2] = {static_cast<char>(id & 0xff), static_cast<char>(id >> 8)};
  f.write(two, 2);
  f.close();
  fs::last_write_time(bin, mtime + std::chrono::seconds(10));  // a coarse clock must see a change too
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

}  // namespace

TEST_CASE("the dry run and train refuse data whose largest token id is outside the vocabulary", "[train][cli][errors]") {
  TempDir dir;
  const auto config = write_config(dir) + " --set training.train_iters=1 --set training.lr_warmup_iters=0";
  const int64_t largest = largest_uint16_in(dir.path() / "text.bin");  // the text's largest byte, 'x' or so
  REQUIRE(largest > 100);
  REQUIRE(largest < 128);
  const std::string exact = fmt::format(" --set model.make_vocab_size_divisible_by=1 --set model.vocab_size={}", largest);
  SECTION("refused, naming the dataset, the id, the vocabulary and the fix") {
    same_refusal(config, exact);
    const auto dry = run_command(kBin + " train " + config + exact + " --dry-run");
    CHECK_THAT(dry.output, Contains((dir.path() / "text").string() + ": the largest token id in ") &&
                               Contains(fmt::format("is {}, outside the model's vocabulary (model.vocab_size {})",
                                                    largest, largest)) &&
                               Contains(fmt::format("Set model.vocab_size to at least {}", largest + 1)) &&
                               Contains("another tokenizer"));
  }
  SECTION("one more id fits") {
    const auto dry = run_command(kBin + " train " + config +
                                 fmt::format(" --set model.make_vocab_size_divisible_by=1 --set model.vocab_size={}",
                                             largest + 1) +
                                 " --dry-run");
    INFO(dry.output);
    CHECK(dry.exit_code == 0);
    CHECK_THAT(dry.output, Contains(fmt::format("largest token id {} fits the vocabulary of {} (1 .bin scanned)", largest,
                                                largest + 1)));
  }
  SECTION("the padded vocabulary counts, as in training") {
    const auto padded = fmt::format(" --set model.vocab_size={}", largest);  // padded to 128
    const auto dry = run_command(kBin + " train " + config + padded + " --dry-run");
    INFO(dry.output);
    CHECK(dry.exit_code == 0);
    CHECK_THAT(dry.output, Contains(fmt::format("largest token id {} fits the vocabulary of 128", largest)));
    train(config, padded + " --set logging.run_dir=" + (dir.path() / "trained").string());
  }
  SECTION("a negative id (an int32 dataset)") {
    const auto prefix = (dir.path() / "signed").string();
    data::IndexedDatasetBuilder b(prefix, data::TokenDType::int32);
    for (int d = 0; d < 50; ++d) {
      std::vector<int64_t> ids(40, 7);
      if (d == 31) ids[5] = -3;
      b.add_document(ids);
    }
    b.finalize();
    same_refusal(config, " --set data.data_path=[" + prefix + "]");
    const auto dry = run_command(kBin + " train " + config + " --set data.data_path=[" + prefix + "] --dry-run");
    CHECK_THAT(dry.output, Contains("holds token id -3, and token ids are never negative"));
  }
}

TEST_CASE("a uint16 dataset and a vocabulary of 65,536 ids or more need no scan", "[train][cli]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto dry = run_command(kBin + " train " + config + " --set model.vocab_size=65536 --dry-run");
  INFO(dry.output);
  CHECK(dry.exit_code == 0);
  CHECK_THAT(dry.output, Contains("token ids < 65536 (uint16) fit the vocabulary of 65536, no scan needed"));
  CHECK(token_id_cache(dir).empty());
  const auto padded = run_command(kBin + " train " + config + " --set model.vocab_size=65535 --dry-run");
  INFO(padded.output);
  CHECK_THAT(padded.output, Contains("fit the vocabulary of 65536, no scan needed"));  // padded to 65,536 ids
  const auto below = run_command(kBin + " train " + config +
                                 " --set model.vocab_size=65535 --set model.make_vocab_size_divisible_by=1 --dry-run");
  INFO(below.output);
  CHECK(below.exit_code == 0);
  CHECK_THAT(below.output, Contains("fits the vocabulary of 65535 (1 .bin scanned)"));
  CHECK_FALSE(token_id_cache(dir).empty());
}

TEST_CASE("the token-id scan is cached once, reused by the dry run and train, and redone when the .bin changes",
          "[train][cli]") {
  TempDir dir;
  const auto config = write_config(dir) + " --set training.train_iters=1 --set training.lr_warmup_iters=0";
  const auto bin = dir.path() / "text.bin";
  const int64_t largest = largest_uint16_in(bin);
  const auto dry_run = [&] { return run_command(kBin + " train " + config + " --dry-run"); };
  // Two dry runs at once: one scans, the other waits for its result.
  const std::string cmd = kBin + " train " + config + " --dry-run";
  const auto both = run_command("(" + cmd + " & " + cmd + " & wait)");
  INFO(both.output);
  CHECK(count(both.output, "scanned once") == 1);
  CHECK(count(both.output, "dry run passed") == 2);
  CHECK(count(both.output, fmt::format("largest token id {} fits the vocabulary of 256", largest)) == 2);
  const auto cache = token_id_cache(dir);
  REQUIRE_FALSE(cache.empty());
  const auto written = fs::last_write_time(cache);

  const auto again = dry_run();
  INFO(again.output);
  CHECK(again.exit_code == 0);
  CHECK_THAT(again.output, Contains(fmt::format("largest token id {} fits the vocabulary of 256 (1 from the cache of an "
                                                "earlier scan)", largest)));
  CHECK_THAT(again.output, !Contains("scanned once"));
  const auto trained = train(config, " --set logging.run_dir=" + (dir.path() / "trained").string());
  CHECK_THAT(trained, !Contains("scanned once"));
  CHECK(fs::last_write_time(cache) == written);

  // The same size and inode, one token changed: the modification time alone invalidates the entry.
  set_token(bin, 17, 200);
  const auto rewritten = dry_run();
  INFO(rewritten.output);
  CHECK(rewritten.exit_code == 0);
  CHECK(largest_uint16_in(bin) == 200);
  CHECK_THAT(rewritten.output, Contains("scanned once") && Contains("largest token id 200 fits the vocabulary of 256 "
                                                                    "(1 .bin scanned)"));
  // A stale result (200) never hides an id the vocabulary lacks.
  set_token(bin, 18, 300);
  same_refusal(config, "");
  const auto refused = dry_run();
  INFO(refused.output);
  CHECK_THAT(refused.output, Contains("the largest token id in " + bin.string() + " is 300"));

  // A damaged cache entry is scanned again, with a warning naming it.
  auto range_file = token_id_cache(dir).string();
  range_file.replace(range_file.size() - std::string("description.json").size(), std::string::npos, "range.npy");
  REQUIRE(fs::exists(range_file));
  std::ofstream(range_file) << "not an array";
  const auto damaged = dry_run();
  INFO(damaged.output);
  CHECK_THAT(damaged.output, Contains(range_file) && Contains("Rebuilding") && Contains("scanned once") &&
                                 Contains("the largest token id in " + bin.string() + " is 300"));
}
