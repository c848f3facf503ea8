// GPT samples against Megatron-Core's GPTDataset and BlendedMegatronDatasetBuilder
// (tests/oracles/megatron_data_oracle.py): the same indices and the same sample contents for
// several seeds, sequence lengths, epoch regimes, splits, dtypes and blends.
#include "core/base/errors.h"
#include "data/blend.h"
#include "data/datasets.h"
#include "data/index_cache.h"
#include "data/loader.h"
#include "data/npy.h"
#include "data/numpy_random.h"
#include "test_util.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>
#include <functional>
#include <unistd.h>

using namespace moeforge;
using namespace moeforge::data;
using Catch::Matchers::Contains;
using nlohmann::json;

namespace {

constexpr int64_t kEod = 0;

// Documents of random length (some of a single token), every one ending in the EOD id.
void write_dataset(const std::string& prefix, TokenDType dtype, uint32_t seed, int docs, int max_len) {
  std::mt19937 rng(seed);
  IndexedDatasetBuilder b(prefix, dtype);
  for (int d = 0; d < docs; ++d) {
    std::vector<int64_t> t(1 + rng() % static_cast<uint32_t>(max_len));
    for (auto& x : t) x = 1 + static_cast<int64_t>(rng() % 999);
    t.back() = kEod;
    b.add_document(t);
  }
  b.finalize();
}

std::vector<int64_t> ints(const json& j) { return j.get<std::vector<int64_t>>(); }

// 30 documents, sequences of 16, indices cached in a fresh directory.
struct SmallCachedDataset {
  test::TempDir dir;
  std::shared_ptr<const IndexedDataset> data;
  GPTDatasetOptions options;
  SmallCachedDataset() {
    const auto prefix = (dir.path() / "a").string();
    write_dataset(prefix, TokenDType::uint16, 1, 30, 40);
    data = std::make_shared<const IndexedDataset>(prefix);
    options.seq_length = 16;
    options.cache_dir = (dir.path() / "cache").string();
  }
};

void compare_split(const json& expected, const SampleSource& ours, const std::string& what) {
  INFO(what);
  REQUIRE(ours.size() == expected["length"].get<int64_t>());
  if (const auto* gpt = dynamic_cast<const GPTDataset*>(&ours)) {
    std::vector<int64_t> doc(gpt->indices().document_index.begin(), gpt->indices().document_index.end());
    CHECK(doc == ints(expected["document_index"]));
    CHECK(gpt->indices().sample_index == ints(expected["sample_index"]));
    CHECK(gpt->indices().shuffle_index == ints(expected["shuffle_index"]));
  }
  if (const auto* blend = dynamic_cast<const BlendedDataset*>(&ours)) {
    std::vector<int64_t> idx(blend->dataset_index().begin(), blend->dataset_index().end());
    CHECK(idx == ints(expected["dataset_index"]));
    CHECK(blend->dataset_sample_index() == ints(expected["dataset_sample_index"]));
  }
  Sample s;
  const auto& tokens = expected["tokens"];
  for (size_t i = 0; i < tokens.size(); ++i) {
    ours.get(static_cast<int64_t>(i), s);
    INFO("sample " << i);
    CHECK(s.tokens == ints(tokens[i]));
    CHECK(s.labels == ints(expected["labels"][i]));
    CHECK(s.position_ids == ints(expected["position_ids"][i]));
    CHECK(s.loss_mask == expected["loss_mask"][i].get<std::vector<float>>());
  }
}

}  // namespace

