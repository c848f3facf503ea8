// `moeforge report`: numbers recomputed from the metrics by a numpy oracle, the accuracy verdict at
// FlagPerf's threshold, Megatron-LM log lines as the reference, and report.html opened in a real
// headless browser (chromium).
#include "launch/commands/report_plots.h"
#include "launch/train/energy.h"
#include "launch/train/fingerprint.h"
#include "launch/train/run_environment.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <vector>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// A Megatron-LM training log line (megatron/training/training.py's format) for iteration `it`.
std::string megatron_line(int it, double loss, double ms) {
  return fmt::format(" [2024-05-06 10:{:02d}:00] iteration {:>8}/     100 | consumed samples: {:>12} | elapsed time per "
                     "iteration (ms): {:.1f} | throughput per GPU (TFLOP/s/GPU): 123.4 | learning rate: 9.876543E-06 | "
                     "global batch size:   512 | lm loss: {:.6E} | load_balancing_loss: 1.012345E+00 | loss scale: 1.0 | "
                     "grad norm: 1.234 | number of skipped iterations:   0 | number of nan iterations:   0 |\n",
                     it % 60, it, it * 512, ms, loss);
}

}  // namespace

TEST_CASE("report of a 2-rank run against a single-process reference: numbers equal the numpy oracle", "[report][mpi]") {
  TempDir dir;
  const auto config = write_config(dir);
  const std::string common = " --set training.train_iters=6 --set training.eval_iters=0 --set training.lr_warmup_iters=1";
  for (const auto& [launcher, name] : {std::pair{kMpirun + " -np 2 " + kBin, "dp2"}, std::pair{kBin, "single"}}) {
    const auto r = run_command(launcher + " train " + config + common + " --set logging.run_dir=" + (dir.path() / name).string());
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
  }
  const auto run = dir.path() / "dp2";
  const auto r = run_command(kBin + " report " + run.string() + " --reference " + (dir.path() / "single").string() +
                             " --warmup 1 --from-iteration 2");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK_THAT(r.output, Contains("TP1xPP1xDP2xEP1") && Contains("PASS"));
  for (const char* f : {"report.json", "report.md", "report.html"}) CHECK(fs::exists(run / "report" / f));
  const auto rep = read_json(run / "report" / "report.json");
  const auto oracle_out = (dir.path() / "oracle.json").string();
  run_oracle("report_oracle.py", (run / "metrics.jsonl").string() + " " + (dir.path() / "single" / "metrics.jsonl").string() +
                                     " 1 2 " + oracle_out);
  const auto expected = read_json(oracle_out);
  for (const auto& [key, stats] : expected["steady"].items()) {
    for (const auto& [stat, value] : stats.items()) {
      INFO(key << "." << stat);
      CHECK(rep["steady_state"][key][stat].get<double>() == Approx(value.get<double>()).epsilon(1e-12).margin(1e-15));
    }
  }
  CHECK(rep["steady_state"]["iterations"] == 5);
  CHECK(rep["result"]["tokens_per_s_per_chip"].get<double>() == Approx(expected["steady"]["tokens_per_s_per_device"]["median"].get<double>()));
  CHECK(rep["result"]["mfu"]["megatron"].get<double>() == Approx(expected["steady"]["mfu"]["median"].get<double>()));
  CHECK(rep["result"]["devices"] == 2);
  CHECK(rep["result"]["precision"] == "fp32");
  CHECK(rep["accuracy"]["compared_iterations"] == expected["compared"]);
  CHECK(rep["accuracy"]["mean_relative_error"].get<double>() ==
        Approx(expected["mean_relative_error"].get<double>()).margin(1e-12));
  CHECK(rep["accuracy"]["pass"] == true);
  const auto& env = rep["environment"];
  CHECK(env["hostnames"].size() == 2);
  CHECK_THAT(env["command"].get<std::string>(), Contains("train") && Contains("logging.run_dir="));
  CHECK(env.contains("libtorch"));
  CHECK(env.contains("mpi"));
  // The per-rank view: each rank's median over the steady iterations (after the 1 of warm-up) of
  // what metrics.jsonl recorded for it.
  const auto metrics = read_metrics(run / "metrics.jsonl");
  REQUIRE(rep["per_rank"]["ranks"] == 2);
  for (const char* key : {"compute_s", "all_to_all_s", "grad_reduce_s", "step_s"}) {
    for (size_t rank = 0; rank < 2; ++rank) {
      INFO(key << " rank " << rank);
      std::vector<double> v;
      for (size_t i = 1; i < metrics.size(); ++i) v.push_back(metrics[i]["rank_times"][key][rank].get<double>());
      std::sort(v.begin(), v.end());
      const double median = v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
      CHECK(rep["per_rank"][key][rank].get<double>() == Approx(median).epsilon(1e-12));
    }
  }
  CHECK_THAT(slurp((run / "report" / "report.md").string()), Contains("| config | precision | parallel (TPxPPxDPxEP)"));

  SECTION("several runs: a report each and a comparison against the first") {
    const auto cmp = dir.path() / "cmp";
    const auto c = run_command(kBin + " report " + run.string() + " " + (dir.path() / "single").string() + "/ --out " +
                               cmp.string());
    INFO(c.output);
    REQUIRE(c.exit_code == 0);
    CHECK(fs::exists(cmp / "dp2" / "report.html"));
    CHECK(fs::exists(cmp / "single" / "report.html"));
    const auto comparison = read_json(cmp / "comparison.json");
    REQUIRE(comparison["runs"].size() == 2);
    CHECK(comparison["runs"][0]["tokens_per_s_per_chip_vs_baseline"] == 1.0);
    const auto single_rep = read_json(cmp / "single" / "report.json");
    CHECK(comparison["runs"][1]["tokens_per_s_per_chip_vs_baseline"].get<double>() ==
          Approx(single_rep["result"]["tokens_per_s_per_chip"].get<double>() /
                 rep["result"]["tokens_per_s_per_chip"].get<double>()));
    CHECK_THAT(slurp((cmp / "comparison.md").string()), Contains("TP1xPP1xDP2xEP1") && Contains("TP1xPP1xDP1xEP1"));
    CHECK(fs::exists(cmp / "comparison.html"));
  }
  SECTION("GPU memory: a CUDA run's row is the peak reserved device memory over the device total") {
    // A CPU run records host memory only; its metrics made into a CUDA run's as the trainer writes
    // them there (launch/train/metrics.cpp), with known values.
    CHECK_FALSE(read_metrics(run / "metrics.jsonl")[0].contains("peak_memory_reserved_bytes"));
    CHECK(rep["result"]["peak_memory_kind"].get<std::string>().find("host") != std::string::npos);
    const auto gpu = dir.path() / "gpu";
    fs::create_directories(gpu);
    for (const auto& f : fs::directory_iterator(run)) {
      if (f.is_regular_file()) fs::copy_file(f.path(), gpu / f.path().filename());
    }
    std::ofstream out(gpu / "metrics.jsonl", std::ios::trunc);
    int64_t i = 0;
    for (auto m : read_metrics(run / "metrics.jsonl")) {
      m["peak_memory_allocated_bytes"] = (++i) << 30;
      m["peak_memory_reserved_bytes"] = (i + 1) << 30;
      m["device_memory_total_bytes"] = int64_t{150} << 30;
      out << m.dump() << "\n";
    }
    out.close();
    const auto g = run_command(kBin + " report " + gpu.string());
    INFO(g.output);
    REQUIRE(g.exit_code == 0);
    const auto gpu_rep = read_json(gpu / "report" / "report.json");
    CHECK(gpu_rep["result"]["peak_memory_used_bytes"] == ((i + 1) << 30));  // the largest reserved, not RSS
    CHECK(gpu_rep["result"]["peak_memory_total_bytes"] == (int64_t{150} << 30));
    CHECK(gpu_rep["result"]["peak_memory_kind"].get<std::string>().find("GPU") != std::string::npos);
  }
  SECTION("report.html renders in a real headless browser: every plot is there") {
    const auto browser = run_command("command -v chromium || command -v chromium-browser || command -v google-chrome");
    INFO("no chromium: install it with bash launch/setup.sh (apt package chromium)");
    REQUIRE(browser.exit_code == 0);
    std::string bin = browser.output;
    bin.erase(bin.find_last_not_of("\n") + 1);
    const auto dom = run_command("timeout 120 " + bin + " --headless --no-sandbox --disable-gpu --disable-dev-shm-usage "
                                 "--user-data-dir=" + (dir.path() / "chromium").string() + " --dump-dom file://" +
                                 (run / "report" / "report.html").string() + " 2>/dev/null");
    REQUIRE(dom.exit_code == 0);
    // The page's script ran in the browser and counted the plots (loss, MFU, throughput, time,
    // communication of the 2-rank run, expert load, the per-layer load heatmap, the step per rank) and
    // the tokens-per-expert histogram of each of the 2 MoE layers (expert_loads.jsonl).
    CHECK_THAT(dom.output, Contains("data-plots=\"10\"") && Contains("Communication per iteration") &&
                               Contains("Step time per rank") &&
                               Contains("Expert load per MoE layer"));
    CHECK_THAT(dom.output, Contains("<polyline") && Contains("PASS"));
  }
}

