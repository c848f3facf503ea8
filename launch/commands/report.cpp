#include "launch/commands/report.h"
#include "launch/commands/report_routing.h"

#include "core/config/config_loader.h"
#include "core/files/durable_file.h"
#include "core/flops/conventions.h"
#include "core/flops/model_size.h"
#include "core/base/errors.h"
#include "core/files/file_names.h"
#include "launch/train/metrics.h"
#include "launch/train/routing_health.h"
#include "launch/train/run_environment.h"
#include "parallel/layout/layout.h"

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <regex>
#include <set>

namespace fs = std::filesystem;
using nlohmann::json;

namespace moeforge {

namespace {

std::vector<json> read_metrics_file(const fs::path& path) {
  std::ifstream in(path);
  if (!in) fail_user("{}: not found. Point at a run directory (logging.run_dir of a moeforge train run).", path.string());
  std::vector<json> out;
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.contains(metric::kIteration)) {
      fail_user("{}:{}: not a metrics line (one JSON object with \"iteration\" per line expected)", path.string(), n);
    }
    out.push_back(std::move(j));
  }
  if (out.empty()) fail_user("{}: no iterations logged yet", path.string());
  return out;
}

double percentile(const std::vector<double>& sorted, double q) {  // numpy's default (linear)
  const double pos = q * static_cast<double>(sorted.size() - 1);
  const auto lo = static_cast<size_t>(std::floor(pos)), hi = static_cast<size_t>(std::ceil(pos));
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - static_cast<double>(lo));
}

double number(const json& j, const char* key) { return j.contains(key) && j[key].is_number() ? j[key].get<double>() : NAN; }

// The routing collapses the trainer warned about (launch/train/routing_health.h), each with the
// iteration up to which any of its layers stayed collapsed after the warning.
// A case's N within this factor of the model's own is the same model counted another way
// (FlagPerf's 2.3e9 against our exact count for Qwen1.5-MoE-A2.7B differ by a few per cent).
constexpr double kReferenceNTolerance = 2.0;

// The MFUs that cannot be results, each with why: above 100 % (a peak that is not the device's, or
// FLOPs miscounted), and the case's 6N with an N far from the model's own (FlagPerf's literal N
// from another model: the 1,866 % of a scaled-down run). The model's N is the 6N FLOPs the run
// counted per token over 6.
json invalid_mfus(const json& mfu, const ExperimentConfig& c, double tflops_6n, double tokens_per_s, double peak_tflops,
                  const std::string& peak_source) {
  json invalid = json::object();
  for (const auto& [key, v] : mfu.items()) {
    if (v.is_number() && v.get<double>() > 1.0) {
      invalid[key] = fmt::format("{:.4g} % is above 100 %: the peak ({:.4g} TFLOP/s, {}) is not this device's, or the FLOPs "
                                 "are miscounted",
                                 100 * v.get<double>(), peak_tflops, peak_source);
    }
  }
  if (c.hardware.reference_compute_n && tokens_per_s > 0 && std::isfinite(tflops_6n)) {
    const double model_n = tflops_6n * 1e12 / (6.0 * tokens_per_s);
    const double ratio = *c.hardware.reference_compute_n / model_n;
    if (model_n > 0 && (ratio > kReferenceNTolerance || ratio < 1.0 / kReferenceNTolerance) && !invalid.contains("reference")) {
      invalid["reference"] = fmt::format("the case's N (hardware.reference_compute_n = {:.4g}) is {:.3g} times this model's own "
                                         "N ({:.4g}, from its 6N FLOPs per token): the case describes another model",
                                         *c.hardware.reference_compute_n, ratio, model_n);
    }
  }
  return invalid;
}