TEST_CASE("samples, indices and blends equal Megatron-Core's", "[data][gpt]") {
  test::TempDir dir;
  const auto a = (dir.path() / "a").string(), b = (dir.path() / "b").string(), c = (dir.path() / "c").string();
  write_dataset(a, TokenDType::uint16, 1, 60, 40);
  write_dataset(b, TokenDType::int32, 2, 35, 90);
  write_dataset(c, TokenDType::uint16, 3, 8, 300);  // few long documents
  struct Case {
    std::vector<std::string> path;
    std::string split;
    int64_t seq, seed;
    std::array<int64_t, 3> sizes;
    bool reset = false, mask = false;
  };
  // Every split holds at least one document: Megatron-Core loops forever on an empty one (we
  // raise an error instead, tested below).
  const std::vector<Case> cases = {
      {{a}, "80,15,5", 16, 1234, {30, 10, 5}},                 // one epoch
      {{a}, "80,15,5", 16, 1234, {170, 30, 40}},               // several epochs
      {{a}, "90,9,1", 7, 42, {500, 20, 3}},                    // many epochs, short samples
      {{b}, "90,10,0", 64, 7, {60, 2, 1}},                     // int32, no test split, round half to even
      {{b}, "100", 33, 2024, {95, 0, 0}},                      // train only
      {{c}, "90,10,0", 50, 5, {61, 9, 0}},                     // long documents
      {{"0.3", a, "0.7", b}, "90,8,2", 16, 1234, {120, 20, 8}},  // weighted blend
      {{a, b, c}, "80,10,10", 16, 99, {80, 10, 4}},            // unweighted blend
      {{a}, "80,20,0", 24, 3, {60, 10, 0}, true, true},        // EOD masking and position reset
  };
  json specs = json::array();
  for (size_t k = 0; k < cases.size(); ++k) {
    const auto& cs = cases[k];
    specs.push_back({{"seed", cs.seed},
                     {"seq_length", cs.seq},
                     {"prefixes", json::array()},
                     {"split", cs.split},
                     {"cache", (dir.path() / ("megatron_cache" + std::to_string(k))).string()},
                     {"sizes", cs.sizes},
                     {"reset_position_ids", cs.reset},
                     {"eod_mask_loss", cs.mask},
                     {"eod", kEod}});
    const auto blend = parse_blend(cs.path);
    specs.back()["prefixes"] = blend.prefixes;
    if (blend.weights) specs.back()["weights"] = *blend.weights;
  }
  const auto spec_file = dir.file("specs.json", specs.dump());
  const auto out_file = (dir.path() / "expected.json").string();
  test::run_oracle("megatron_data_oracle.py", "samples " + spec_file + " " + out_file);
  std::ifstream in(out_file);
  const json expected = json::parse(in);

  bool saw_separate_final = false, saw_joined_final = false;
  for (size_t k = 0; k < cases.size(); ++k) {
    const auto& cs = cases[k];
    DatasetSpec spec;
    spec.data_path = cs.path;
    spec.split = cs.split;
    spec.num_samples = cs.sizes;
    spec.gpt.seq_length = cs.seq;
    spec.gpt.seed = static_cast<uint32_t>(cs.seed);
    spec.gpt.reset_position_ids = cs.reset;
    spec.gpt.eod_mask_loss = cs.mask;
    spec.gpt.eod_id = kEod;
    spec.gpt.vocab_size = 1000;
    spec.gpt.cache_dir = (dir.path() / ("cache" + std::to_string(k))).string();
    const auto ours = build_datasets(spec);
    for (size_t i = 0; i < 3; ++i) {
      const auto& e = expected[k][split_name(static_cast<Split>(i))];
      const std::string what = "case " + std::to_string(k) + " split " + split_name(static_cast<Split>(i));
      INFO(what);
      REQUIRE(e.is_null() == (ours[i] == nullptr));
      if (!ours[i]) continue;
      compare_split(e, *ours[i], what);
      if (const auto* gpt = dynamic_cast<const GPTDataset*>(ours[i].get()); gpt && gpt->indices().num_epochs > 1) {
        (gpt->indices().separate_final_epoch ? saw_separate_final : saw_joined_final) = true;
      }
    }
  }
  CHECK(saw_separate_final);  // both epoch regimes were exercised
  CHECK(saw_joined_final);
}

