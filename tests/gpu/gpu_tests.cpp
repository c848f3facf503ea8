// GPU tests (ctest label `gpu`): the CUDA path against the CPU path of the same code. Exits 77
// (ctest: skipped, shown as such) where no GPU is visible.
#define CATCH_CONFIG_RUNNER
#include "../unit/train_fixture.h"
#include "core/kernels/self_check.h"
#include "core/kernels/wgrad_accumulation.h"

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cstdio>
#include <set>
#include <string>

using namespace moeforge;
using namespace moeforge::test;

namespace {

struct Run {
  std::vector<double> lm_loss, grad_norm;
  std::vector<nlohmann::json> metrics;
};

Run train_on(const std::string& config, const std::string& device, bool bf16, const TempDir& dir) {
  const std::string name = device + (bf16 ? "_bf16" : "_fp32");
  train(config, fmt::format("--set hardware.device={} --set training.bf16={} --set training.train_iters=3 --set "
                            "training.eval_iters=0 --set logging.run_dir={}",
                            device, bf16, (dir.path() / name).string()));
  Run r;
  for (const auto& m : read_metrics(dir.path() / name / "metrics.jsonl")) {
    r.lm_loss.push_back(m["lm_loss"].get<double>());
    r.grad_norm.push_back(m["grad_norm"].get<double>());
    r.metrics.push_back(m);
  }
  return r;
}

}  // namespace

TEST_CASE("every fused CUDA kernel equals its reference composition (the start-up self-check)", "[gpu][kernels]") {
  kernels::set_choice(KernelChoice::fused);
  const auto checks = kernels::check_kernels(torch::Device(torch::kCUDA, 0));
  std::set<std::string> checked;
  for (const auto& c : checks) {
    INFO(kernels::kernel_name(c.kernel) << " " << c.detail << ": error " << c.error);
    CHECK(c.ok);
    checked.insert(kernels::kernel_name(c.kernel));
  }
  CHECK(checked.size() == static_cast<size_t>(kernels::kNumKernels));
}

TEST_CASE("the mixed-dtype probe on CUDA: the way it keeps adds a bf16 weight gradient into fp32 as the host does",
          "[gpu][kernels]") {
  const torch::Device cuda(torch::kCUDA, 0);
  const auto refused = kernels::probe_mixed_accumulate(cuda);
  std::printf("mixed-dtype accumulation on CUDA: %s%s%s\n", kernels::mixed_accumulate_name(kernels::mixed_accumulate_mode()),
              refused.empty() ? "" : "; ", refused.c_str());
  const auto g_NM = torch::randn({257, 96}).to(torch::kBFloat16);
  const auto x_NJ = torch::randn({257, 80}).to(torch::kBFloat16);
  const auto start_MJ = torch::randn({96, 80});
  const auto want = start_MJ.to(torch::kFloat64) + g_NM.to(torch::kFloat64).t().mm(x_NJ.to(torch::kFloat64));
  auto main_grad_MJ = start_MJ.to(cuda);
  kernels::accumulate_wgrad(main_grad_MJ, g_NM.to(cuda), x_NJ.to(cuda));
  const auto got = main_grad_MJ.to(torch::kCPU, torch::kFloat64);
  CHECK((got - want).norm().item<double>() / want.norm().item<double>() < 1e-5);
}

TEST_CASE("training steps on CUDA equal the same steps on the CPU", "[gpu][train]") {
  TempDir dir;
  const auto config = write_config(dir);
  for (const bool bf16 : {false, true}) {
    INFO((bf16 ? "bf16" : "fp32"));
    const Run cpu = train_on(config, "cpu", bf16, dir), cuda = train_on(config, "cuda", bf16, dir);
    REQUIRE(cpu.lm_loss.size() == 3);
    REQUIRE(cuda.lm_loss.size() == 3);
    // fp32: the same math in another order; bf16: rounding of weights and activations.
    const double loss_tol = bf16 ? 1e-2 : 1e-5, norm_tol = bf16 ? 1e-2 : 1e-4;
    for (size_t i = 0; i < 3; ++i) {
      INFO("iteration " << i + 1 << ": lm loss cpu " << cpu.lm_loss[i] << " cuda " << cuda.lm_loss[i] << ", grad norm cpu "
                        << cpu.grad_norm[i] << " cuda " << cuda.grad_norm[i]);
      CHECK(relative(cuda.lm_loss[i], cpu.lm_loss[i]) < loss_tol);
      CHECK(relative(cuda.grad_norm[i], cpu.grad_norm[i]) < norm_tol);
      // The CPU counts where a GPU waits (core/device/host_sync.h); on CUDA LibTorch reports every sync,
      // its hidden ones included: a difference names an op that synchronizes.
      const auto& m = cuda.metrics[i];
      CHECK(m["host_syncs"] == cpu.metrics[i]["host_syncs"]);
      // CUDA-event phases: device time, within the host's step time.
      double phases = 0;
      for (const char* key : {"time_forward_s", "time_backward_s", "time_optimizer_s"}) {
        INFO(key << " " << m[key]);
        CHECK(m[key].get<double>() > 0);
        phases += m[key].get<double>();
      }
      CHECK(phases <= 1.05 * m["step_time_s"].get<double>());
    }
  }
}

int main(int argc, char** argv) {
  if (!torch::cuda::is_available()) {
    std::printf("skipped: no GPU visible\n");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
