// `moeforge report`: numbers recomputed from the metrics by a numpy oracle, the accuracy verdict at
// FlagPerf's threshold, Megatron-LM log lines as the reference, and report.html opened in a real
// headless browser (chromium).
#include "launch/commands/report_plots.h"
#include "train_fixture.h"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

using namespace moeforge;
using namespace moeforge::test;
using Catch::Matchers::Contains;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

json read_json(const fs::path& p) { return json::parse(std::ifstream(p)); }

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
    // communication of the 2-rank run, expert load, the per-layer load heatmap) and the tokens-per-expert
    // histogram of each of the 2 MoE layers (expert_loads.jsonl).
    CHECK_THAT(dom.output, Contains("data-plots=\"9\"") && Contains("Communication per iteration") &&
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