// The conventions the trainer does not log per iteration (Megatron legacy, torchtitan, the HFU).
// Each iteration's value is Megatron's times the ratio of the two FLOP counts (same step time,
// devices and peak), so the steady median is Megatron's median times that ratio, exactly (a median
// commutes with scaling). Adds result.mfu.<key>, result.tflops_per_chip.<key>,
// result.flops_per_step and result.mfu_formulas.
void add_mfu_conventions(json& result, const ExperimentConfig& c, double megatron_mfu, double megatron_tflops) {
  const auto& t = c.training;
  const FlopsPerStep f = model_flops_per_step(c.model, t.global_batch_size, t.seq_length);
  const json per_step = {{"megatron", f.megatron},
                         {"megatron_legacy", f.megatron_legacy},
                         {"six_n", f.six_n},
                         {"torchtitan", f.torchtitan},
                         {"hardware", hardware_flops_per_step(c.model, t.global_batch_size, t.seq_length, t.recompute_granularity)}};
  for (const char* key : {"megatron_legacy", "torchtitan", "hardware"}) {
    const double ratio = per_step[key].get<double>() / static_cast<double>(f.megatron);
    result["tflops_per_chip"][key] = std::isfinite(megatron_tflops) ? json(megatron_tflops * ratio) : json(nullptr);
    result["mfu"][key] = std::isfinite(megatron_mfu) ? json(megatron_mfu * ratio) : json(nullptr);
  }
  result["flops_per_step"] = per_step;
  json formulas = json::object();
  for (const auto& m : mfu_conventions()) formulas[m.key] = m.formula;
  result["mfu_formulas"] = formulas;
}

// The fingerprint fields a row needs (nodes, devices per node, driver; the peak's source from the
// metrics), each as recorded or null, and the names of the null ones: a run from before a field
// was recorded, or a fingerprint that lost it, gets "not recorded", never a guess.
json recorded_row_fields(const json& env, const std::string& peak_source) {
  json out = {{"not_recorded", json::array()}};
  for (const char* key : {"nodes", "devices_per_node"}) {
    const bool ok = env.contains(key) && env[key].is_number_integer() && env[key].get<int64_t>() > 0;
    out[key] = ok ? env[key] : json(nullptr);
  }
  out["driver"] = env.contains("driver") && env["driver"].is_string() && !env["driver"].get<std::string>().empty()
                      ? env["driver"]
                      : json(nullptr);
  out["peak_source"] = peak_source.empty() ? json(nullptr) : json(peak_source);
  for (const char* key : {"nodes", "devices_per_node", "driver", "peak_source"}) {
    if (out[key].is_null()) out["not_recorded"].push_back(key);
  }
  return out;
}

// Each rank's step-time breakdown over the steady state, from metrics' rank_times (several ranks
// only): per key, the median of each rank's values. A pipeline stage that mostly waits, or the EP
// rank the others wait for at the all-to-all, shows in its column. null on one process.
json per_rank_breakdown(const std::vector<json>& metrics, int64_t warmup) {
  static constexpr std::array<const char*, 6> kKeys{"compute_s", "pipeline_wait_s", "all_to_all_s", "grad_reduce_s", "optimizer_s", "step_s"};
  std::map<std::string, std::vector<std::vector<double>>> values;  // key -> rank -> iterations
  int64_t iterations = 0;
  for (size_t i = static_cast<size_t>(warmup); i < metrics.size(); ++i) {
    if (!metrics[i].contains(metric::kRankTimes)) continue;
    const auto& rt = metrics[i][metric::kRankTimes];
    ++iterations;
    for (const char* key : kKeys) {
      if (!rt.contains(key)) continue;
      auto& per_rank = values[key];
      per_rank.resize(std::max(per_rank.size(), rt[key].size()));
      for (size_t r = 0; r < rt[key].size(); ++r) per_rank[r].push_back(rt[key][r].get<double>());
    }
  }
  if (iterations == 0) return nullptr;
  json out = {{"iterations", iterations}, {"statistic", "median over the steady state"}};
  size_t ranks = 0;
  for (const auto& [key, per_rank] : values) {
    out[key] = json::array();
    for (const auto& v : per_rank) out[key].push_back(steady_stats(v)["median"]);
    ranks = std::max(ranks, per_rank.size());
  }
  out["ranks"] = ranks;
  return out;
}

// Power and energy per step (steady medians) where rank 0's device had an energy counter; null
// with energy_source "not recorded" otherwise (launch/train/energy.h).
void add_energy(json& result, const std::vector<json>& metrics, int64_t warmup) {
  std::vector<double> joules, watts;
  std::string source;
  for (size_t i = static_cast<size_t>(warmup); i < metrics.size(); ++i) {
    const auto& m = metrics[i];
    if (!m.contains(metric::kEnergyPerStep) || !m[metric::kEnergyPerStep].is_number()) continue;
    joules.push_back(m[metric::kEnergyPerStep].get<double>());
    watts.push_back(number(m, metric::kPower));
    source = m.value(metric::kEnergySource, std::string());
  }
  const bool recorded = !joules.empty();
  result["energy_per_step_j"] = recorded ? steady_stats(joules)["median"] : json(nullptr);
  result["power_w"] = recorded ? steady_stats(watts)["median"] : json(nullptr);
  result["energy_source"] = recorded ? source : std::string(kNotRecorded);
}

