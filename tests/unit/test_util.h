// defines: TempDir, run_command, run_oracle, user_error, slurp, source_path (shared test helpers)
#pragma once

#include "core/base/errors.h"
#include "test_paths.h"

// c10's logging defines a CHECK macro too (abort on failure, no report): included first, so that
// Catch's definition, below, is the one every test uses whatever it includes afterwards.
#include <c10/util/Logging.h>
#include <catch2/catch.hpp>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <stdexcept>
#include <string>
#include <sys/wait.h>

namespace moeforge::test {

// A fresh directory under the system temp dir, removed on destruction.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() / ("moeforge-test-" + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name, const std::string& contents) const {
    const auto p = path_ / name;
    std::ofstream(p) << contents;
    return p.string();
  }

 private:
  std::filesystem::path path_;
};

inline std::string source_path(const std::string& relative) { return source_dir() + "/" + relative; }

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

inline CommandResult run_command(const std::string& command) {
  CommandResult r;
  FILE* pipe = popen(("{ " + command + "; } 2>&1").c_str(), "r");
  std::array<char, 4096> buffer{};
  size_t n = 0;
  while ((n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0) r.output.append(buffer.data(), n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// The message of the UserError `f` throws; fails the test when it throws none.
template <typename F>
std::string user_error(F&& f) {
  try {
    f();
  } catch (const UserError& e) {
    return e.what();
  }
  FAIL("expected a UserError");
  return {};
}

// A whole file as bytes.
inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// Runs a test oracle from tests/oracles/ with the project venv's Python; fails the test on error.
inline std::string run_oracle(const std::string& script, const std::string& args) {
  const auto r = run_command(venv_python() + " " + source_path("tests/oracles/" + script) + " " + args);
  if (r.exit_code != 0) throw std::runtime_error("oracle " + script + " " + args + " failed:\n" + r.output);
  return r.output;
}

// A minimal valid config body; tests append or replace sections.
inline const char* kMinimalModel = R"(
model:
  num_layers: 4
  hidden_size: 64
  num_attention_heads: 4
  vocab_size: 1000
  num_experts: 8
  moe_ffn_hidden_size: 32
  moe_router_topk: 2
training:
  seq_length: 32
  global_batch_size: 8
  train_iters: 10
  lr: 1.0e-3
)";

}  // namespace moeforge::test
