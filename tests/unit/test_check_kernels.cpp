// `moeforge check kernels` (docs/kernels.md): the kernel conformance suite as a command. The
// comparisons are the fused kernels against their LibTorch reference compositions, made by the
// command; these tests check that every kernel x dtype x shape set is there and passes, that a
// forced failure is measured as the closed form says (a result scaled by 1.5 is 0.5 away) and
// named, and that bad input is a clear error.
#include "core/kernels/kernel_checks.h"
#include "launch/commands/check_command.h"
#include "test_util.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <map>
#include <set>
#include <sstream>

using namespace moeforge;
using Catch::Matchers::Contains;
using test::run_command;

namespace {

const std::string kBin = test::moeforge_binary();

// Every kernel fused on the CPU (where this machine has AVX2 and FMA: otherwise none is).
std::set<std::string> cpu_fused() {
  std::set<std::string> names;
  for (int k = 0; k < kernels::kNumKernels; ++k) {
    if (kernels::fused(static_cast<kernels::Kernel>(k), c10::DeviceType::CPU)) names.insert(kernels::kernel_name(static_cast<kernels::Kernel>(k)));
  }
  return names;
}

nlohmann::json checks_of(const std::string& output) {
  const auto j = nlohmann::json::parse(output.substr(output.find('{')));
  return j;
}

}  // namespace

TEST_CASE("check kernels --json on the CPU: every fused kernel x dtype x shape set is checked and passes", "[cli][check_kernels]") {
  const auto r = run_command(kBin + " check kernels --json 2>/dev/null");
  REQUIRE(r.exit_code == 0);
  const auto j = checks_of(r.output);
  CHECK(j["device"] == "cpu");
  CHECK(j["pass"] == true);
  CHECK(j["failed"].empty());
  CHECK(j["forced_failure"].is_null());
  const auto fused = cpu_fused();
  CHECK(j["fused_kernels"].get<std::set<std::string>>() == fused);
  std::map<std::string, std::set<std::string>> seen;  // kernel -> "dtype shapes"
  for (const auto& c : j["checks"]) {
    INFO(c.dump());
    CHECK(c["pass"] == true);
    for (const char* key : {"kernel", "function", "dtype", "shapes", "shape", "forward_error", "gradient_error", "tolerance", "detail"}) {
      CHECK(c.contains(key));
    }
    CHECK(c["tolerance"].get<double>() == (c["dtype"] == "bf16" && c["kernel"] != "wgrad_accumulation" ? 3e-2 : 1e-4));
    seen[c["kernel"].get<std::string>()].insert(c["dtype"].get<std::string>() + " " + c["shapes"].get<std::string>());
  }
  // The kernels with autograd run in both dtypes at every shape set; AdamW in fp32, the fused weight
  // gradient in bf16; the grouped GEMM where its probe allows (aligned rows: the start-up and
  // mission shapes).
  for (const auto& name : fused) {
    INFO(name);
    const std::set<std::string> all{"fp32 start-up", "fp32 odd", "fp32 empty", "fp32 mission",
                                    "bf16 start-up", "bf16 odd", "bf16 empty", "bf16 mission"};
    if (name == "adamw") {
      CHECK(seen[name] == std::set<std::string>{"fp32 start-up", "fp32 odd", "fp32 empty", "fp32 mission"});
    } else if (name == "wgrad_accumulation") {
      CHECK(seen[name] == std::set<std::string>{"bf16 start-up", "bf16 odd", "bf16 empty", "bf16 mission"});
    } else if (name == "grouped_gemm") {
      CHECK(seen[name].count("fp32 mission") == 1);
    } else {
      CHECK(seen[name] == all);
    }
  }
}

TEST_CASE("check kernels --dtype fp32 prints a table with a row per fp32 check and exits 0", "[cli][check_kernels]") {
  const auto table = run_command(kBin + " check kernels --dtype fp32 2>&1");
  REQUIRE(table.exit_code == 0);
  const auto json = run_command(kBin + " check kernels --dtype fp32 --json 2>/dev/null");
  REQUIRE(json.exit_code == 0);
  const auto j = checks_of(json.output);
  CHECK(j["dtypes"] == nlohmann::json::array({"fp32"}));
  REQUIRE_FALSE(j["checks"].empty());
  for (const auto& c : j["checks"]) CHECK(c["dtype"] == "fp32");
  CHECK_THAT(table.output, Contains("check kernels on cpu:") && Contains("forward error") && Contains("gradient error") &&
                               Contains("tolerance") && Contains("0 failed"));
  std::istringstream lines(table.output);
  size_t rows = 0, bf16 = 0;
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("kernel ", 0) != 0 && line.size() > 6 && line.substr(line.size() - 6) == "  pass") ++rows;  // not the header
    if (line.find(" bf16 ") != std::string::npos) ++bf16;
  }
  CHECK(rows == j["checks"].size());
  CHECK(bf16 == 0);
  CHECK_THAT(table.output, Contains("[4, 2048] [2048]") && Contains("[4, 5632] [4, 5632]") && Contains("[0, 32] [32]"));
}