TEST_CASE("report verdict at FlagPerf's threshold, against a Megatron-LM log", "[report]") {
  TempDir dir;
  const auto config = write_config(dir);
  // A run logged for 30 iterations at loss 1, reference losses from a Megatron log.
  const auto run = dir.path() / "run";
  REQUIRE(run_command(kBin + " train " + config + " --set training.train_iters=1 --set training.eval_iters=0 "
                      "--set training.lr_warmup_iters=0 --set logging.run_dir=" + run.string()).exit_code == 0);
  {
    const auto first = read_json(run / "metrics.jsonl");
    std::ofstream out(run / "metrics.jsonl");
    for (int it = 1; it <= 30; ++it) {
      json m = first;
      m["iteration"] = it;
      m["lm_loss"] = 1.0;
      out << m.dump() << "\n";
    }
  }
  auto verdict = [&](double error) {
    // |1 - r| / r = error from iteration 21 on; iterations before 21 are far off and must not count.
    const auto log = dir.path() / fmt::format("megatron_{}.log", error);
    {
      std::ofstream out(log);
      out << "using world size: 8, data-parallel size: 4\n";
      for (int it = 1; it <= 30; ++it) out << megatron_line(it, it < 21 ? 2.0 : 1.0 / (1.0 + error), 70412.3);
    }
    const auto r = run_command(kBin + " report " + run.string() + " --reference " + log.string() + " --out " +
                               (dir.path() / fmt::format("out_{}", error)).string());
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    return read_json(dir.path() / fmt::format("out_{}", error) / "report.json")["accuracy"];
  };
  const auto below = verdict(0.0199), above = verdict(0.0201);
  CHECK(below["pass"] == true);
  CHECK(above["pass"] == false);
  CHECK(below["compared_iterations"] == 10);
  CHECK(below["from_iteration"] == 21);
  CHECK(below["mean_relative_error"].get<double>() == Approx(0.0199).epsilon(1e-5));
  CHECK(below["reference_kind"] == "Megatron-LM log");
  CHECK(below["reference_step_time_s"]["median"].get<double>() == Approx(70.4123));
  CHECK(below["per_step"][0]["iteration"] == 21);

  const auto none = run_command(kBin + " report " + run.string() + " --reference " + config);
  CHECK(none.exit_code == 1);
  CHECK_THAT(none.output, Contains("no loss found"));
  const auto missing = run_command(kBin + " report " + (dir.path() / "nowhere").string());
  CHECK(missing.exit_code == 1);
  CHECK_THAT(missing.output, Contains("metrics.jsonl: not found"));
}