TEST_CASE("numpy's RandomState shuffle, bit for bit", "[data][gpt]") {
  // Reference values: numpy.random.RandomState(1234).shuffle(numpy.arange(10)) and the first
  // random_interval draws, as numpy 2.x produces them.
  const auto expected = json::parse(test::run_oracle(
      "numpy_random_oracle.py", ""));
  std::vector<int64_t> v(10);
  for (int64_t i = 0; i < 10; ++i) v[static_cast<size_t>(i)] = i;
  NumpyRandomState rng(1234);
  rng.shuffle(std::span<int64_t>(v));
  CHECK(v == ints(expected["shuffle_1234_10"]));
  std::vector<int64_t> big(100000);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<int64_t>(i);
  NumpyRandomState rng2(7);
  rng2.shuffle(std::span<int64_t>(big));
  CHECK(std::vector<int64_t>(big.begin(), big.begin() + 20) == ints(expected["shuffle_7_100000_head"]));
  std::vector<double> w;
  for (int i = 1; i <= 300; ++i) w.push_back(1.0 / (i * 0.7 + 0.13));
  CHECK(numpy_sum(w) == expected["pairwise_sum_300"].get<double>());
}

TEST_CASE("indices are cached and reused, and rebuilt when the description changes", "[data][gpt]") {
  const SmallCachedDataset small;
  const auto& data = small.data;
  auto o = small.options;
  const GPTDataset first(data, Split::train, {0, 30}, 50, o);
  CHECK(first.built_indices());
  const GPTDataset again(data, Split::train, {0, 30}, 50, o);
  CHECK_FALSE(again.built_indices());
  CHECK(again.indices().shuffle_index == first.indices().shuffle_index);
  o.seed = 99;
  const GPTDataset reseeded(data, Split::train, {0, 30}, 50, o);
  CHECK(reseeded.built_indices());
}

TEST_CASE("a damaged index cache is rebuilt, never followed out of bounds", "[data][gpt][cache][errors]") {
  const SmallCachedDataset small;
  const auto& data = small.data;
  auto o = small.options;
  const GPTDataset first(data, Split::train, {0, 30}, 50, o);
  REQUIRE(first.built_indices());
  auto file_of = [&](const std::string& array) {
    for (const auto& e : std::filesystem::directory_iterator(o.cache_dir)) {
      const auto name = e.path().filename().string();
      if (name.find("-" + array + ".npy") != std::string::npos) return e.path();
    }
    FAIL("no cached " << array);
    return std::filesystem::path();
  };
  // Each damage as the issue found it (out-of-range shuffle entries crashed, a bad document index
  // or a deleted sample index was an internal error), plus a wrong dtype and a torn file.
  auto rewrite = [&](const std::string& array, const std::string& descr, std::vector<int64_t> shape, auto values) {
    write_npy(file_of(array).string(), descr, shape, values.data(), values.size() * sizeof(values[0]));
  };
  const auto& ix = first.indices();
  const std::vector<std::function<void()>> damages = {
      [&] { auto v = ix.shuffle_index; v[3] = 1 << 30; rewrite("shuffle_index", "<i8", {static_cast<int64_t>(v.size())}, v); },
      [&] { auto v = ix.document_index; v[1] = -5; rewrite("document_index", "<i4", {static_cast<int64_t>(v.size())}, v); },
      [&] { std::filesystem::remove(file_of("sample_index")); },
      [&] { auto v = ix.sample_index; v[5] += 1; rewrite("sample_index", "<i8", {static_cast<int64_t>(v.size() / 2), 2}, v); },
      [&] {
        std::vector<int32_t> v(ix.shuffle_index.begin(), ix.shuffle_index.end());
        rewrite("shuffle_index", "<i4", {static_cast<int64_t>(v.size())}, v);
      },
      [&] { std::filesystem::resize_file(file_of("document_index"), 100); },
  };
  for (size_t k = 0; k < damages.size(); ++k) {
    INFO("damage " << k);
    damages[k]();
    const GPTDataset again(data, Split::train, {0, 30}, 50, o);
    CHECK(again.built_indices());
    CHECK(again.indices().shuffle_index == ix.shuffle_index);
    CHECK(again.indices().sample_index == ix.sample_index);
    CHECK(again.indices().document_index == ix.document_index);
    const GPTDataset cached(data, Split::train, {0, 30}, 50, o);  // the rebuilt cache is used again
    CHECK_FALSE(cached.built_indices());
  }
}

