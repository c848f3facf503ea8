// defines: ReportOptions, LossCurve, read_reference, parse_megatron_log, steady_stats,
//          accuracy_verdict, build_report, render_markdown, render_html, run_report, run_reports,
//          build_comparison, render_comparison_markdown, render_comparison_html
//
// `moeforge report RUN_DIR [--reference REF] [--out DIR]`: the benchmark result of a training run
// (its metrics.jsonl, config.yaml and environment.json) as FlagPerf's result row plus the numbers
// behind it, the accuracy verdict against a reference loss curve (our metrics or a Megatron-LM
// log), plots and the run's fingerprint: report.json (schema in docs/report.md), report.md and a
// self-contained report.html.
#pragma once

#include "launch/train/metrics.h"

#include <nlohmann/json.hpp>

#include <array>
#include <cstdint>
#include <istream>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace moeforge {

// The metrics whose steady-state statistics a report gives (report.json's steady_state).
inline constexpr std::array<const char*, 6> kSteadyStateKeys{metric::kStepTime, metric::kTokensPerSecond, metric::kTflops,
                                                             metric::kTflops6N,  metric::kMfu,            metric::kMfu6N};

// What a report shows for a field the run's fingerprint lacks (never a guessed value).
inline constexpr const char* kNotRecorded = "not recorded";

struct ReportOptions {
  std::string run_dir;
  std::string reference;           // metrics.jsonl, a run directory, or a Megatron-LM log; empty = none
  std::string out_dir;             // empty = <run_dir>/report
  std::optional<int64_t> warmup;   // iterations left out of the steady state; default in docs/report.md
  int64_t from_iteration = 21;     // FlagPerf compares the loss from step 21 on
  double threshold = 0.02;         // FlagPerf's pass criterion: mean relative error below 2 %
};

// A loss curve (and step times when known) by iteration.
struct LossCurve {
  std::map<int64_t, double> lm_loss, step_time_s;
  std::string source, kind;  // kind: "moeforge metrics" or "Megatron-LM log"
};

// Megatron-LM's (and moeforge train's) per-iteration log lines: "iteration N/ M | ... elapsed time
// per iteration (ms): X | ... lm loss: Y | ...". Lines without both are ignored.
LossCurve parse_megatron_log(std::istream& in, const std::string& source);
// A run directory or metrics.jsonl (moeforge), or a Megatron-LM log file. UserError when nothing parses.
LossCurve read_reference(const std::string& path);

// median, mean, min, max, stdev, p25, p75 (numpy's linear interpolation), count.
nlohmann::json steady_stats(std::vector<double> values);

// From `from` on, at the iterations both curves have: per-step relative errors |run - ref| / |ref|,
// their mean, and pass = mean < threshold (null when no iteration is shared).
nlohmann::json accuracy_verdict(const std::map<int64_t, double>& run, const LossCurve& reference, int64_t from,
                                double threshold);

nlohmann::json build_report(const ReportOptions& options);
std::string render_markdown(const nlohmann::json& report);
std::string render_html(const nlohmann::json& report);

int run_report(const ReportOptions& options);

// Several runs of a case (e.g. one per chip): each one's report into <out>/<run name>/, then
// <out>/comparison.{json,md,html}: one FlagPerf row per run and each run's throughput and MFU
// relative to the first (the baseline). One run: run_report().
int run_reports(ReportOptions options, const std::vector<std::string>& run_dirs);
nlohmann::json build_comparison(const std::vector<nlohmann::json>& reports);
// Per report, the keys of its resolved config that differ from the first's, other than hardware.*,
// logging.* and checkpoint.save/load: [{key, baseline, run}] (comparison.json's config_differences).
nlohmann::json config_differences(const std::vector<nlohmann::json>& reports);
// The comparison's flags, as Markdown (comparison.md) or HTML (comparison.html): a line per run
// whose config differs from the baseline's beyond hardware, and per run whose MFU divides by
// another peak than the baseline's on the same chip.
std::string render_comparability(const nlohmann::json& comparison, bool html);
std::string render_comparison_markdown(const nlohmann::json& comparison);
std::string render_comparison_html(const nlohmann::json& comparison);

}  // namespace moeforge