TEST_CASE("report plots: ticks at 1, 2 or 5 times a power of ten, whole iterations, none below zero", "[report][plots]") {
  // The ranges that gave ticks at 10.75 and 20.5 and a tick at -88 before.
  CHECK(nice_axis(10.75, 20.5, 6, true, true).ticks == std::vector<double>{10, 12, 14, 16, 18, 20, 22});
  CHECK(nice_axis(1, 3, 6, true, true).ticks == std::vector<double>{1, 2, 3});
  CHECK(nice_axis(12.3, 19.8, 5, false, true).ticks == std::vector<double>{12, 14, 16, 18, 20});
  CHECK(nice_axis(7, 7, 5, true, true).ticks == std::vector<double>{6, 7, 8});
  std::mt19937 rng(7);
  for (int trial = 0; trial < 2000; ++trial) {
    const double scale = std::pow(10.0, static_cast<int>(rng() % 16) - 8);
    double lo = scale * (rng() % 1000) / 10.0, hi = lo + scale * (rng() % 1000) / 10.0;
    const bool integer = trial % 3 == 0;
    if (integer) lo = std::floor(lo * 1e6), hi = std::ceil(hi * 1e6);  // iterations
    INFO("[" << lo << ", " << hi << "] integer " << integer);
    const auto a = nice_axis(lo, hi, 5, integer, true);
    REQUIRE(a.ticks.size() >= 2);
    CHECK(a.ticks.size() <= 12);
    CHECK(a.lo <= lo);
    CHECK(a.hi >= hi);
    CHECK(a.lo >= 0);
    const double step = a.ticks[1] - a.ticks[0];
    const double mantissa = step / std::pow(10.0, std::floor(std::log10(step) + 1e-9));
    CHECK((std::abs(mantissa - 1) < 1e-6 || std::abs(mantissa - 2) < 1e-6 || std::abs(mantissa - 5) < 1e-6));
    for (size_t i = 0; i < a.ticks.size(); ++i) {
      CHECK(std::abs(a.ticks[i] - (a.ticks[0] + static_cast<double>(i) * step)) <= 1e-9 * std::max(1.0, std::abs(a.hi)));
      if (integer) CHECK(a.ticks[i] == std::round(a.ticks[i]));
    }
  }
}