TEST_CASE("a damaged index cache is named in the warning of the command that rebuilds it", "[data][cache][errors]") {
  test::TempDir dir;
  const auto a = (dir.path() / "a").string();
  write_dataset(a, TokenDType::uint16, 1, 200, 400);
  const auto cache = dir.path() / "cache";
  const auto config = dir.file("c.yaml", std::string(test::kMinimalModel) + "data:\n  data_path: [" + a +
                                             "]\n  split: \"90,10,0\"\n  data_cache_path: " + cache.string() + "\n");
  const std::string cmd = test::moeforge_binary() + " data samples " + config + " --first 2";
  const auto clean = test::run_command(cmd);
  REQUIRE(clean.exit_code == 0);
  std::filesystem::path shuffle;
  for (const auto& e : std::filesystem::directory_iterator(cache)) {
    if (e.path().filename().string().find("train-shuffle_index.npy") != std::string::npos) shuffle = e.path();
  }
  REQUIRE_FALSE(shuffle.empty());
  auto bad = read_npy(shuffle.string());
  std::memset(bad.data.data(), 0x7f, 8);  // entry 0: far outside the samples
  write_npy(shuffle.string(), bad.descr, bad.shape, bad.data.data(), bad.data.size());
  const auto damaged = test::run_command(cmd);
  INFO(damaged.output);
  CHECK(damaged.exit_code == 0);
  CHECK_THAT(damaged.output, Contains("damaged") && Contains(shuffle.filename().string()) && Contains("entry 0") &&
                                 Contains("Rebuilding"));
  // The same samples as before the damage (the log lines differ: built vs loaded).
  auto samples_of = [](const std::string& out) {
    const auto at = out.find("sample 0:");
    return at == std::string::npos ? std::string("(no samples)") : out.substr(at);
  };
  CHECK(samples_of(damaged.output) == samples_of(clean.output));
}

TEST_CASE("token ids beyond the vocabulary name the dataset, sample and id", "[data][gpt][errors]") {
  test::TempDir dir;
  const auto a = (dir.path() / "a").string();
  write_dataset(a, TokenDType::uint16, 1, 30, 40);
  GPTDatasetOptions o;
  o.seq_length = 16;
  o.vocab_size = 500;  // the data holds ids up to 999
  o.cache_dir = (dir.path() / "cache").string();
  const GPTDataset d(std::make_shared<const IndexedDataset>(a), Split::train, {0, 30}, 10, o);
  Sample s;
  bool failed = false;
  for (int64_t i = 0; i < d.size() && !failed; ++i) {
    try {
      d.get(i, s);
    } catch (const UserError& e) {
      failed = true;
      CHECK_THAT(std::string(e.what()), Contains(a) && Contains("train split") && Contains("sample " + std::to_string(i)) &&
                                            Contains("outside the model's vocabulary of 500 ids"));
    }
  }
  CHECK(failed);
}

TEST_CASE("the loader follows Megatron's sampler and resumes from consumed_samples", "[data][loader]") {
  test::TempDir dir;
  const auto a = (dir.path() / "a").string();
  write_dataset(a, TokenDType::uint16, 1, 60, 40);
  GPTDatasetOptions o;
  o.seq_length = 8;
  o.cache_dir = (dir.path() / "cache").string();
  auto source = std::make_shared<const GPTDataset>(std::make_shared<const IndexedDataset>(a), Split::train,
                                                   std::make_pair(int64_t{0}, int64_t{60}), 64, o);
  // micro-batch 2, DP 2: rank 1 takes samples 2-3 of each chunk of 4.
  DataLoader rank1(source, 2, 1, 2, 0);
  CHECK(rank1.next().sample_ids == std::vector<int64_t>{2, 3});
  CHECK(rank1.next().sample_ids == std::vector<int64_t>{6, 7});
  CHECK(rank1.consumed_samples() == 8);
  const MicroBatch third = rank1.next();
  DataLoader resumed(source, 2, 1, 2, 8);
  const MicroBatch again = resumed.next();
  CHECK(again.sample_ids == third.sample_ids);
  CHECK(again.tokens == third.tokens);
  Sample s;
  source->get(10, s);
  CHECK(std::vector<int64_t>(third.tokens.begin(), third.tokens.begin() + 8) == s.tokens);
  // Exhaustion is a clear error, not a hang.
  DataLoader tail(source, 2, 0, 2, (source->size() / 4) * 4);
  CHECK_THROWS_WITH(tail.next(), Contains("exhausted"));
}

