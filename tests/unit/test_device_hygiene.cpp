// Device hygiene of the training path as a test (docs/gpu.md): every tensor the model and the
// training runtime create is made on the device of the data it meets, or is marked as host-resident
// with the reason; every device-to-host read goes through core/device/host_sync.h's to_host, so that it is
// counted in metrics.jsonl's host_syncs. A lint over the sources: a CPU run cannot see a tensor made
// on the wrong device (everything is on the CPU), so the rule is checked where it is written.
#include "test_paths.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

const fs::path kRoot = moeforge::test::source_dir();

// What runs every step, on the training device. Not here: the CPU kernels (host by definition),
// checkpoint I/O, configuration, data (host bytes the trainer copies with to_device), the
// communicators (they move what they are given).
const std::vector<std::string> kTrainingPath = {
    "core/model/gpt_model.cpp",       "core/model/transformer.cpp",    "core/model/recompute.cpp",
    "core/optim/optimizer.cpp",       "core/kernels/adamw.cpp",  "core/kernels/cross_entropy.cpp",
    "core/kernels/grouped_gemm.cpp", "core/kernels/moe_permute.cpp", "core/kernels/rmsnorm.cpp",
    "core/kernels/rope.cpp",    "core/kernels/swiglu.cpp", "core/kernels/wgrad_accumulation.cpp",
    "moe/dispatcher.cpp",
    "moe/experts.cpp",          "moe/moe_layer.cpp",       "moe/router.cpp",
    "parallel/alltoall_dispatcher.cpp", "parallel/data_parallel_optimizer.cpp", "parallel/grad_sync.cpp",
    "parallel/pipeline.cpp",    "launch/train/trainer.cpp"};

// What runs once at start-up on the training device: its tensors meet device tensors as the
// step's do (the self-check once subtracted a host reference from a device result), but its
// device reads are start-up reads, not step syncs, so only the factory rule applies.
const std::vector<std::string> kStartupDevicePath = {"core/kernels/self_check.cpp", "core/kernels/kernel_checks.cpp"};

std::string slurp(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

int line_of(const std::string& text, size_t pos) {
  return 1 + static_cast<int>(std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(pos), '\n'));
}

// The source line holding `pos` and the one before it (where a "// host:" reason may stand).
std::string lines_around(const std::string& text, size_t pos) {
  const size_t end = text.find('\n', pos);
  size_t begin = text.rfind('\n', pos);
  begin = begin == std::string::npos ? 0 : begin;
  if (begin > 0) begin = text.rfind('\n', begin - 1);
  begin = begin == std::string::npos ? 0 : begin;
  return text.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
}

// "file:line: statement" for each match of `pattern` whose statement (to the next ';') lacks all of
// `allowed` and that carries no "// host:" reason.
std::vector<std::string> violations(const std::regex& pattern, const std::vector<std::string>& allowed,
                                    const std::vector<std::string>& files = kTrainingPath) {
  std::vector<std::string> found;
  for (const auto& file : files) {
    const auto text = slurp(kRoot / file);
    REQUIRE_FALSE(text.empty());
    for (auto it = std::sregex_iterator(text.begin(), text.end(), pattern); it != std::sregex_iterator(); ++it) {
      const auto pos = static_cast<size_t>(it->position());
      const auto statement = text.substr(pos, text.find(';', pos) - pos);
      bool ok = lines_around(text, pos).find("// host:") != std::string::npos;
      for (const auto& a : allowed) ok = ok || statement.find(a) != std::string::npos;
      if (!ok) found.push_back(fmt::format("{}:{}: {}", file, line_of(text, pos), statement.substr(0, 100)));
    }
  }
  return found;
}

}  // namespace

TEST_CASE("the training path makes its tensors on the model's device or says why they stay on the host",
          "[hygiene][device]") {
  // A factory without options makes a CPU tensor; on a GPU run it meets CUDA tensors (an error) or
  // is copied each use (a sync).
  const std::regex factory(R"(torch::(zeros|ones|empty|full|arange|tensor|rand|randn|randint|eye|linspace)\()");
  auto files = kTrainingPath;
  files.insert(files.end(), kStartupDevicePath.begin(), kStartupDevicePath.end());
  const auto found = violations(factory, {"options", "device", "_like", "to_device(", "kCUDA"}, files);
  INFO("tensor factories without a device (pass the options of the tensor they meet, or add a '// host: why' "
       "comment):\n" << fmt::format("{}", fmt::join(found, "\n")));
  CHECK(found.empty());
}

TEST_CASE("the training path reads the device only through to_host, so host_syncs counts every read",
          "[hygiene][device]") {
  const std::regex read(R"(\.cpu\(\)|\.to\(torch::kCPU|\.to\(at::kCPU|torch::cuda::synchronize)");
  const auto found = violations(read, {});
  INFO("device-to-host reads outside to_host (core/device/host_sync.h):\n" << fmt::format("{}", fmt::join(found, "\n")));
  CHECK(found.empty());
}