TEST_CASE("report.html: whole iterations on every x axis, no negative tick, warm-up shaded, a heatmap per layer",
          "[report][plots]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto run = dir.path() / "run";
  train(config, "--set training.train_iters=12 --set training.eval_iters=0 --set logging.run_dir=" + run.string());
  const auto r = run_command(kBin + " report " + run.string());
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  const auto html = slurp((run / "report" / "report.html").string());
  auto labels = [&](const std::string& cls) {
    std::vector<std::string> out;
    const std::string open = "class=\"" + cls + "\">";
    for (auto at = html.find(open); at != std::string::npos; at = html.find(open, at + 1)) {
      const auto begin = at + open.size();
      out.push_back(html.substr(begin, html.find('<', begin) - begin));
    }
    return out;
  };
  int numeric = 0;
  for (const auto& x : labels("xl")) {
    if (x.empty() || !(std::isdigit(static_cast<unsigned char>(x[0])) || x[0] == '-')) continue;  // the axis title
    ++numeric;
    CHECK(x.find('.') == std::string::npos);  // whole iterations
    CHECK(x[0] != '-');
  }
  CHECK(numeric > 20);
  for (const auto& y : labels("yl")) CHECK((y.empty() || y[0] != '-'));  // every plotted quantity is non-negative
  CHECK_THAT(html, Contains("class=\"warm\"") && Contains("warm-up"));
  size_t cells = 0;
  for (auto at = html.find("class=\"heat\""); at != std::string::npos; at = html.find("class=\"heat\"", at + 1)) ++cells;
  CHECK(cells == 2 * 12);  // 2 MoE layers x 12 iterations
  for (const char* unit : {"loss (nats per token)", "MFU (%)", "tokens/s per chip", "time (s)", "busiest / mean"}) {
    CHECK_THAT(html, Contains(unit));
  }
}

TEST_CASE("report: the row names the device that ran and an MFU that cannot be one is no result", "[report]") {
  TempDir dir;
  const auto config = write_config(dir);
  std::string cpu;  // the device, as /proc/cpuinfo names it
  {
    std::ifstream in("/proc/cpuinfo");
    for (std::string line; std::getline(in, line);) {
      if (line.rfind("model name", 0) == 0) {
        cpu = line.substr(line.find(':') + 2);
        break;
      }
    }
  }
  REQUIRE(!cpu.empty());
  // FlagPerf's A800 case scaled down to the fixture on this CPU (the newcomer's run of the issue).
  const auto report_of = [&](const std::string& name, const std::string& peak) {
    const auto run = dir.path() / name;
    const auto t = run_command(kBin + " train " + config + " --set training.train_iters=2 --set training.eval_iters=0 " +
                               "--set training.lr_warmup_iters=0 " +
                               "--set hardware.chip=A800 --set hardware.reference_compute_n=2.3e9 --set hardware.peak_tflops=" +
                               peak + " --set logging.run_dir=" + run.string());
    INFO(t.output);
    REQUIRE(t.exit_code == 0);
    CHECK_THAT(t.output, Contains("hardware.chip is 'A800' but this run's device is '" + cpu + "'"));
    const auto env = read_json(run / "environment.json");
    CHECK(env["chip"] == cpu);
    CHECK(env["config_chip"] == "A800");
    const auto r = run_command(kBin + " report " + run.string());
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    return read_json(run / "report" / "report.json")["result"];
  };
  // A peak no device is that low: every MFU is above 100 %.
  const auto low = report_of("low_peak", "1e-9");
  CHECK(low["chip"] == cpu);
  CHECK(low["config"].get<std::string>().rfind(cpu + " 1x1", 0) == 0);
  CHECK_THAT(low["chip_mismatch"]["message"].get<std::string>(), Contains("'A800'") && Contains("'" + cpu + "'"));
  for (const char* key : {"megatron", "six_n", "reference"}) {
    INFO(key);
    CHECK(low["mfu"][key].is_null());
    CHECK_THAT(low["mfu_invalid"][key].get<std::string>(), Contains("is above 100 %"));
  }
  // The whole layout, from the config the run resolved (one process, the fixture's micro-batch 2).
  CHECK(low["layout"] == json({{"tp", 1}, {"pp", 1}, {"virtual_stages", 1}, {"dp", 1}, {"ep", 1}, {"sequence_parallel", false},
                               {"zero", 0}, {"micro_batch_size", 2}, {"recompute", "none"}}));
  const auto md = slurp((dir.path() / "low_peak" / "report" / "report.md").string());
  CHECK_THAT(md, Contains("| layout | TP1 x PP1 x DP1 x EP1, no ZeRO, micro-batch 2, recompute none |"));
  CHECK_THAT(md, Contains("MFU (megatron) is not a result") && Contains("but the run's device was"));
  CHECK_THAT(md, Contains("| MFU (Megatron formula) | invalid: "));
  const auto html = slurp((dir.path() / "low_peak" / "report" / "report.html").string());
  CHECK_THAT(html, Contains("<div class=\"fail\">MFU (six_n) is not a result"));
  // A peak far above: the MFUs are results, but FlagPerf's N = 2.3e9 is not this 2-layer model's.
  const auto high = report_of("high_peak", "1e6");
  CHECK(high["mfu"]["megatron"].is_number());
  CHECK(high["mfu"]["six_n"].is_number());
  CHECK(high["mfu"]["reference"].is_null());
  CHECK_THAT(high["mfu_invalid"]["reference"].get<std::string>(), Contains("times this model's own N"));
}