json routing_collapses(const std::vector<json>& metrics, const ExperimentConfig& c) {
  json out = json::array();
  const auto criterion = CollapseCriterion::of(c);
  for (size_t i = 0; i < metrics.size(); ++i) {
    if (!metrics[i].contains(metric::kRoutingCollapse)) continue;
    json event = metrics[i][metric::kRoutingCollapse];
    size_t last = i;
    for (size_t k = i + 1; k < metrics.size(); ++k) {
      const auto loads_L = layer_loads(metrics[k]);
      const auto still = [&](const json& layer) {
        const auto l = layer.get<size_t>();
        return l < loads_L.size() && criterion.collapsed(loads_L[l]);
      };
      if (std::none_of(event["moe_layers"].begin(), event["moe_layers"].end(), still)) break;
      last = k;
    }
    event["last_iteration"] = metrics[last][metric::kIteration];
    event["until_end"] = last + 1 == metrics.size();
    event["causes"] = routing_collapse_causes(c);
    out.push_back(std::move(event));
  }
  return out;
}

}  // namespace

LossCurve parse_megatron_log(std::istream& in, const std::string& source) {
  static const std::regex iteration(R"(iteration\s+(\d+)\s*/\s*\d+\s*\|)");
  static const std::regex elapsed(R"(elapsed time per iteration \(ms\):\s*([0-9.]+))");
  static const std::regex loss(R"(\|\s*lm loss:\s*([-+0-9.eE]+))");
  LossCurve c;
  c.source = source;
  c.kind = "Megatron-LM log";
  std::string line;
  std::smatch m;
  while (std::getline(in, line)) {
    if (!std::regex_search(line, m, iteration)) continue;
    const int64_t it = std::stoll(m[1]);
    if (std::regex_search(line, m, loss)) c.lm_loss[it] = std::stod(m[1]);
    if (std::regex_search(line, m, elapsed)) c.step_time_s[it] = std::stod(m[1]) / 1e3;
  }
  return c;
}

LossCurve read_reference(const std::string& path) {
  fs::path p(path);
  if (fs::is_directory(p)) p /= files::kMetrics;
  std::ifstream in(p);
  if (!in) fail_user("--reference {}: not found (a run directory, its metrics.jsonl, or a Megatron-LM log)", p.string());
  const int first = (in >> std::ws).peek();
  LossCurve c;
  if (first == '{') {
    c.source = p.string();
    c.kind = "moeforge metrics";
    for (const auto& j : read_metrics_file(p)) {
      const auto it = j[metric::kIteration].get<int64_t>();
      if (const double l = number(j, metric::kLmLoss); std::isfinite(l)) c.lm_loss[it] = l;
      if (const double t = number(j, metric::kStepTime); std::isfinite(t)) c.step_time_s[it] = t;
    }
  } else {
    c = parse_megatron_log(in, p.string());
  }
  if (c.lm_loss.empty()) {
    fail_user("--reference {}: no loss found; expected moeforge metrics.jsonl lines or Megatron-LM log lines like "
              "\"iteration 21/ 100 | ... elapsed time per iteration (ms): 70412.3 | ... lm loss: 8.53E+00 |\"",
              p.string());
  }
  return c;
}

json steady_stats(std::vector<double> v) {
  std::erase_if(v, [](double x) { return !std::isfinite(x); });
  if (v.empty()) return json{{"count", 0}};
  std::sort(v.begin(), v.end());
  const double n = static_cast<double>(v.size());
  const double mean = std::accumulate(v.begin(), v.end(), 0.0) / n;
  double var = 0;
  for (double x : v) var += (x - mean) * (x - mean);
  return json{{"count", v.size()},
              {"median", percentile(v, 0.5)},
              {"mean", mean},
              {"min", v.front()},
              {"max", v.back()},
              {"stdev", v.size() > 1 ? std::sqrt(var / (n - 1)) : 0.0},
              {"p25", percentile(v, 0.25)},
              {"p75", percentile(v, 0.75)}};
}

