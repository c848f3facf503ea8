// report.md and report.html from report.json. The HTML is one file: inline CSS and SVG plots drawn
// here, no scripts or resources from elsewhere (a one-line script only counts the plots).
#include "launch/commands/report.h"
#include "launch/commands/report_plots.h"
#include "core/flops/conventions.h"
#include "launch/commands/report_routing.h"
#include "launch/train/routing_health.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <sstream>

using nlohmann::json;

namespace moeforge {

namespace {

std::string esc(const std::string& s) { return html_escape(s); }

// A YAML scalar's dump on one line (YAML::Dump of a list spans lines).
std::string trim_yaml(const json& v) {
  std::string s = v.get<std::string>();
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

// A string field of the row, or "not recorded" when the fingerprint lacked it (null).
std::string text(const json& v) { return v.is_string() ? v.get<std::string>() : v.is_null() ? kNotRecorded : v.dump(); }

// "incomplete: not recorded: driver, peak_source" for a row whose fingerprint lacked what it needs.
std::string completeness(const json& r) {
  if (!r.value("incomplete", false)) return "complete";
  std::vector<std::string> names;
  for (const auto& k : r["not_recorded"]) names.push_back(k.get<std::string>());
  return fmt::format("incomplete: not recorded: {}", fmt::join(names, ", "));
}

std::string num(const json& v, const char* fmt_spec = "{:.4g}") {
  if (!v.is_number()) return "-";
  return fmt::format(fmt::runtime(fmt_spec), v.get<double>());
}
std::string pct(const json& v) { return v.is_number() ? fmt::format("{:.2f} %", 100 * v.get<double>()) : "-"; }
std::string gib(const json& v) {
  return v.is_number() && v.get<double>() > 0 ? fmt::format("{:.1f} GiB", v.get<double>() / (1LL << 30)) : "-";
}

// An MFU of the row: its percentage, or why it is not a result (report.json's mfu_invalid).
std::string mfu_cell(const json& r, const char* key) {
  if (r.contains("mfu_invalid") && r["mfu_invalid"].contains(key)) return "invalid: " + r["mfu_invalid"][key].get<std::string>();
  return pct(r["mfu"][key]);
}

// An MFU in a comparison's cell: too narrow for the reason, which each run's report gives.
std::string mfu_short(const json& r, const char* key) {
  return r.contains("mfu_invalid") && r["mfu_invalid"].contains(key) ? std::string("invalid") : pct(r["mfu"][key]);
}

// The whole layout in one line: "TP2 (sequence parallel) x PP4 (2 virtual stages) x DP8 x EP8, ZeRO-1,
// micro-batch 1, recompute full". Reports from before it have none.
std::string layout_text(const json& r) {
  if (!r.contains("layout")) return "-";
  const auto& l = r["layout"];
  const int64_t v = l["virtual_stages"].get<int64_t>();
  return fmt::format("TP{}{} x PP{}{} x DP{} x EP{}, {}, micro-batch {}, recompute {}", l["tp"].get<int64_t>(),
                     l["sequence_parallel"].get<bool>() ? " (sequence parallel)" : "", l["pp"].get<int64_t>(),
                     v > 1 ? fmt::format(" ({} virtual stages)", v) : "", l["dp"].get<int64_t>(), l["ep"].get<int64_t>(),
                     l["zero"].get<int64_t>() > 0 ? "ZeRO-1 (distributed optimizer)" : "no ZeRO",
                     l["micro_batch_size"].get<int64_t>(), l["recompute"].get<std::string>());
}

// The banners a row needs before anyone reads its numbers.
std::vector<std::string> row_warnings(const json& r) {
  std::vector<std::string> out;
  if (r.value("incomplete", false)) {
    out.push_back(fmt::format("This row is INCOMPLETE: the run's fingerprint does not record what the row needs ({}); those "
                              "fields read \"not recorded\", nothing is guessed.",
                              completeness(r).substr(std::string("incomplete: not recorded: ").size())));
  }
  if (r.contains("chip_mismatch")) out.push_back(r["chip_mismatch"]["message"].get<std::string>());
  if (r.contains("mfu_invalid")) {
    for (const auto& [key, why] : r["mfu_invalid"].items()) {
      out.push_back(fmt::format("MFU ({}) is not a result: {}.", key, why.get<std::string>()));
    }
  }
  return out;
}

std::vector<double> column(const json& series, const char* key) {
  std::vector<double> v;
  if (!series.contains(key)) return v;
  for (const auto& x : series[key]) v.push_back(x.is_number() ? x.get<double>() : NAN);
  return v;
}

const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};

constexpr const char* kForcedBalanceNote =
    "FORCED LOAD BALANCE (model.moe_router_force_load_balancing): every expert got T*K/E slots whatever the router "
    "chose. This measures the machine under perfect balance; the loss is not a training result.";

// One sentence per collapse the run warned about (report.json's routing_collapse).
std::string collapse_summary(const json& e) {
  const auto layers = e["moe_layers"].get<std::vector<int64_t>>();
  const auto decoder = e["layers"].get<std::vector<int64_t>>();
  const std::string also =
      decoder != layers ? fmt::format(", decoder layer{} {}", decoder.size() > 1 ? "s" : "", fmt::join(decoder, ", ")) : "";
  const int64_t last = e["last_iteration"].get<int64_t>();
  return fmt::format("Routing collapse: MoE layer{} {} (of {}{}) collapsed from iteration {} on (warned at iteration {}) and "
                     "stayed collapsed {} {}.",
                     layers.size() > 1 ? "s" : "", fmt::join(layers, ", "), e["num_moe_layers"].get<int64_t>(), also,
                     e["first_iteration"].get<int64_t>(), e["iteration"].get<int64_t>(),
                     e["until_end"].get<bool>() ? "to the last logged iteration," : "until iteration", last);
}

// "312.5 W, 41.2 J per step (NVML ...)" or "not recorded (why)"; reports from before have neither.
std::string energy_text(const json& r) {
  if (!r.contains("power_w") || !r["power_w"].is_number()) {
    return r.contains("energy_source") ? text(r["energy_source"]) : std::string(kNotRecorded);
  }
  return fmt::format("{:.4g} W, {:.4g} J per step ({})", r["power_w"].get<double>(), r["energy_per_step_j"].get<double>(),
                     r["energy_source"].get<std::string>());
}

// The conventions beyond Megatron's and 6N (report.json's mfu.{megatron_legacy,torchtitan,hardware}):
// one table line each, formula included; reports from before them have none.
std::vector<std::pair<std::string, std::string>> convention_rows(const json& r) {
  std::vector<std::pair<std::string, std::string>> rows;
  for (const auto& m : mfu_conventions()) {
    if (m.key == "megatron" || m.key == "six_n" || !r["mfu"].contains(m.key)) continue;
    rows.emplace_back(m.name, mfu_cell(r, m.key.c_str()) + " (" + num(r["tflops_per_chip"].value(m.key, json())) + " TFLOP/s/chip)");
  }
  return rows;
}

// Every convention's formula in one line and the peak all of them divide by.
std::vector<std::pair<std::string, std::string>> formula_rows(const json& r) {
  std::vector<std::pair<std::string, std::string>> rows;
  if (!r.contains("mfu_formulas")) return rows;
  for (const auto& m : mfu_conventions()) {
    if (r["mfu_formulas"].contains(m.key)) rows.emplace_back(m.name, r["mfu_formulas"][m.key].get<std::string>());
  }
  if (r.contains("reference_compute_n") && r["reference_compute_n"].is_number()) {
    rows.emplace_back("MFU (6N with the case's N)", "tokens/s/chip x 6 x hardware.reference_compute_n / peak (FlagPerf's script)");
  }
  rows.emplace_back("peak (every MFU above)", num(r["peak_tflops"]) + " TFLOP/s per device, from " + text(r["peak_source"]));
  return rows;
}

std::vector<std::pair<std::string, std::string>> result_rows(const json& r) {
  const auto convention_result_rows = convention_rows(r);
  std::vector<std::pair<std::string, std::string>> rows = {{"row", completeness(r)},
          {"config (chip nodes x devices)", r["config"].get<std::string>()},
          {"driver", r.contains("driver") ? text(r["driver"]) : kNotRecorded},
          {"precision", r["precision"].get<std::string>()},
          {"parallel (TPxPPxDPxEP)", r["parallel"].get<std::string>()},
          {"layout", layout_text(r)},
          {"global batch x sequence", fmt::format("{} x {}", r["global_batch_size"].get<int64_t>(), r["seq_length"].get<int64_t>())},
          {"tokens/s/chip (median)", num(r["tokens_per_s_per_chip"], "{:.1f}")},
          {fmt::format("LM loss at iteration {}", r["last_iteration"].get<int64_t>()), num(r["lm_loss_last"], "{:.4f}")},
          {"peak memory used / total", gib(r["peak_memory_used_bytes"]) + " / " + gib(r["peak_memory_total_bytes"])},
          {"MFU (Megatron formula)", mfu_cell(r, "megatron")},
          {"MFU (6N, FlagPerf)", mfu_cell(r, "six_n")},
          {"TFLOP/s/chip (Megatron / 6N)", num(r["tflops_per_chip"]["megatron"]) + " / " + num(r["tflops_per_chip"]["six_n"])},
          {"peak used for MFU", num(r["peak_tflops"]) + " TFLOP/s (" + text(r["peak_source"]) + ")"},
          {"step time (median)", num(r["step_time_s"], "{:.4g}") + " s"},
          {"power / energy per step (median)", energy_text(r)}};
  if (r.contains("reference_compute_n") && r["reference_compute_n"].is_number()) {
    rows.insert(rows.begin() + 10, {fmt::format("MFU (6N with the case's N = {:.4g})", r["reference_compute_n"].get<double>()),
                                   // three decimals: FlagPerf's table shows two, and rounding must not hide a digit
                                   r["mfu"]["reference"].is_number()
                                       ? fmt::format("{:.3f} %", 100 * r["mfu"]["reference"].get<double>())
                                       : mfu_cell(r, "reference")});
  }
  if (r.value("moe_router_force_load_balancing", false)) rows.insert(rows.begin(), {"routing", kForcedBalanceNote});
  const auto after_six_n = std::find_if(rows.begin(), rows.end(), [](const auto& row) { return row.first == "MFU (6N, FlagPerf)"; });
  rows.insert(after_six_n + 1, convention_result_rows.begin(), convention_result_rows.end());
  return rows;
}

// Each rank's steady step broken down (report.json's per_rank), all-to-all its own segment; the
// rest of the step (data, the loss, waits not timed) on top, so every bar is the rank's step.
std::string per_rank_chart(const json& rep) {
  if (rep.value("devices", int64_t{0}) == 1 || rep["result"].value("devices", int64_t{0}) == 1) {
    return empty_chart("Step time per rank", "one process: no per-rank view");
  }
  if (!rep.contains("per_rank") || rep["per_rank"].is_null()) return "";
  const auto& p = rep["per_rank"];
  std::vector<double> ranks;
  for (int64_t r = 0; r < p["ranks"].get<int64_t>(); ++r) ranks.push_back(static_cast<double>(r));
  const auto col = [&](const char* key) {
    std::vector<double> v(ranks.size(), NAN);
    if (p.contains(key)) {
      for (size_t r = 0; r < std::min(v.size(), p[key].size()); ++r) v[r] = p[key][r].is_number() ? p[key][r].get<double>() : NAN;
    }
    return v;
  };
  const char* parts[] = {"compute_s", "pipeline_wait_s", "all_to_all_s", "grad_reduce_s", "optimizer_s"};
  const char* names[] = {"compute", "pipeline wait", "all-to-all", "grad reduce", "optimizer"};
  const int colors[] = {0, 3, 1, 4, 5};
  std::vector<Series> series;
  auto rest = col("step_s");
  for (size_t k = 0; k < 5; ++k) {
    series.push_back({names[k], kColors[colors[k]], ranks, col(parts[k])});
    for (size_t r = 0; r < rest.size(); ++r) rest[r] -= std::isfinite(series.back().y[r]) ? series.back().y[r] : 0;
  }
  for (auto& v : rest) v = std::max(v, 0.0);
  series.push_back({"rest of the step", kColors[7], ranks, rest});
  ChartOptions o;
  o.xlabel = "rank";
  return stacked_bars(fmt::format("Step time per rank (median of {} steady iterations)", p["iterations"].get<int64_t>()),
                      "time (s)", ranks, series, o);
}

std::vector<std::pair<std::string, std::string>> environment_rows(const json& e) {
  std::vector<std::pair<std::string, std::string>> rows;
  for (const char* key : {"chip", "config_chip", "world_size", "nodes", "devices_per_node", "driver", "cuda", "nccl", "mpi", "libtorch",
                          "compiler", "moeforge_version", "moeforge_commit", "build_git_commit", "build_git_dirty", "build_id",
                          "config_sha256", "energy_source", "started_at", "launcher", "command"}) {
    if (e.contains(key)) rows.emplace_back(key, e[key].is_string() ? e[key].get<std::string>() : e[key].dump());
  }
  // The variables that change communication or kernels; "none set" is a fact, absence is not.
  if (e.contains("environment_variables")) {
    std::string vars;
    for (const auto& [k, v] : e["environment_variables"].items()) vars += (vars.empty() ? "" : " ") + k + "=" + v.get<std::string>();
    rows.emplace_back("environment_variables", vars.empty() ? "none set (NCCL_*, CUDA_*, OMP_NUM_THREADS, MOEFORGE_*)" : vars);
  }
  if (e.contains("hostnames")) {
    std::string hosts;
    for (const auto& h : e["hostnames"]) hosts += (hosts.empty() ? "" : ", ") + h.get<std::string>();
    rows.emplace_back("hostnames (by rank)", hosts);
  }
  return rows;
}

}  // namespace

std::string render_markdown(const json& rep) {
  std::ostringstream o;
  const auto& r = rep["result"];
  o << "# moeforge benchmark report\n\nRun: `" << rep["run_dir"].get<std::string>() << "`, generated "
    << rep["generated_at"].get<std::string>() << ". Plots: `report.html`. Numbers: `report.json`.\n\n";
  if (r.value("moe_router_force_load_balancing", false)) o << "> **" << kForcedBalanceNote << "**\n\n";
  for (const auto& w : row_warnings(r)) o << "> **" << w << "**\n\n";
  const json collapses = rep.value("routing_collapse", json::array());  // reports from before it have none
  for (const auto& e : collapses) o << "> **" << collapse_summary(e) << "** See *Routing collapse* below.\n\n";
  o << "## Result (FlagPerf's row)\n\n";
  o << "| config | precision | parallel (TPxPPxDPxEP) | tokens/s/chip | loss | memory used/total | MFU |\n|---|---|---|---|---|---|---|\n";
  o << fmt::format("| {} | {} | {} | {} | {} | {} / {} | {} |\n\n", r["config"].get<std::string>(), r["precision"].get<std::string>(),
                   r["parallel"].get<std::string>(), num(r["tokens_per_s_per_chip"], "{:.1f}"), num(r["lm_loss_last"], "{:.4f}"),
                   gib(r["peak_memory_used_bytes"]), gib(r["peak_memory_total_bytes"]),
                   r["mfu"]["megatron"].is_number() ? pct(r["mfu"]["megatron"]) : std::string("invalid (see above)"));
  o << "| | |\n|---|---|\n";
  for (const auto& [k, v] : result_rows(r)) o << "| " << k << " | " << v << " |\n";
  o << "\n## MFU conventions\n\nEach is FLOPs per step over step time x devices x the peak; the FLOPs are counted thus:\n\n"
       "| convention | FLOPs per step |\n|---|---|\n";
  for (const auto& [k, v] : formula_rows(r)) o << "| " << k << " | " << v << " |\n";
  if (!collapses.empty()) {
    o << fmt::format("\n## Routing collapse\n\nThe busiest expert at >= {:.0f}x the mean load, or {:.0f} % of the experts "
                     "idle, for {} iterations in a row after the first {} (docs/training.md). Loads at the warning:\n\n",
                     kCollapseMaxOverMean, 100 * kCollapseIdleFraction, kCollapseIterations, kCollapseGraceIterations);
    for (const auto& e : collapses) {
      o << collapse_summary(e) << "\n\n| MoE layer | busiest / mean | idle experts |\n|---|---|---|\n";
      for (size_t i = 0; i < e["moe_layers"].size(); ++i) {
        o << fmt::format("| {} | {:.2f} | {} of {} |\n", e["moe_layers"][i].get<int64_t>(), e["max_over_mean"][i].get<double>(),
                         e["idle_experts"][i].get<int64_t>(), e["num_experts"].get<int64_t>());
      }
      o << "\n" << e["causes"].get<std::string>() << ".\n\n";
    }
  }
  const auto& s = rep["steady_state"];
  o << fmt::format("\n## Steady state\n\nIterations {}..{} ({} iterations; the first {} left out as warm-up). Medians with "
                   "the interquartile range:\n\n| metric | median | p25 | p75 | min | max |\n|---|---|---|---|---|---|\n",
                   s["first_iteration"].get<int64_t>(), s["last_iteration"].get<int64_t>(), s["iterations"].get<int64_t>(),
                   s["warmup_iterations"].get<int64_t>());
  for (const char* key : kSteadyStateKeys) {
    const auto& st = s[key];
    o << fmt::format("| {} | {} | {} | {} | {} | {} |\n", key, num(st["median"]), num(st["p25"]), num(st["p75"]),
                     num(st["min"]), num(st["max"]));
  }
  o << "\n## Accuracy\n\n";
  if (rep["accuracy"].is_null()) {
    o << "No reference given (`--reference`).\n";
  } else {
    const auto& a = rep["accuracy"];
    o << fmt::format("Reference: `{}` ({}). {}\n\n", a["reference"].get<std::string>(), a["reference_kind"].get<std::string>(),
                     a["message"].get<std::string>());
    if (a.contains("step_time_ratio_reference_over_run")) {
      o << fmt::format("Step time, reference / this run: {:.3f}\n\n", a["step_time_ratio_reference_over_run"].get<double>());
    }
    o << "| iteration | loss | reference | relative error |\n|---|---|---|---|\n";
    for (const auto& p : a["per_step"]) {
      o << fmt::format("| {} | {:.6f} | {:.6f} | {:.4f} % |\n", p["iteration"].get<int64_t>(), p["lm_loss"].get<double>(),
                       p["reference_lm_loss"].get<double>(), 100 * p["relative_error"].get<double>());
    }
  }
  o << "\n## Fingerprint\n\n| | |\n|---|---|\n";
  for (const auto& [k, v] : environment_rows(rep["environment"])) o << "| " << k << " | `" << v << "` |\n";
  return o.str();
}

std::string render_html(const json& rep) {
  const auto& series = rep["series"];
  const auto x = column(series, metric::kIteration);
  auto make = [&](const std::string& name, const char* key, int color) {
    return Series{name, kColors[color], x, column(series, key)};
  };
  // Iterations before the steady state (left out of the statistics) are shaded.
  ChartOptions opts;
  opts.warmup_before = rep["steady_state"]["warmup_iterations"].get<int64_t>() > 0
                        ? rep["steady_state"]["first_iteration"].get<double>()
                        : 0.0;
  std::vector<std::string> charts;
  std::vector<Series> loss{make("LM loss", metric::kLmLoss, 0)};
  if (series.contains("reference_lm_loss")) {
    // Drawn dashed with markers over the run's: a run that equals its reference must not hide it.
    loss.push_back(make("reference (dashed)", "reference_lm_loss", 1));
    loss.back().dash = "6 4";
  }
  charts.push_back(line_chart("LM loss" + std::string(loss.size() > 1 ? " against the reference" : ""), "loss (nats per token)",
                              loss, opts));
  auto mfu = column(series, metric::kMfu), mfu6 = column(series, metric::kMfu6N);
  for (auto* v : {&mfu, &mfu6}) for (auto& y : *v) y *= 100;
  charts.push_back(line_chart("MFU per iteration", "MFU (%)", {{"Megatron formula", kColors[0], x, mfu}, {"6N", kColors[2], x, mfu6}}, opts));
  charts.push_back(line_chart("Throughput", "tokens/s per chip", {make("tokens/s/chip", metric::kTokensPerSecond, 0)}, opts));
  charts.push_back(stacked_bars("Time per iteration", "time (s)", x,
                                {make("data", metric::kTimeData, 7), make("forward", metric::kTimeForward, 0),
                                 make("backward", metric::kTimeBackward, 2), make("pipeline wait", metric::kTimePipelineWait, 3),
                                 make("grad reduce", metric::kTimeGradReduce, 4), make("optimizer", metric::kTimeOptimizer, 5)},
                                opts));
  const bool has_comm = series.contains(metric::kTimeComm) &&
                        std::any_of(series[metric::kTimeComm].begin(), series[metric::kTimeComm].end(),
                                    [](const json& v) { return v.is_number(); });
  // One process has nothing to communicate: say so rather than draw an axis scaled to its zeros.
  const bool one_process = rep["result"].value("devices", int64_t{0}) == 1;
  if (one_process) {
    charts.push_back(empty_chart("Communication per iteration", "no communication (one process)"));
  } else if (has_comm) {  // runs from before these keys have none
    charts.push_back(line_chart("Communication per iteration", "time (s)",
                                {make("collectives in flight", metric::kTimeComm, 4),
                                 make("exposed (compute waited)", metric::kTimeCommExposed, 1)},
                                opts));
  }
  charts.push_back(line_chart("Expert load (busiest expert / mean)", "busiest / mean",
                              {make("max over layers", metric::kExpertLoadMaxOverMean, 1)}, opts));
  // Every layer's load, iteration by iteration: which layers collapse, and when.
  if (series.contains(metric::kExpertLoadPerLayer) && !series[metric::kExpertLoadPerLayer].empty() &&
      !series[metric::kExpertLoadPerLayer][0].empty()) {
    std::vector<std::vector<double>> rows(series[metric::kExpertLoadPerLayer][0].size());
    for (const auto& per : series[metric::kExpertLoadPerLayer]) {
      for (size_t l = 0; l < rows.size(); ++l) rows[l].push_back(per.size() > l ? per[l].get<double>() : NAN);
    }
    charts.push_back(heatmap("Expert load per MoE layer (busiest expert / mean)", "MoE layer", x, rows, 1.0, opts));
  }
  charts.push_back(per_rank_chart(rep));
  std::erase(charts, std::string());

  std::ostringstream o;
  const auto& r = rep["result"];
  o << "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>moeforge report: " << esc(r["config"].get<std::string>())
    << "</title><style>body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}"
       "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}"
       ".pass{background:#e6f4ea;border:1px solid #34a853;padding:8px}.fail{background:#fce8e6;border:1px solid #d93025;padding:8px}"
       ".plots{display:flex;flex-wrap:wrap;gap:12px}svg .t{font-size:14px;font-weight:600}svg .plot{fill:none;stroke:#999}"
       "svg .grid{stroke:#eee}svg .yl{font-size:11px;text-anchor:end}svg .xl{font-size:11px;text-anchor:middle}svg .lg{font-size:12px}"
       "svg .warm{fill:#f3f3f3}svg .wl{font-size:10px;fill:#888}svg .none{font-size:14px;fill:#666}"
       "code{font-size:12px}</style></head><body>\n";
  o << "<h1>moeforge benchmark report</h1><p>Run <code>" << esc(rep["run_dir"].get<std::string>()) << "</code>, generated "
    << esc(rep["generated_at"].get<std::string>()) << ".</p>\n";
  if (r.value("moe_router_force_load_balancing", false)) o << "<div class=\"fail\">" << esc(kForcedBalanceNote) << "</div>\n";
  for (const auto& w : row_warnings(r)) o << "<div class=\"fail\">" << esc(w) << "</div>\n";
  for (const auto& e : rep.value("routing_collapse", json::array())) {
    o << "<div class=\"fail\">" << esc(collapse_summary(e)) << "<br>" << esc(e["causes"].get<std::string>()) << ".</div>\n";
  }
  o << "<h2>Result</h2><table>";
  for (const auto& [k, v] : result_rows(r)) o << "<tr><th>" << esc(k) << "</th><td>" << esc(v) << "</td></tr>";
  o << "</table>\n<h2>MFU conventions</h2><table>";
  for (const auto& [k, v] : formula_rows(r)) o << "<tr><th>" << esc(k) << "</th><td>" << esc(v) << "</td></tr>";
  o << "</table>\n<h2>Accuracy</h2>";
  if (rep["accuracy"].is_null()) {
    o << "<p>No reference given.</p>";
  } else {
    const auto& a = rep["accuracy"];
    const char* cls = a["pass"].is_boolean() ? (a["pass"].get<bool>() ? "pass" : "fail") : "fail";
    o << "<div class=\"" << cls << "\">" << esc(a["message"].get<std::string>()) << "<br>Reference: <code>"
      << esc(a["reference"].get<std::string>()) << "</code> (" << esc(a["reference_kind"].get<std::string>()) << ")</div>";
  }
  o << "\n<h2>Plots</h2><div class=\"plots\">";
  for (const auto& c : charts) o << c << "\n";
  o << "</div>\n" << expert_load_histograms_html(rep) << "<h2>Steady state</h2><p>" << rep["steady_state"]["iterations"].get<int64_t>() << " iterations ("
    << rep["steady_state"]["warmup_iterations"].get<int64_t>() << " warm-up left out)</p><table><tr><th>metric</th><th>median</th>"
    << "<th>p25</th><th>p75</th><th>min</th><th>max</th></tr>";
  for (const char* key : kSteadyStateKeys) {
    const auto& st = rep["steady_state"][key];
    o << "<tr><td>" << key << "</td><td>" << num(st["median"]) << "</td><td>" << num(st["p25"]) << "</td><td>" << num(st["p75"])
      << "</td><td>" << num(st["min"]) << "</td><td>" << num(st["max"]) << "</td></tr>";
  }
  o << "</table>\n<h2>Fingerprint</h2><table>";
  for (const auto& [k, v] : environment_rows(rep["environment"])) o << "<tr><th>" << esc(k) << "</th><td><code>" << esc(v) << "</code></td></tr>";
  o << "</table>\n<script>document.body.dataset.plots = document.querySelectorAll('svg polyline, svg rect').length > 0 ? "
       "document.querySelectorAll('svg').length : 0;</script>\n</body></html>\n";
  return o.str();
}

namespace {

// The config cell of a comparison row, naming forced routing (a benchmark, not training).
std::string comparison_config_cell(const json& r) {
  return r["config"].get<std::string>() + (r.value("routing", "") == "forced" ? " (forced routing)" : "");
}

}  // namespace

std::string render_comparison_markdown(const json& c) {
  std::ostringstream o;
  o << "# moeforge benchmark comparison" << (c.contains("title") ? ": " + c["title"].get<std::string>() : std::string())
    << "\n\nBaseline (ratios 1.00): `" << c["baseline"].get<std::string>()
    << "`. Each run's full report is in its own directory.\n\n"
    << "| config | precision | parallel (TPxPPxDPxEP) | tokens/s/chip | vs baseline | loss | memory used/total | MFU | "
       "MFU (6N) | accuracy |\n|---|---|---|---|---|---|---|---|---|---|\n";
  for (const auto& r : c["runs"]) {
    const std::string acc = r["accuracy_pass"].is_null() ? "-"
                            : fmt::format("{} ({:.2f} %)", r["accuracy_pass"].get<bool>() ? "PASS" : "FAIL",
                                          100 * r["mean_relative_error"].get<double>());
    o << fmt::format("| {} | {} | {} | {} | {:.2f}x | {} | {} / {} | {} | {} | {} |\n", comparison_config_cell(r),
                     r["precision"].get<std::string>(), r["parallel"].get<std::string>(),
                     num(r["tokens_per_s_per_chip"], "{:.1f}"), r["tokens_per_s_per_chip_vs_baseline"].get<double>(),
                     num(r["lm_loss_last"], "{:.4f}"), gib(r["peak_memory_used_bytes"]), gib(r["peak_memory_total_bytes"]),
                     mfu_short(r, "megatron"), mfu_short(r, "six_n"), acc);
  }
  o << render_comparability(c, false);
  o << render_routing_markdown(c);
  return o.str();
}

std::string render_comparability(const json& c, bool html) {
  // One line per run and cause; the Markdown and the HTML say the same words.
  const auto code = [html](const std::string& s) { return html ? "<code>" + esc(s) + "</code>" : "`" + s + "`"; };
  const auto text = [html](const std::string& s) { return html ? esc(s) : s; };
  std::vector<std::pair<std::string, std::string>> flags;  // (heading, sentence)
  for (const auto& r : c["runs"]) {
    const std::string run = code(r["run_dir"].get<std::string>());
    if (r.contains("config_differences") && !r["config_differences"].empty()) {
      std::vector<std::string> keys;
      for (const auto& d : r["config_differences"]) {
        keys.push_back(fmt::format("{} ({} here, {} in the baseline)", code(d["key"].get<std::string>()),
                                   text(trim_yaml(d["run"])), text(trim_yaml(d["baseline"]))));
      }
      flags.emplace_back("Not like for like:", fmt::format("{} differs from the baseline's config in more than hardware: {}.",
                                                           run, fmt::join(keys, "; ")));
    }
    if (r.contains("peak_difference") && r["peak_difference"].is_object()) {
      const auto& d = r["peak_difference"];
      flags.emplace_back("MFU not comparable:",
                         fmt::format("{} divides by a peak of {} TFLOP/s, source: {}; the baseline by {}, source: {}, on the same "
                                     "chip. Compare tokens/s/chip and step times instead.",
                                     run, num(d["peak_tflops"]), text(d["peak_source"].is_string() ? d["peak_source"].get<std::string>() : "-"),
                                     num(d["baseline_peak_tflops"]),
                                     text(d["baseline_peak_source"].is_string() ? d["baseline_peak_source"].get<std::string>() : "-")));
    }
  }
  std::string o;
  for (const auto& [heading, line] : flags) {
    o += html ? "<div class=\"fail\"><strong>" + heading + "</strong> " + line + "</div>\n"
              : "> **" + heading + "** " + line + "\n\n";
  }
  return o.empty() || html ? o : "\n" + o;
}

std::string render_comparison_html(const json& c) {
  std::ostringstream o;
  const std::string title =
      "moeforge benchmark comparison" + (c.contains("title") ? ": " + c["title"].get<std::string>() : std::string());
  o << "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>" << esc(title) << "</title>"
       "<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse}"
       "td,th{border:1px solid #ccc;padding:3px 8px;font-size:14px}svg text{font-size:12px}"
       "svg .t{font-size:14px;font-weight:600}svg .plot{fill:none;stroke:#999}svg .grid{stroke:#eee}"
       "svg .yl{font-size:11px;text-anchor:end}svg .xl{font-size:11px;text-anchor:middle}svg .lg{font-size:12px}"
       ".fail{background:#fce8e6;border:1px solid #d93025;padding:8px;margin:8px 0}</style></head><body>"
       "<h1>" << esc(title) << "</h1><table><tr><th>config</th><th>precision</th><th>parallel</th>"
       "<th>tokens/s/chip</th><th>vs baseline</th><th>loss</th><th>memory used/total</th><th>MFU</th><th>MFU (6N)</th>"
       "<th>accuracy</th></tr>";
  double top = 0;
  for (const auto& r : c["runs"]) top = std::max(top, r["tokens_per_s_per_chip"].get<double>());
  for (const auto& r : c["runs"]) {
    o << "<tr><td>" << esc(comparison_config_cell(r)) << "</td><td>" << esc(r["precision"].get<std::string>())
      << "</td><td>" << esc(r["parallel"].get<std::string>()) << "</td><td>" << num(r["tokens_per_s_per_chip"], "{:.1f}")
      << "</td><td>" << fmt::format("{:.2f}x", r["tokens_per_s_per_chip_vs_baseline"].get<double>()) << "</td><td>"
      << num(r["lm_loss_last"], "{:.4f}") << "</td><td>" << gib(r["peak_memory_used_bytes"]) << " / "
      << gib(r["peak_memory_total_bytes"]) << "</td><td>" << mfu_short(r, "megatron") << "</td><td>" << mfu_short(r, "six_n")
      << "</td><td>"
      << (r["accuracy_pass"].is_null() ? std::string("-")
                                       : fmt::format("{} ({:.2f} %)", r["accuracy_pass"].get<bool>() ? "PASS" : "FAIL",
                                                     100 * r["mean_relative_error"].get<double>()))
      << "</td></tr>";
  }
  // The labels' column is as wide as the longest label (about 7 px a character at 12 px), never cut.
  const double row_h = 26, width = 520;
  size_t longest = 0;
  for (const auto& r : c["runs"]) {
    longest = std::max(longest, comparison_config_cell(r).size() + 1 + r["parallel"].get<std::string>().size());
  }
  const double label_w = std::max(250.0, 7.0 * static_cast<double>(longest) + 12);
  o << "</table>" << render_comparability(c, true)
    << "<h2>tokens/s/chip</h2><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << label_w + width + 10 << "\" height=\""
    << row_h * static_cast<double>(c["runs"].size()) + 10 << "\">";
  double y = 4;
  for (const auto& r : c["runs"]) {
    const double v = r["tokens_per_s_per_chip"].get<double>();
    const double bar = top > 0 ? v / top * (width - 80) : 0;
    o << fmt::format(R"(<text x="0" y="{:.0f}">{}</text><rect x="{:.0f}" y="{:.0f}" width="{:.1f}" height="18" fill="#1f77b4"/>)"
                     R"(<text x="{:.1f}" y="{:.0f}">{:.1f}</text>)",
                     y + 14, esc(comparison_config_cell(r) + " " + r["parallel"].get<std::string>()), label_w, y, bar,
                     label_w + 4 + bar, y + 14, v);
    y += row_h;
  }
  o << "</svg>" << render_routing_html(c) << loss_overlay_html(c) << "</body></html>\n";
  return o.str();
}

}  // namespace moeforge