TEST_CASE("environment.json's launcher: Open MPI's remote daemon is recorded as mpirun on its node", "[report]") {
  // Open MPI 4 starts a rank on a node other than mpirun's under orted (prted under PRRTE); its
  // contact URI for mpirun is "JOB;tcp://ADDRESSES:PORT".
  const std::string orted = "/usr/bin/orted -mca ess env -mca ess_base_jobid 123 -mca orte_hnp_uri 123.0;tcp://10.231.0.1:4242";
  CHECK(describe_launcher(orted, "123.0;tcp://10.231.0.1,172.17.0.1:4242") == "mpirun on 10.231.0.1 (remote daemon orted)");
  CHECK(describe_launcher("prted --prtemca ess env", "") == "mpirun (remote daemon prted)");
  // mpirun's own children, and srun's, are recorded as they are.
  const std::string mpirun = "mpirun --oversubscribe -np 4 build/moeforge train x.yaml";
  CHECK(describe_launcher(mpirun, "123.0;tcp://10.0.0.1:1") == mpirun);
  CHECK(describe_launcher("/usr/bin/srun -n 4 moeforge train x.yaml", "") == "/usr/bin/srun -n 4 moeforge train x.yaml");
  CHECK(describe_launcher("/opt/ortedx", "") == "/opt/ortedx");
}

