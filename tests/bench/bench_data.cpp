// Data benchmarks (run by hand; results in docs/data.md):
//  1. GPT index building for a synthetic dataset of >= 1e9 tokens, ours against Megatron-Core's
//     builder (tests/bench/megatron_index_build.py) in the same run;
//  2. sample reading against a raw memcpy of the same bytes.
//   build/tests/bench/bench_data [WORK_DIR] [TOKENS]
#include "data/gpt_dataset.h"
#include "data/indexed_dataset.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <unistd.h>

using namespace moeforge::data;
namespace fs = std::filesystem;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// An index of ~`tokens` tokens in documents of 1..2047 tokens, with a sparse .bin: index
// building reads only the lengths, so the token values do not matter.
int64_t write_synthetic(const std::string& prefix, int64_t tokens) {
  std::mt19937 rng(1);
  std::vector<int32_t> lengths;
  int64_t total = 0;
  while (total < tokens) {
    lengths.push_back(1 + static_cast<int32_t>(rng() % 2047));
    total += lengths.back();
  }
  const uint64_t n = lengths.size(), d = n + 1;
  std::vector<int64_t> pointers(n), docs(d);
  for (uint64_t i = 0; i < n; ++i) {
    pointers[i] = i ? pointers[i - 1] + 4 * lengths[i - 1] : 0;
    docs[i + 1] = static_cast<int64_t>(i + 1);
  }
  std::FILE* f = std::fopen(idx_path(prefix).c_str(), "wb");
  const uint64_t version = 1;
  const uint8_t code = 4;  // int32, as for the Qwen vocabulary
  std::fwrite("MMIDIDX\0\0", 1, 9, f);
  std::fwrite(&version, 8, 1, f);
  std::fwrite(&code, 1, 1, f);
  std::fwrite(&n, 8, 1, f);
  std::fwrite(&d, 8, 1, f);
  std::fwrite(lengths.data(), 4, n, f);
  std::fwrite(pointers.data(), 8, n, f);
  std::fwrite(docs.data(), 8, d, f);
  std::fclose(f);
  fs::resize_file(bin_path(prefix), 0);
  fs::resize_file(bin_path(prefix), static_cast<uintmax_t>(4 * total));
  return total;
}

}  // namespace