json accuracy_verdict(const std::map<int64_t, double>& run, const LossCurve& ref, int64_t from, double threshold) {
  json steps = json::array();
  double sum = 0;
  for (const auto& [it, loss] : run) {
    if (it < from || !ref.lm_loss.contains(it)) continue;
    const double r = ref.lm_loss.at(it);
    const double err = std::abs(loss - r) / std::max(std::abs(r), 1e-30);
    steps.push_back({{"iteration", it}, {"lm_loss", loss}, {"reference_lm_loss", r}, {"relative_error", err}});
    sum += err;
  }
  json v = {{"reference", ref.source},
            {"reference_kind", ref.kind},
            {"from_iteration", from},
            {"threshold", threshold},
            {"compared_iterations", steps.size()},
            {"per_step", steps}};
  if (steps.empty()) {
    v["mean_relative_error"] = nullptr;
    v["pass"] = nullptr;
    v["message"] = fmt::format("no iteration at or after {} in both curves (run {}..{}, reference {}..{})", from,
                               run.empty() ? 0 : run.begin()->first, run.empty() ? 0 : run.rbegin()->first,
                               ref.lm_loss.begin()->first, ref.lm_loss.rbegin()->first);
    return v;
  }
  const double mean = sum / static_cast<double>(steps.size());
  v["mean_relative_error"] = mean;
  v["pass"] = mean < threshold;
  v["message"] = fmt::format("mean relative loss error {:.3f} % over {} iterations from {} on: {} (threshold {:.1f} %)",
                             100 * mean, steps.size(), from, mean < threshold ? "PASS" : "FAIL", 100 * threshold);
  return v;
}