TEST_CASE("report: every MFU convention with its formula, one process says so, the fingerprint and a row it cannot complete",
          "[report][mfu]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto train = [&](const std::string& name, const std::string& sets, const std::string& env = "") {
    const auto run = dir.path() / name;
    const auto t = run_command(env + kBin + " train " + config + " --set training.train_iters=3 --set training.eval_iters=0 " +
                               "--set training.lr_warmup_iters=0 --set hardware.peak_tflops=1e6 " + sets +
                               " --set logging.run_dir=" + run.string());
    INFO(t.output);
    REQUIRE(t.exit_code == 0);
    return run;
  };
  const auto run = train("full", "--set training.recompute_granularity=full", "NCCL_DEBUG=WARN MOEFORGE_FINGERPRINT_TEST=yes ");
  const auto r = run_command(kBin + " report " + run.string() + " --reference " + run.string());
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  const auto rep = read_json(run / "report" / "report.json");
  const auto& res = rep["result"];
  // Each convention: every iteration's MFU is FLOPs / (step time x devices x peak), so its median is
  // Megatron's median MFU scaled by the ratio of the FLOP counts.
  const double megatron = res["flops_per_step"]["megatron"].get<double>();
  for (const char* key : {"megatron_legacy", "torchtitan", "hardware"}) {
    INFO(key);
    const double ratio = res["flops_per_step"][key].get<double>() / megatron;
    CHECK(res["mfu"][key].get<double>() == Approx(res["mfu"]["megatron"].get<double>() * ratio).epsilon(1e-12));
    CHECK(res["tflops_per_chip"][key].get<double>() ==
          Approx(res["tflops_per_chip"]["megatron"].get<double>() * ratio).epsilon(1e-12));
  }
  // One iteration's own numbers: its Megatron TFLOP/s is the FLOPs over its step time (1 device).
  const auto last = read_metrics(run / "metrics.jsonl").back();
  CHECK(last["tflops_per_device"].get<double>() == Approx(megatron / last["step_time_s"].get<double>() / 1e12).epsilon(1e-9));
  // Full recomputation: the layers' forward again. Without the head's 6 x tokens x h x V, a third more.
  const auto fixture = read_json(run / "environment.json");
  CHECK(res["flops_per_step"]["hardware"].get<int64_t>() > res["flops_per_step"]["megatron"].get<int64_t>());
  CHECK(res["mfu"]["hardware"].get<double>() > res["mfu"]["megatron"].get<double>());
  const auto md = slurp((run / "report" / "report.md").string());
  CHECK_THAT(md, Contains("| MFU (torchtitan) | ") && Contains("6 x (N - N_embedding) + 12 x layers x heads x head_dim x s"));
  CHECK_THAT(md, Contains("| HFU (recomputation counted) | ") && Contains("| MFU (Megatron legacy) | "));
  CHECK_THAT(md, Contains("| peak (every MFU above) | 1e+06 TFLOP/s per device, from hardware.peak_tflops |"));
  CHECK_THAT(md, Contains("| row | complete |"));
  // One process: the communication plot says why it is empty; the reference drawn dashed over the run.
  const auto html = slurp((run / "report" / "report.html").string());
  CHECK_THAT(html, Contains("no communication (one process)") && Contains("stroke-dasharray=\"6 4\""));

  SECTION("the fingerprint: the config's SHA-256 as hashlib gives it, the ELF build-id as readelf reads it, the variables") {
    const auto py = run_command(venv_python() + " -c \"import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())\" " +
                                (run / "config.yaml").string());
    REQUIRE(py.exit_code == 0);
    CHECK(fixture["config_sha256"].get<std::string>() + "\n" == py.output);
    std::string bin = kBin.substr(kBin.find_last_of(' ') + 1);
    const auto elf = run_command("readelf -n " + bin + " | sed -n 's/.*Build ID: *//p'");
    REQUIRE(elf.exit_code == 0);
    CHECK(fixture["build_id"].get<std::string>() + "\n" == elf.output);
    CHECK(fixture["build_git_commit"].get<std::string>().size() == 40);
    CHECK(fixture["build_git_dirty"].is_boolean());
    CHECK(fixture["environment_variables"]["NCCL_DEBUG"] == "WARN");
    CHECK(fixture["environment_variables"]["MOEFORGE_FINGERPRINT_TEST"] == "yes");
    CHECK_FALSE(fixture["environment_variables"].contains("PATH"));
    CHECK_THAT(md, Contains("| config_sha256 | `" + fixture["config_sha256"].get<std::string>() + "` |"));
  }
  SECTION("a fingerprint without devices per node or driver: those read not recorded and the row is incomplete") {
    const auto old = dir.path() / "old";
    fs::create_directories(old);
    for (const auto& f : fs::directory_iterator(run)) {
      if (f.is_regular_file()) fs::copy_file(f.path(), old / f.path().filename());
    }
    json env = fixture;
    env.erase("devices_per_node");
    env.erase("driver");
    std::ofstream(old / "environment.json") << env.dump();
    REQUIRE(run_command(kBin + " report " + old.string()).exit_code == 0);
    const auto o = read_json(old / "report" / "report.json")["result"];
    CHECK(o["incomplete"] == true);
    CHECK(o["not_recorded"] == json::array({"devices_per_node", "driver"}));
    CHECK(o["devices_per_node"].is_null());
    CHECK(o["driver"].is_null());
    CHECK_THAT(o["config"].get<std::string>(), Contains(" 1xnot recorded"));
    const auto omd = slurp((old / "report" / "report.md").string());
    CHECK_THAT(omd, Contains("This row is INCOMPLETE") && Contains("| row | incomplete: not recorded: devices_per_node, driver |"));
    CHECK_THAT(omd, Contains("| driver | not recorded |"));
    CHECK_THAT(slurp((old / "report" / "report.html").string()), Contains("This row is INCOMPLETE"));
  }
  SECTION("comparison.md and comparison.html flag a run whose config differs in more than hardware or whose peak differs") {
    const auto same = train("peak_only", "--set training.recompute_granularity=full --set hardware.peak_tflops=2e6");
    const auto other = train("other_lr", "--set training.recompute_granularity=full --set training.lr=0.0005");
    const auto cmp = dir.path() / "cmp";
    REQUIRE(run_command(kBin + " report " + run.string() + " " + same.string() + " " + other.string() + " --out " + cmp.string())
                .exit_code == 0);
    const auto c = read_json(cmp / "comparison.json");
    CHECK(c["runs"][0]["config_differences"].empty());
    CHECK(c["runs"][1]["config_differences"].empty());  // hardware and logging only
    // ... but its MFU divides by another peak on the same chip: flagged, with both peaks.
    REQUIRE(c["runs"][1]["peak_difference"].is_object());
    CHECK(c["runs"][1]["peak_difference"]["peak_tflops"].get<double>() == 2e6);
    CHECK(c["runs"][1]["peak_difference"]["baseline_peak_tflops"].get<double>() == 1e6);
    CHECK(c["runs"][1]["peak_difference"]["peak_source"] == "hardware.peak_tflops");
    CHECK(c["runs"][2]["peak_difference"].is_null());
    REQUIRE_FALSE(c["runs"][2]["config_differences"].empty());
    CHECK(c["runs"][2]["config_differences"][0]["key"] == "training.lr");  // sorted: the only training.* key set
    const auto cmd = slurp((cmp / "comparison.md").string());
    CHECK_THAT(cmd, Contains("**Not like for like:** `" + fs::absolute(other).string()) && Contains("`training.lr` ("));
    CHECK_FALSE(cmd.find("`" + fs::absolute(same).string() + "` differs") != std::string::npos);
    CHECK_THAT(cmd, Contains("**MFU not comparable:** `" + fs::absolute(same).string() + "` divides by a peak of 2e+06"));
    CHECK(cmd.find("**MFU not comparable:** `" + fs::absolute(other).string()) == std::string::npos);
    const auto chtml = slurp((cmp / "comparison.html").string());
    CHECK_THAT(chtml, Contains("<strong>Not like for like:</strong> <code>" + fs::absolute(other).string()) &&
                          Contains("<code>training.lr</code> ("));
    CHECK_FALSE(chtml.find("<code>" + fs::absolute(same).string() + "</code> differs") != std::string::npos);
  }
}

