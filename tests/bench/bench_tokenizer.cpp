// Tokenizer throughput: moeforge's BPE tokenizer against Hugging Face `tokenizers` on the same
// documents in the same run, with one thread and with all threads. Not run by ctest.
//
//   build/tests/bench/bench_tokenizer [--tokenizer PATH] [--corpus DIR_OR_FILE] [--mb N]
//                                     [--threads N] [--repeats N]
//
// Defaults: the Qwen tokenizer in ../shared, the Python standard library's .py files (English
// prose and code) as documents up to 8 MB, all hardware threads, best of 3 passes.
#include "data/tokenizer/tokenizer.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct Options {
  std::string tokenizer = fmt::format("{}/../shared/data/qwen-tokenizer/tokenizer.json", MOEFORGE_SOURCE_DIR);
  std::string corpus = "/usr/lib/python3.11";
  double megabytes = 8;
  unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  int repeats = 3;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i], value = argv[i + 1];
    if (key == "--tokenizer") o.tokenizer = value;
    else if (key == "--corpus") o.corpus = value;
    else if (key == "--mb") o.megabytes = std::stod(value);
    else if (key == "--threads") o.threads = static_cast<unsigned>(std::stoul(value));
    else if (key == "--repeats") o.repeats = std::stoi(value);
    else throw std::invalid_argument("unknown option " + key);
  }
  return o;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// Documents: the files under `root` (sorted, so every run reads the same), or `root` itself.
std::vector<std::string> load_corpus(const Options& o) {
  std::vector<fs::path> files;
  if (fs::is_directory(o.corpus)) {
    for (const auto& entry : fs::recursive_directory_iterator(o.corpus)) {
      if (entry.is_regular_file() && entry.path().extension() == ".py" &&
          entry.path().string().find("site-packages") == std::string::npos) {
        files.push_back(entry.path());
      }
    }
    std::sort(files.begin(), files.end());
  } else {
    files.push_back(o.corpus);
  }
  std::vector<std::string> docs;
  size_t bytes = 0;
  for (const auto& file : files) {
    if (static_cast<double>(bytes) >= o.megabytes * 1e6) break;
    docs.push_back(read_file(file));
    bytes += docs.back().size();
  }
  return docs;
}

// Best wall time over `repeats` passes that encode every document, spread over `threads`.
double time_encode(const moeforge::data::Tokenizer& tok, const std::vector<std::string>& docs, unsigned threads,
                   int repeats, size_t& tokens) {
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    std::atomic<size_t> next{0}, total{0};
    const auto start = Clock::now();
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&] {
        size_t count = 0;
        for (size_t i = next++; i < docs.size(); i = next++) count += tok.encode(docs[i]).size();
        total += count;
      });
    }
    for (auto& thread : pool) thread.join();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - start).count());
    tokens = total;
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) try {
  const Options o = parse(argc, argv);
  const auto load_start = Clock::now();
  const auto tok = moeforge::data::load_tokenizer(o.tokenizer);
  const double load_s = std::chrono::duration<double>(Clock::now() - load_start).count();
  const auto docs = load_corpus(o);
  size_t bytes = 0;
  for (const auto& d : docs) bytes += d.size();
  fmt::print("tokenizer {} (loaded in {:.2f} s); corpus {} documents, {:.1f} MB from {}\n", tok->name(), load_s,
             docs.size(), static_cast<double>(bytes) / 1e6, o.corpus);

  size_t tokens = 0;
  time_encode(*tok, docs, o.threads, 1, tokens);  // warm-up: both sides run with warm caches
  const double ours_1 = time_encode(*tok, docs, 1, o.repeats, tokens);
  const double ours_n = time_encode(*tok, docs, o.threads, o.repeats, tokens);

  const fs::path corpus_file = fs::temp_directory_path() / fmt::format("moeforge-bench-corpus-{}.jsonl", getpid());
  {
    std::ofstream out(corpus_file);
    for (const auto& d : docs) out << nlohmann::json(d).dump() << "\n";
  }
  const std::string command = fmt::format("{} {}/tests/bench/tokenizers_throughput.py {} {} {}", MOEFORGE_PYTHON,
                                          MOEFORGE_SOURCE_DIR, o.tokenizer, corpus_file.string(), o.repeats);
  FILE* pipe = popen(command.c_str(), "r");
  std::string output;
  std::array<char, 4096> buffer{};
  for (size_t n; (n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0;) output.append(buffer.data(), n);
  const int status = pclose(pipe);
  fs::remove(corpus_file);
  if (status != 0) throw std::runtime_error("tokenizers benchmark failed: " + command + "\n" + output);
  const auto theirs = nlohmann::json::parse(output);
  const auto their_tokens = theirs.at("tokens").get<size_t>();
  const double theirs_1 = theirs.at("seconds_1_thread").get<double>();
  const double theirs_n = theirs.at("seconds_all_threads").get<double>();

  const auto rate = [&](double seconds) { return static_cast<double>(tokens) / seconds / 1e6; };
  fmt::print("tokens: moeforge {}, tokenizers {}{}\n", tokens, their_tokens,
             tokens == their_tokens ? " (equal)" : " (DIFFERENT)");
  fmt::print("{:<26} {:>14} {:>14} {:>8}\n", "", "moeforge", "tokenizers", "ratio");
  fmt::print("{:<26} {:>9.2f} Mtok/s {:>7.2f} Mtok/s {:>7.2f}x\n", "1 thread", rate(ours_1), rate(theirs_1),
             theirs_1 / ours_1);
  fmt::print("{:<26} {:>9.2f} Mtok/s {:>7.2f} Mtok/s {:>7.2f}x\n", fmt::format("{} threads", o.threads),
             rate(ours_n), rate(theirs_n), theirs_n / ours_n);
  return tokens == their_tokens ? 0 : 1;
} catch (const std::exception& e) {
  fmt::print(stderr, "error: {}\n", e.what());
  return 1;
}