json build_report(const ReportOptions& o) {
  const fs::path run(o.run_dir);
  const auto metrics = read_metrics_file(run / files::kMetrics);
  const fs::path config_file = run / files::kResolvedConfig;
  if (!fs::exists(config_file)) fail_user("{}: missing; is {} the logging.run_dir of a moeforge train run?", config_file.string(), o.run_dir);
  const ExperimentConfig c = load_config(config_file.string(), {}).config;
  json env = json::object();
  if (std::ifstream in(run / files::kEnvironment); in) env = json::parse(in, nullptr, false);
  if (env.is_discarded()) env = json::object();

  const int64_t n = static_cast<int64_t>(metrics.size());
  const int64_t warmup = o.warmup.value_or(n <= 2 ? 0 : std::min<int64_t>(10, std::max<int64_t>(1, n / 10)));
  if (warmup >= n) fail_user("--warmup {} leaves no iteration of the {} logged for the steady state", warmup, n);
  json series;
  for (const char* key : {metric::kIteration, metric::kLmLoss, metric::kStepTime, metric::kTokensPerSecond,
                          metric::kTflops, metric::kTflops6N, metric::kMfu, metric::kMfu6N, metric::kTimeData,
                          metric::kTimeForward, metric::kTimeBackward, metric::kTimePipelineWait,
                          metric::kTimeGradReduce, metric::kTimeOptimizer, metric::kExpertLoadMaxOverMean,
                          metric::kPeakMemory, metric::kTimeComm, metric::kTimeCommExposed}) {
    series[key] = json::array();
    for (const auto& m : metrics) series[key].push_back(m.contains(key) && !m[key].is_null() ? m[key] : json(nullptr));
  }
  for (const char* key : {metric::kExpertLoadPerLayer, metric::kExpertIdlePerLayer}) {
    series[key] = json::array();
    for (const auto& m : metrics) series[key].push_back(m.value(key, json::array()));
  }
  auto steady = [&](const char* key) {
    std::vector<double> v;
    for (int64_t i = warmup; i < n; ++i) v.push_back(number(metrics[static_cast<size_t>(i)], key));
    return steady_stats(v);
  };
  json steady_state = {{"warmup_iterations", warmup},
                       {"first_iteration", metrics[static_cast<size_t>(warmup)][metric::kIteration]},
                       {"last_iteration", metrics.back()[metric::kIteration]}};
  for (const char* key : kSteadyStateKeys) {
    steady_state[key] = steady(key);
  }
  steady_state["iterations"] = steady_state[metric::kStepTime]["count"];

  const auto& last = metrics.back();
  const int64_t world = env.value("world_size", int64_t{0}) > 0 ? env["world_size"].get<int64_t>()
                                                               : c.parallel.world_size.value_or(1);
  // The run's layout, as the trainer made it (its config with the world it ran on).
  ExperimentConfig as_run = c;
  as_run.parallel.world_size = world;
  const ParallelLayout layout = ParallelLayout::create(as_run, world);
  // What the row needs from the fingerprint: recorded, or null and named in result.not_recorded.
  const json recorded = recorded_row_fields(env, last.value(metric::kPeakSource, std::string()));
  const auto as_text = [](const json& v) { return v.is_null() ? std::string(kNotRecorded) : v.is_string() ? v.get<std::string>() : v.dump(); };
  // The device that ran (environment.json's first chip), never the config's hardware.chip: a config
  // written for an A800 and run on a CPU is a CPU row (report fingerprints from before kept the
  // config's chip under "chip"; their "chips" list names the device).
  const std::string chip = env.contains("chips") && !env["chips"].empty() ? env["chips"][0].value("name", std::string("unknown"))
                                                                          : env.value("chip", std::string(kNotRecorded));
  // FlagPerf's "mem used / total": on GPUs rank 0's peak reserved device memory over the device's
  // total; on CPUs the peak resident set over the host's memory.
  const bool gpu_memory = last.contains(metric::kPeakMemoryReserved);
  int64_t peak_used = 0, memory_total = 0;
  for (const auto& m : metrics) {
    peak_used = std::max<int64_t>(peak_used, m.value(gpu_memory ? metric::kPeakMemoryReserved : metric::kPeakMemory, int64_t{0}));
  }
  if (gpu_memory) {
    memory_total = last.value(metric::kDeviceMemoryTotal, int64_t{0});
  } else if (env.contains("chips") && !env["chips"].empty()) {
    memory_total = env["chips"][0].value("memory_total_bytes", int64_t{0});
  }
  // A double default: value() returns its default's type, and NAN is a float (7450.7 read 7450.7002).
  auto median = [&](const char* key) { return steady_state[key].value("median", std::numeric_limits<double>::quiet_NaN()); };
  // The case's own 6N MFU (FlagPerf's literal N): tokens/s/chip x 6 x N / peak, as its script
  // computes it, so the row compares with its published table digit for digit.
  const double peak_tflops = last.value(metric::kPeakTflops, 0.0);
  const json reference_mfu = c.hardware.reference_compute_n && peak_tflops > 0
                                 ? json(median(metric::kTokensPerSecond) * 6.0 * *c.hardware.reference_compute_n /
                                        (peak_tflops * 1e12))
                                 : json(nullptr);
  json mfu = {{"megatron", median(metric::kMfu)}, {"six_n", median(metric::kMfu6N)}, {"reference", reference_mfu}};
  json conventions = {{"mfu", json::object()}, {"tflops_per_chip", json::object()}};
  add_mfu_conventions(conventions, c, median(metric::kMfu), median(metric::kTflops));
  mfu.update(conventions["mfu"]);
  json tflops_per_chip = {{"megatron", median(metric::kTflops)}, {"six_n", median(metric::kTflops6N)}};
  tflops_per_chip.update(conventions["tflops_per_chip"]);
  const json mfu_invalid = invalid_mfus(mfu, c, median(metric::kTflops6N), median(metric::kTokensPerSecond), peak_tflops,
                                        last.value(metric::kPeakSource, std::string()));
  for (const auto& [key, why] : mfu_invalid.items()) mfu[key] = nullptr;  // never shown as a result
  json result = {
      {"config", fmt::format("{} {}x{}", chip, as_text(recorded["nodes"]), as_text(recorded["devices_per_node"]))},
      {"chip", chip},
      {"nodes", recorded["nodes"]},
      {"devices_per_node", recorded["devices_per_node"]},
      {"driver", recorded["driver"]},
      {"not_recorded", recorded["not_recorded"]},
      {"incomplete", !recorded["not_recorded"].empty()},
      {"devices", world},
      {"precision", c.training.bf16 ? "bf16" : "fp32"},
      {"parallel", fmt::format("TP{}xPP{}xDP{}xEP{}", layout.tp(), layout.pp(), layout.dp(), layout.ep())},
      // The whole layout, for rows that must be comparable: what FlagPerf's "parallel" leaves out.
      {"layout",
       {{"tp", layout.tp()},
        {"pp", layout.pp()},
        {"virtual_stages", layout.vpp()},
        {"dp", layout.dp()},
        {"ep", layout.ep()},
        {"sequence_parallel", c.parallel.sequence_parallel},
        {"zero", c.parallel.use_distributed_optimizer ? 1 : 0},
        {"micro_batch_size", c.training.micro_batch_size},
        {"recompute", std::string(to_string(c.training.recompute_granularity))}}},
      {"global_batch_size", c.training.global_batch_size},
      {"seq_length", c.training.seq_length},
      {"tokens_per_s_per_chip", median(metric::kTokensPerSecond)},
      {"lm_loss_last", last.contains(metric::kLmLoss) ? last[metric::kLmLoss] : json(nullptr)},
      {"last_iteration", last[metric::kIteration]},
      {"peak_memory_used_bytes", peak_used},
      {"peak_memory_total_bytes", memory_total},
      {"peak_memory_kind", gpu_memory ? "peak reserved GPU memory of rank 0 (CUDA caching allocator) / device total"
                                      : "peak resident host memory of rank 0 / host total"},
      {"tflops_per_chip", tflops_per_chip},
      {"mfu", mfu},
      {"mfu_invalid", mfu_invalid},
      {"reference_compute_n", c.hardware.reference_compute_n ? json(*c.hardware.reference_compute_n) : json(nullptr)},
      {"moe_router_force_load_balancing", c.model.moe_router_force_load_balancing},
      {"peak_tflops", last.value(metric::kPeakTflops, 0.0)},
      {"peak_source", recorded["peak_source"]},
      {"step_time_s", median(metric::kStepTime)},
  };
  if (chip == kNotRecorded) {
    result["not_recorded"].insert(result["not_recorded"].begin(), "chip");
    result["incomplete"] = true;
  }
  add_energy(result, metrics, warmup);
  if (result["power_w"].is_null() && env.contains("energy_source") && env["energy_source"].is_string()) {
    result["energy_source"] = env["energy_source"];  // why the run had no counter
  }
  result["flops_per_step"] = conventions["flops_per_step"];
  result["mfu_formulas"] = conventions["mfu_formulas"];
  if (!c.hardware.chip.empty() && !chip_matches(c.hardware.chip, chip)) {
    result["chip_mismatch"] = {
        {"config_chip", c.hardware.chip},
        {"detected", chip},
        {"message", fmt::format("The config names the chip '{}' (hardware.chip) but the run's device was '{}'. The row names "
                                "the device that ran; MFU is against {:.4g} TFLOP/s from {}{}.",
                                c.hardware.chip, chip, peak_tflops, last.value(metric::kPeakSource, std::string("an unknown source")),
                                last.value(metric::kPeakSource, std::string()).rfind("chip table", 0) == 0
                                    ? ", the configured chip's peak, not this device's"
                                    : "")}};
  }
  json report = {{"schema_version", 1},
                 {"run_dir", fs::absolute(run).string()},
                 {"case", {{"config", (fs::absolute(run) / files::kResolvedConfig).string()},
                           {"model_type", std::string(to_string(c.model.model_type))},
                           {"num_layers", c.model.num_layers},
                           {"hidden_size", c.model.hidden_size},
                           {"num_experts", c.model.num_experts.value_or(0)},
                           {"moe_router_topk", c.model.is_moe() ? c.model.moe_router_topk : 0},
                           {"train_iters", c.training.train_iters}}},
                 {"result", result},
                 {"steady_state", steady_state},
                 {"environment", env},
                 {"series", series},
                 {"routing_collapse", routing_collapses(metrics, c)},
                 {"per_rank", per_rank_breakdown(metrics, warmup)},
                 // Both routings (report_routing.h): the EP ranks' wait for the busiest, tokens per expert.
                 {"ep_compute_spread", ep_compute_spread(metrics, warmup, layout)},
                 {"expert_loads", expert_loads_summary(run, steady_state["first_iteration"].get<int64_t>())}};
  if (!o.reference.empty()) {
    const LossCurve ref = read_reference(o.reference);
    std::map<int64_t, double> run_loss;
    for (const auto& m : metrics) {
      if (const double l = number(m, metric::kLmLoss); std::isfinite(l)) run_loss[m[metric::kIteration].get<int64_t>()] = l;
    }
    json acc = accuracy_verdict(run_loss, ref, o.from_iteration, o.threshold);
    std::vector<double> ref_times;
    for (const auto& [it, t] : ref.step_time_s) {
      if (it > metrics[static_cast<size_t>(warmup)][metric::kIteration].get<int64_t>() - 1) ref_times.push_back(t);
    }
    const json ref_steady = steady_stats(ref_times);
    acc["reference_step_time_s"] = ref_steady;
    if (ref_steady["count"].get<int64_t>() > 0) {
      acc["step_time_ratio_reference_over_run"] = ref_steady["median"].get<double>() / median(metric::kStepTime);
    }
    json ref_series = json::array();
    for (const auto& m : metrics) {
      const auto it = m[metric::kIteration].get<int64_t>();
      ref_series.push_back(ref.lm_loss.contains(it) ? json(ref.lm_loss.at(it)) : json(nullptr));
    }
    report["series"]["reference_lm_loss"] = ref_series;
    report["accuracy"] = acc;
  } else {
    report["accuracy"] = nullptr;
  }
  const auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  report["generated_at"] = stamp;
  return report;
}