TEST_CASE("report: without recomputation the HFU is the MFU", "[report][mfu]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto run = dir.path() / "none";
  REQUIRE(run_command(kBin + " train " + config + " --set training.train_iters=2 --set training.eval_iters=0 " +
                      "--set training.lr_warmup_iters=0 --set hardware.peak_tflops=1e6 --set training.recompute_granularity=none" +
                      " --set logging.run_dir=" + run.string())
              .exit_code == 0);
  REQUIRE(run_command(kBin + " report " + run.string()).exit_code == 0);
  const auto res = read_json(run / "report" / "report.json")["result"];
  CHECK(res["flops_per_step"]["hardware"] == res["flops_per_step"]["megatron"]);
  CHECK(res["mfu"]["hardware"].get<double>() == Approx(res["mfu"]["megatron"].get<double>()).epsilon(1e-9));
}

TEST_CASE("report plots: a long legend name widens the plot instead of being cut", "[report][plots]") {
  const Series s{"exposed (compute waited)", "#000", {1, 2}, {1, 2}};
  const std::string svg = line_chart("t", "y", {s});
  const auto at = svg.find("width=\"") + 7;
  const double width = std::stod(svg.substr(at, svg.find('"', at) - at));
  // The legend starts 8 px right of the plot (680 - 130); 24 characters at 12 px need about 7 px each.
  CHECK(width >= 680 - 130 + 8 + 7 * 24);
  CHECK_THAT(empty_chart("Communication per iteration", "no communication (one process)"),
             Contains(">no communication (one process)</text>"));
}