TEST_CASE("a split without documents is an error, not a hang", "[data][gpt][errors]") {
  test::TempDir dir;
  const auto a = (dir.path() / "a").string();
  write_dataset(a, TokenDType::uint16, 1, 35, 40);
  DatasetSpec spec;
  spec.data_path = {a};
  spec.split = "99,1,0";  // valid = [round(34.65), 35) = [35, 35)
  spec.num_samples = {10, 2, 0};
  spec.gpt.seq_length = 8;
  spec.gpt.cache_dir = (dir.path() / "cache").string();
  CHECK_THROWS_WITH(build_datasets(spec), Contains("the split [35, 35) holds 0 tokens"));
}

TEST_CASE("two processes sharing a cache: one builds, the other waits and loads", "[data][cache]") {
  test::TempDir dir;
  const auto a = (dir.path() / "a").string();
  write_dataset(a, TokenDType::uint16, 1, 200, 400);
  const auto config = dir.file("c.yaml", std::string(test::kMinimalModel) + "data:\n  data_path: [" + a +
                                             "]\n  split: \"90,10,0\"\n  data_cache_path: " +
                                             (dir.path() / "cache").string() + "\n");
  const std::string cmd = test::moeforge_binary() + " data samples " + config + " --first 2 --set training.train_iters=2000";
  const auto r = test::run_command("(" + cmd + " > " + (dir.path() / "one.txt").string() + " & " + cmd + " > " +
                                   (dir.path() / "two.txt").string() + " & wait)");
  auto count = [&](const std::string& text, const std::string& what) {
    size_t n = 0;
    for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
    return n;
  };
  CHECK(count(r.output, "train indices") == 2);
  // `data samples` builds only the split it prints: train, built by one process, loaded by the other.
  CHECK(count(r.output, ") built in") == 1);
  CHECK(count(r.output, "loaded from cache") == 1);
  std::ifstream one(dir.path() / "one.txt"), two(dir.path() / "two.txt");
  const std::string s1((std::istreambuf_iterator<char>(one)), {}), s2((std::istreambuf_iterator<char>(two)), {});
  CHECK_FALSE(s1.empty());
  CHECK(s1 == s2);
}

TEST_CASE("a held lock times out with its owner named, and a dead owner's lock is taken over", "[data][cache][errors]") {
  test::TempDir dir;
  const std::string description = "{\"test\": 1}";
  IndexCache probe(dir.path(), "T", description, 0.3);
  const auto lock_path = probe.description_path().string();
  const std::string lock = lock_path.substr(0, lock_path.size() - std::string("-description.json").size()) + ".lock";
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  std::ofstream(lock) << host << " " << ::getpid();  // held by this (live) process
  std::vector<int64_t> data = {1, 2, 3};
  auto build = [&] { return IndexCache::Views{{"x", NpyView{"<i8", {3}, data.data(), 24}}}; };
  const auto ok = [](const IndexCache::Arrays&) { return std::optional<IndexCache::Problem>{}; };
  CHECK_THROWS_WITH(probe.get_or_build(build, ok), Contains("timed out") && Contains(".lock") && Contains(host));
  std::ofstream(lock) << host << " " << 999999999;  // a process that does not exist
  bool built = false;
  probe.get_or_build(build, ok, &built);
  CHECK(built);
  const auto loaded = probe.get_or_build(build, ok, &built);
  CHECK_FALSE(built);
  CHECK(loaded.at("x").shape == std::vector<int64_t>{3});
}
