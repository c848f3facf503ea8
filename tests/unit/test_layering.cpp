// The architecture as a test (docs/architecture.md): which folder may include which. The training
// runtime (launch/train) never includes a command; model code (core, moe) knows nothing of MPI or
// of the parallel runtime; data knows no model; nothing below launch/ includes launch/. Within core/
// and parallel/, each sub-folder is one library and includes only the sub-folders below it.
#include "test_paths.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <regex>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

const fs::path kRoot = moeforge::test::source_dir();

// "file:line: #include ..." for every include in `folder` that starts with one of `forbidden`.
std::vector<std::string> includes_of(const std::string& folder, const std::vector<std::string>& forbidden) {
  static const std::regex include(R"(^\s*#\s*include\s*[<"]([^>"]+)[>"])");
  std::vector<std::string> found;
  for (const auto& entry : fs::recursive_directory_iterator(kRoot / folder)) {
    const auto ext = entry.path().extension();
    if (ext != ".h" && ext != ".cpp" && ext != ".cu" && ext != ".cuh") continue;
    std::ifstream in(entry.path());
    std::string line;
    for (int n = 1; std::getline(in, line); ++n) {
      std::smatch m;
      if (!std::regex_search(line, m, include)) continue;
      for (const auto& prefix : forbidden) {
        if (m[1].str().starts_with(prefix)) {
          found.push_back(fmt::format("{}:{}: {}", fs::relative(entry.path(), kRoot).string(), n, line));
        }
      }
    }
  }
  return found;
}

std::string text_of(const fs::path& path) {
  std::ifstream in(path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST_CASE("the training runtime never includes a command", "[layering]") {
  const auto found = includes_of("launch/train", {"launch/commands/", "CLI/"});
  INFO(fmt::format("{}", fmt::join(found, "\n")));
  CHECK(found.empty());
}

TEST_CASE("model code knows nothing of MPI, the parallel runtime or the commands", "[layering]") {
  for (const std::string folder : {"core", "moe"}) {
    const auto found = includes_of(folder, {"parallel/", "launch/", "data/", "mpi.h", "nccl.h"});
    INFO(folder << ":\n" << fmt::format("{}", fmt::join(found, "\n")));
    CHECK(found.empty());
  }
  // The MoE library builds and links without MPI.
  const std::string moe_cmake = text_of(kRoot / "moe/CMakeLists.txt");
  CHECK(moe_cmake.find("moeforge::comm") == std::string::npos);
  CHECK(moe_cmake.find("moeforge::mpi") == std::string::npos);
  CHECK(moe_cmake.find("moeforge::parallel") == std::string::npos);
}

TEST_CASE("data knows no model and no parallel runtime, parallel knows no commands", "[layering]") {
  const auto data = includes_of("data", {"moe/", "parallel/", "launch/", "core/model/", "core/optim/"});
  INFO(fmt::format("{}", fmt::join(data, "\n")));
  CHECK(data.empty());
  const auto parallel = includes_of("parallel", {"launch/"});
  INFO(fmt::format("{}", fmt::join(parallel, "\n")));
  CHECK(parallel.empty());
}

TEST_CASE("within core, each sub-folder includes only those below it: base, files, config, flops, device, kernels, "
          "model, optim",
          "[layering]") {
  const std::vector<std::string> order = {"base", "files", "config", "flops", "device", "kernels", "model", "optim"};
  for (size_t i = 0; i < order.size(); ++i) {
    std::vector<std::string> above;
    for (size_t j = i + 1; j < order.size(); ++j) above.push_back("core/" + order[j] + "/");
    const auto found = includes_of("core/" + order[i], above);
    INFO("core/" << order[i] << ":\n" << fmt::format("{}", fmt::join(found, "\n")));
    CHECK(found.empty());
  }
  // Every source lies in a sub-folder (its library): none at core/'s top.
  for (const auto& entry : fs::directory_iterator(kRoot / "core")) {
    INFO(entry.path().string());
    CHECK((entry.is_directory() || entry.path().filename() == "CMakeLists.txt"));
    if (entry.is_directory()) {
      CHECK(std::find(order.begin(), order.end(), entry.path().filename().string()) != order.end());
    }
  }
}

TEST_CASE("within parallel, layout includes neither comm nor the runtime, and comm not the runtime", "[layering]") {
  // The runtime's own headers sit at parallel/'s top.
  std::vector<std::string> runtime;
  for (const auto& entry : fs::directory_iterator(kRoot / "parallel")) {
    if (entry.path().extension() == ".h") runtime.push_back("parallel/" + entry.path().filename().string());
  }
  REQUIRE_FALSE(runtime.empty());
  auto above_layout = runtime;
  above_layout.push_back("parallel/comm/");
  const auto layout = includes_of("parallel/layout", above_layout);
  INFO(fmt::format("{}", fmt::join(layout, "\n")));
  CHECK(layout.empty());
  const auto comm = includes_of("parallel/comm", runtime);
  INFO(fmt::format("{}", fmt::join(comm, "\n")));
  CHECK(comm.empty());
}

TEST_CASE("no test name holds a semicolon: ctest would split it into two entries that run nothing", "[layering]") {
  // catch_discover_tests passes each name through a CMake list, which ';' separates: the halves
  // match no test, and Catch reports success having run nothing (six tests, the kill -9 resume
  // test among them, ran nowhere in CI that way).
  static const std::regex name(R"(TEST_CASE\("([^"]*;[^"]*)\")");
  std::vector<std::string> found;
  for (const auto& entry : fs::recursive_directory_iterator(kRoot / "tests")) {
    if (entry.path().extension() != ".cpp") continue;
    std::ifstream in(entry.path());
    std::string line;
    for (int n = 1; std::getline(in, line); ++n) {
      std::smatch m;
      if (std::regex_search(line, m, name)) found.push_back(fmt::format("{}:{}: {}", entry.path().filename().string(), n, m[1].str()));
    }
  }
  INFO(fmt::format("{}", fmt::join(found, "\n")));
  CHECK(found.empty());
}