namespace {

// Builds and writes one run's report; returns it.
json write_report(const ReportOptions& o) {
  const json report = build_report(o);
  const fs::path out = o.out_dir.empty() ? fs::path(o.run_dir) / "report" : fs::path(o.out_dir);
  fs::create_directories(out);
  write_file_durably(out / "report.json", report.dump(2) + "\n");
  write_file_durably(out / "report.md", render_markdown(report));
  write_file_durably(out / "report.html", render_html(report));
  const auto& r = report["result"];
  const auto percent = [&](const char* key) {
    return r["mfu"][key].is_number() ? fmt::format("{:.2f} %", 100 * r["mfu"][key].get<double>()) : std::string("invalid");
  };
  spdlog::info("{} | {} | {} | {:.1f} tokens/s/chip | loss {} | MFU {} (6N {})", r["config"].get<std::string>(),
               r["precision"].get<std::string>(), r["parallel"].get<std::string>(), r["tokens_per_s_per_chip"].get<double>(),
               r["lm_loss_last"].dump(), percent("megatron"), percent("six_n"));
  if (r.contains("chip_mismatch")) spdlog::warn("{}", r["chip_mismatch"]["message"].get<std::string>());
  for (const auto& [key, why] : r["mfu_invalid"].items()) spdlog::warn("MFU ({}) is invalid: {}", key, why.get<std::string>());
  if (!report["accuracy"].is_null()) spdlog::info("accuracy: {}", report["accuracy"]["message"].get<std::string>());
  spdlog::info("wrote {}/report.json, report.md, report.html", out.string());
  return report;
}

}  // namespace