TEST_CASE("a forced failure exits 1 naming the kernel and is measured as the closed form says", "[cli][check_kernels]") {
  REQUIRE(cpu_fused().count("rmsnorm") == 1);
  const auto r = run_command("MOEFORGE_CHECK_KERNELS_FAIL=rmsnorm " + kBin + " check kernels --dtype fp32 --json");
  CHECK(r.exit_code == 1);
  // The JSON on stdout, then the error line on stderr.
  const auto end = r.output.rfind("\n}") + 2;
  CHECK_THAT(r.output.substr(end), Contains("error: ") && Contains("failed: rmsnorm disagree") &&
                                       Contains("(forced by MOEFORGE_CHECK_KERNELS_FAIL)"));
  const auto j = checks_of(r.output.substr(0, end));
  CHECK(j["pass"] == false);
  CHECK(j["failed"] == nlohmann::json::array({"rmsnorm"}));
  CHECK(j["forced_failure"] == "rmsnorm");
  for (const auto& c : j["checks"]) {
    INFO(c.dump());
    CHECK(c["pass"] == (c["kernel"] != "rmsnorm" || c["shapes"] == "empty"));  // nothing to scale in an empty tensor
    // The fused result (and so its gradients) scaled by 1.5: |1.5 a - b| / |b| = 0.5 where a = b
    // within the tolerance. The empty shapes have nothing to scale.
    if (c["kernel"] == "rmsnorm" && c["shapes"] != "empty") {
      CHECK(c["forward_error"].get<double>() == Approx(0.5).margin(c["tolerance"].get<double>()));
      CHECK(c["gradient_error"].get<double>() == Approx(0.5).margin(c["tolerance"].get<double>()));
    }
  }
}

TEST_CASE("check kernels: an unknown device or dtype or forced kernel and an absent GPU are clear errors", "[cli][check_kernels][errors]") {
  auto r = run_command(kBin + " check kernels --device tpu");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("--device") && Contains("tpu") && Contains("cpu") && Contains("emulated"));
  r = run_command(kBin + " check kernels --dtype fp16");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("--dtype") && Contains("fp16") && Contains("bf16"));
  r = run_command("MOEFORGE_CHECK_KERNELS_FAIL=rmsnrom " + kBin + " check kernels");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("error: MOEFORGE_CHECK_KERNELS_FAIL=rmsnrom names no kernel") &&
                           Contains(kernels::kernel_names()));
  r = run_command("MOEFORGE_CHECK_KERNELS_FAIL=adamw " + kBin + " check kernels --dtype bf16");
  CHECK(r.exit_code == 1);
  CHECK_THAT(r.output, Contains("error: MOEFORGE_CHECK_KERNELS_FAIL=adamw: --dtype bf16 runs no check of it"));
  r = run_command(kBin + " check");  // a subcommand is required
  CHECK(r.exit_code == 1);
  if (!torch::cuda::is_available()) {
    r = run_command(kBin + " check kernels --device cuda");
    CHECK(r.exit_code == 1);
    CHECK_THAT(r.output, Contains("error: --device cuda:") && Contains("--device cpu"));
    CHECK_THAT(r.output, !Contains("internal error"));
  }
}

TEST_CASE("check kernels on the emulated accelerator checks the kernels it runs fused", "[cli][check_kernels][emulated]") {
  const auto r = run_command(kBin + " check kernels --device emulated --json 2>/dev/null");
  REQUIRE(r.exit_code == 0);
  const auto j = checks_of(r.output);
  CHECK(j["device"] == "emulated:0");
  // Only what is itself a LibTorch composition runs fused there (core/kernels/kernels.cpp).
  CHECK(j["fused_kernels"] == nlohmann::json::array({"grouped_gemm", "wgrad_accumulation"}));
  CHECK(j["pass"] == true);
  for (const auto& c : j["checks"]) CHECK(c["pass"] == true);
}

TEST_CASE("check kernels on a device without fused kernels says so and exits 0", "[check_kernels]") {
  kernels::set_choice(KernelChoice::reference);  // nothing runs fused: as a device without kernels of its own
  std::ostringstream out;
  const int code = run_check_kernels(CheckKernelsOptions{}, out);
  kernels::set_choice(KernelChoice::fused);
  CHECK(code == 0);
  CHECK_THAT(out.str(), Contains("cpu has no fused kernels of its own") && Contains("nothing to check"));
}