TEST_CASE("fingerprint: SHA-256 of a known vector, the build-id of this binary as readelf reads it", "[report][fingerprint]") {
  CHECK(sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  CHECK(sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  const auto self = fs::read_symlink("/proc/self/exe").string();
  const auto elf = run_command("readelf -n " + self + " | sed -n 's/.*Build ID: *//p'");
  REQUIRE(elf.exit_code == 0);
  REQUIRE_FALSE(elf.output.empty());
  CHECK(elf_build_id() + "\n" == elf.output);
}

TEST_CASE("energy: RAPL package counters from a fake powercap tree, wrap-corrected, sub-domains left out", "[report][energy]") {
  TempDir dir;
  const auto root = dir.path() / "powercap";
  const auto write = [&](const std::string& domain, const std::string& energy_uj, const std::string& max_uj) {
    fs::create_directories(root / domain);
    std::ofstream(root / domain / "energy_uj") << energy_uj << "\n";
    std::ofstream(root / domain / "max_energy_range_uj") << max_uj << "\n";
  };
  write("intel-rapl:0", "1000000", "10000000");
  write("intel-rapl:1", "9000000", "10000000");
  write("intel-rapl:0:0", "5", "10000000");  // a part of package 0: must not count twice
  auto meter = EnergyMeter::open("cpu", 0, root);
  REQUIRE(meter.available());
  CHECK_THAT(meter.source(), Contains("intel-rapl:0, intel-rapl:1") && !Contains("intel-rapl:0:0"));
  CHECK_FALSE(meter.lap().has_value());  // the first read starts the count
  write("intel-rapl:0", "3500000", "10000000");  // +2.5 J
  write("intel-rapl:1", "500000", "10000000");   // wrapped: 10 - 9 + 0.5 = 1.5 J
  write("intel-rapl:0:0", "999999999", "10000000");
  CHECK(meter.lap().value() == Approx(4.0));
  const auto none = EnergyMeter::open("cpu", 0, dir.path() / "nowhere");
  CHECK_FALSE(none.available());
  CHECK_THAT(none.source(), Contains("no readable RAPL package"));
}

TEST_CASE("report: power and energy per step from a fake counter, and not recorded without one", "[report][energy]") {
  TempDir dir;
  const auto config = write_config(dir);
  const auto root = dir.path() / "powercap";
  fs::create_directories(root / "intel-rapl:0");
  std::ofstream(root / "intel-rapl:0" / "energy_uj") << "123456\n";
  std::ofstream(root / "intel-rapl:0" / "max_energy_range_uj") << "262143328850\n";
  const auto train = [&](const std::string& name, const std::string& env) {
    const auto run = dir.path() / name;
    const auto t = run_command(env + kBin + " train " + config + " --set training.train_iters=3 --set training.eval_iters=0 " +
                               "--set training.lr_warmup_iters=0 --set logging.run_dir=" + run.string());
    INFO(t.output);
    REQUIRE(t.exit_code == 0);
    return run;
  };
  // A counter that does not move: 0 J every step, from the named source.
  const auto fake = train("fake", "MOEFORGE_POWERCAP_DIR=" + root.string() + " ");
  const auto metrics = read_metrics(fake / "metrics.jsonl");
  CHECK(metrics.back()["energy_per_step_j"] == 0.0);
  CHECK_THAT(metrics.back()["energy_source"].get<std::string>(), Contains("RAPL packages (" + root.string() + ": intel-rapl:0)"));
  // The row's formatting, with known values: 6 J per step over each step's time.
  {
    std::ofstream out(fake / "metrics.jsonl", std::ios::trunc);
    for (auto m : metrics) {
      m["energy_per_step_j"] = 6.0;
      m["step_time_s"] = 0.5;
      m["power_w"] = 12.0;
      out << m.dump() << "\n";
    }
  }
  REQUIRE(run_command(kBin + " report " + fake.string()).exit_code == 0);
  const auto res = read_json(fake / "report" / "report.json")["result"];
  CHECK(res["energy_per_step_j"] == 6.0);
  CHECK(res["power_w"] == 12.0);
  CHECK_THAT(slurp((fake / "report" / "report.md").string()),
             Contains("| power / energy per step (median) | 12 W, 6 J per step (RAPL packages (" + root.string()));
  // No counter: not recorded, with why.
  const auto none = train("none", "MOEFORGE_POWERCAP_DIR=" + (dir.path() / "nowhere").string() + " ");
  CHECK_FALSE(read_metrics(none / "metrics.jsonl").back().contains("energy_per_step_j"));
  REQUIRE(run_command(kBin + " report " + none.string()).exit_code == 0);
  const auto n = read_json(none / "report" / "report.json")["result"];
  CHECK(n["power_w"].is_null());
  CHECK_THAT(n["energy_source"].get<std::string>(), Contains("not recorded: no readable RAPL package"));
  CHECK_THAT(slurp((none / "report" / "report.md").string()), Contains("| power / energy per step (median) | not recorded: "));
}