int run_report(const ReportOptions& o) {
  write_report(o);
  return 0;
}

namespace {

// A resolved config.yaml as "section.key" -> value (its YAML text), for comparing two runs' configs.
std::map<std::string, std::string> flat_config(const std::string& path) {
  std::map<std::string, std::string> out;
  if (!fs::exists(path)) return out;
  const YAML::Node root = YAML::LoadFile(path);
  for (const auto& section : root) {
    const auto name = section.first.as<std::string>();
    if (!section.second.IsMap()) {
      out[name] = YAML::Dump(section.second);
      continue;
    }
    for (const auto& key : section.second) out[name + "." + key.first.as<std::string>()] = YAML::Dump(key.second);
  }
  return out;
}

// Whether a key may differ between comparable rows: the hardware (what is compared), where a run
// writes and logs (logging.*, checkpoint.save/load: every run has its own directories), and the
// routing, which every row names itself (its config cell and the Routing table).
bool comparable_difference(const std::string& key) {
  return key.rfind("hardware.", 0) == 0 || key.rfind("logging.", 0) == 0 || key == "checkpoint.save" ||
         key == "checkpoint.load" || key == "model.moe_router_force_load_balancing";
}

// A row's MFU compares with the baseline's only against the same peak on the same chip: a peak
// calibrated at each run's start (a CPU) moves with the machine's load, and an overridden
// hardware.peak_tflops changes every MFU of the row. Null when comparable.
json peak_difference(const json& row, const json& base) {
  if (row["chip"] != base["chip"] || !row["peak_tflops"].is_number() || !base["peak_tflops"].is_number()) return nullptr;
  const double a = row["peak_tflops"].get<double>(), b = base["peak_tflops"].get<double>();
  if (std::abs(a - b) <= 0.01 * std::max(std::abs(a), std::abs(b))) return nullptr;
  return {{"peak_tflops", a}, {"baseline_peak_tflops", b}, {"peak_source", row["peak_source"]},
          {"baseline_peak_source", base["peak_source"]}};
}

}  // namespace