int main(int argc, char** argv) {
  const fs::path work = argc > 1 ? argv[1] : "/tmp/moeforge-bench-data";
  const int64_t want = argc > 2 ? std::stoll(argv[2]) : 1'000'000'000;
  fs::remove_all(work);
  fs::create_directories(work);
  const std::string prefix = (work / "synthetic").string();
  { std::FILE* f = std::fopen(bin_path(prefix).c_str(), "wb"); std::fclose(f); }
  const int64_t tokens = write_synthetic(prefix, want);
  const int64_t seq = 4096;

  fmt::print("1. GPT index building, {} tokens, seq {}\n", tokens, seq);
  fmt::print("   {:>10}  {:>10}  {:>12}  {:>12}  {:>8}\n", "epochs", "samples", "megatron s", "moeforge s", "speed-up");
  for (const double epochs : {1.0, 2.5}) {
    const auto samples = static_cast<int64_t>(epochs * static_cast<double>(tokens - 1) / static_cast<double>(seq));
    const std::string mcache = (work / fmt::format("megatron_cache_{}", epochs)).string();
    const std::string cmd = fmt::format("{} {}/tests/bench/megatron_index_build.py {} {} {} {} 2>/dev/null", MOEFORGE_PYTHON,
                                        MOEFORGE_SOURCE_DIR, prefix, seq, samples, mcache);
    std::FILE* pipe = popen(cmd.c_str(), "r");
    char buf[4096] = {};
    const size_t got = std::fread(buf, 1, sizeof(buf) - 1, pipe);
    pclose(pipe);
    const auto megatron = nlohmann::json::parse(std::string(buf, got));

    GPTDatasetOptions o;
    o.seq_length = seq;
    o.cache_dir = (work / fmt::format("moeforge_cache_{}", epochs)).string();
    const double t0 = now();
    const auto data = std::make_shared<const IndexedDataset>(prefix);  // opening and validating counts too
    const GPTDataset ours(data, Split::train, {0, data->num_sequences()}, samples, o);
    const double ours_s = now() - t0;
    const double megatron_s = megatron["seconds"].get<double>();
    if (megatron["samples"].get<int64_t>() != ours.size()) fmt::print("   (sample counts differ!)\n");
    if (std::getenv("MOEFORGE_BENCH_DETAIL")) {
      double a = now();
      const IndexedDataset again(prefix);
      double b = now();
      const auto built = build_gpt_indices(again.sequence_lengths(), 0, again.num_sequences(), samples, seq, 1234);
      double c = now();
      fmt::print("   detail: open {:.3f} s, build_gpt_indices {:.3f} s\n", b - a, c - b);
    }
    fmt::print("   {:>10}  {:>10}  {:>12.3f}  {:>12.3f}  {:>7.1f}x\n", epochs, ours.size(), megatron_s, ours_s,
               megatron_s / ours_s);
  }

  // 2. Reading: a real (not sparse) dataset, samples in shuffled order, against memcpy of the
  // same token bytes from the same mapping.
  const std::string real = (work / "real").string();
  {
    IndexedDatasetBuilder b(real, TokenDType::int32);
    std::mt19937 rng(2);
    std::vector<int64_t> doc;
    for (int64_t total = 0; total < 200'000'000;) {
      doc.resize(1 + rng() % 2047);
      for (auto& t : doc) t = rng() % 151936;
      b.add_document(doc);
      total += static_cast<int64_t>(doc.size());
    }
    b.finalize();
  }
  const auto data = std::make_shared<const IndexedDataset>(real);
  GPTDatasetOptions o;
  o.seq_length = seq;
  o.cache_dir = (work / "real_cache").string();
  const GPTDataset ds(data, Split::train, {0, data->num_sequences()}, std::nullopt, o);
  const int64_t n = std::min<int64_t>(ds.size(), 20000);
  std::vector<int64_t> text;
  std::vector<std::byte> raw(static_cast<size_t>(seq + 1) * 8);
  Sample sample;
  for (int pass = 0; pass < 2; ++pass) {  // the first pass warms the page cache
    double t_copy = 0, t_read = 0, t_get = 0;
    double t = now();
    for (int64_t i = 0; i < n; ++i) {
      // The same bytes read_text touches: from (d0, o0) for seq + 1 tokens, across documents.
      const auto j = static_cast<size_t>(ds.indices().shuffle_index[static_cast<size_t>(i)]);
      int64_t pos = ds.indices().sample_index[2 * j], off = ds.indices().sample_index[2 * j + 1], left = seq + 1;
      std::byte* out = raw.data();
      while (left > 0) {
        const auto bytes = data->sequence_bytes(ds.indices().document_index[static_cast<size_t>(pos)]);
        const int64_t take = std::min<int64_t>(left, static_cast<int64_t>(bytes.size() / 4) - off);
        std::memcpy(out, bytes.data() + off * 4, static_cast<size_t>(take) * 4);
        out += take * 4;
        left -= take;
        ++pos;
        off = 0;
      }
    }
    t_copy = now() - t;
    t = now();
    for (int64_t i = 0; i < n; ++i) ds.read_text(i, text);
    t_read = now() - t;
    t = now();
    for (int64_t i = 0; i < n; ++i) ds.get(i, sample);
    t_get = now() - t;
    if (pass == 1) {
      const double gb = static_cast<double>(n) * static_cast<double>(seq + 1) * 4 / 1e9;
      fmt::print("2. reading {} samples of {} tokens in shuffled order (int32 data, page cache warm)\n", n, seq);
      fmt::print("   memcpy of the same bytes       {:8.3f} s  {:6.2f} GB/s\n", t_copy, gb / t_copy);
      fmt::print("   read_text (ids as int64)       {:8.3f} s  {:6.2f} GB/s  {:.2f}x memcpy time\n", t_read, gb / t_read,
                 t_read / t_copy);
      fmt::print("   get (tokens, labels, mask, pos) {:7.3f} s  {:.0f} samples/s  {:.2f}x memcpy time\n", t_get,
                 static_cast<double>(n) / t_get, t_get / t_copy);
    }
  }
  fs::remove_all(work);
  return 0;
}