json config_differences(const std::vector<json>& reports) {
  json out = json::array();
  const auto base = flat_config(reports.front()["case"]["config"].get<std::string>());
  for (const auto& rep : reports) {
    const auto mine = flat_config(rep["case"]["config"].get<std::string>());
    std::set<std::string> keys;
    for (const auto* m : {&base, &mine}) {
      for (const auto& [k, v] : *m) keys.insert(k);
    }
    json diffs = json::array();
    for (const auto& k : keys) {
      if (comparable_difference(k)) continue;
      const auto a = base.find(k), b = mine.find(k);
      const std::string va = a == base.end() ? std::string(kNotRecorded) : a->second;
      const std::string vb = b == mine.end() ? std::string(kNotRecorded) : b->second;
      if (va != vb) diffs.push_back({{"key", k}, {"baseline", va}, {"run", vb}});
    }
    out.push_back(diffs);
  }
  return out;
}

json build_comparison(const std::vector<json>& reports) {
  json rows = json::array();
  const auto& base = reports.front()["result"];
  for (const auto& rep : reports) {
    const auto& r = rep["result"];
    json row = {{"run_dir", rep["run_dir"]},
                {"config", r["config"]},
                {"precision", r["precision"]},
                {"parallel", r["parallel"]},
                {"tokens_per_s_per_chip", r["tokens_per_s_per_chip"]},
                {"lm_loss_last", r["lm_loss_last"]},
                {"peak_memory_used_bytes", r["peak_memory_used_bytes"]},
                {"peak_memory_total_bytes", r["peak_memory_total_bytes"]},
                {"mfu", r["mfu"]},
                {"mfu_invalid", r.value("mfu_invalid", json::object())},
                {"tflops_per_chip", r["tflops_per_chip"]},
                {"peak_tflops", r["peak_tflops"]},
                {"peak_source", r.value("peak_source", json(nullptr))},
                {"chip", r.value("chip", json(nullptr))},
                {"accuracy_pass", rep["accuracy"].is_null() ? json(nullptr) : rep["accuracy"]["pass"]},
                {"mean_relative_error", rep["accuracy"].is_null() ? json(nullptr) : rep["accuracy"]["mean_relative_error"]}};
    row["tokens_per_s_per_chip_vs_baseline"] =
        r["tokens_per_s_per_chip"].get<double>() / base["tokens_per_s_per_chip"].get<double>();
    row["mfu_vs_baseline"] = r["mfu"]["megatron"].is_number() && base["mfu"]["megatron"].is_number()
                                 ? json(r["mfu"]["megatron"].get<double>() / base["mfu"]["megatron"].get<double>())
                                 : json(nullptr);
    rows.push_back(row);
  }
  // Rows whose configs differ from the baseline's in more than the hardware are not like for like.
  const json differences = config_differences(reports);
  for (size_t i = 0; i < rows.size(); ++i) {
    rows[i]["config_differences"] = differences[i];
    rows[i]["peak_difference"] = peak_difference(rows[i], rows[0]);
  }
  json comparison = {{"schema_version", 1}, {"baseline", reports.front()["run_dir"]}, {"runs", rows}};
  add_routing_comparison(comparison, reports);
  return comparison;
}

int run_reports(ReportOptions o, const std::vector<std::string>& run_dirs) {
  if (run_dirs.size() == 1) {
    o.run_dir = run_dirs.front();
    return run_report(o);
  }
  const fs::path out = o.out_dir.empty() ? fs::path("reports") : fs::path(o.out_dir);
  std::vector<json> reports;
  std::set<std::string> names;
  for (const auto& dir : run_dirs) {
    ReportOptions one = o;
    one.run_dir = dir;
    fs::path normal = fs::path(dir).lexically_normal();
    if (normal.filename().empty()) normal = normal.parent_path();  // "runs/a/"
    const std::string base = normal.filename().string();
    std::string name = base;
    for (int k = 2; !names.insert(name).second; ++k) name = fmt::format("{}-{}", base, k);
    one.out_dir = (out / name).string();
    reports.push_back(write_report(one));
  }
  const json comparison = build_comparison(reports);
  write_file_durably(out / "comparison.json", comparison.dump(2) + "\n");
  write_file_durably(out / "comparison.md", render_comparison_markdown(comparison));
  write_file_durably(out / "comparison.html", render_comparison_html(comparison));
  spdlog::info("compared {} runs (baseline {}): {}/comparison.md, comparison.html, comparison.json", run_dirs.size(),
               run_dirs.front(), out.string());
  return 0;
}

}  // namespace moeforge
