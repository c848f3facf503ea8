#include "launch/commands/report_routing.h"

#include "core/base/errors.h"
#include "core/files/file_names.h"
#include "launch/commands/report.h"
#include "launch/commands/report_plots.h"
#include "launch/train/metrics.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <tuple>

using nlohmann::json;
namespace fs = std::filesystem;

namespace moeforge {

namespace {

constexpr const char* kComputeBeforeAllToAll = "compute_before_all_to_all_s";

constexpr const char* kStragglerFormula =
    "straggler cost = median step time (natural) - median step time (forced); EP wait = median over the natural run's "
    "steady steps of max_r c_r - mean_r c_r, c_r = rank r's rank_times.compute_before_all_to_all_s (its compute before "
    "each all-to-all, summed over the step's all-to-alls), over each EP group's ranks (the largest group's value); "
    "rest = straggler cost - EP wait";

bool forced(const json& report) { return report["result"].value("moe_router_force_load_balancing", false); }

std::string run_name(const json& report) {
  fs::path p = fs::path(report["run_dir"].get<std::string>()).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  return p.filename().string();
}

std::string seconds_cell(const json& v) { return v.is_number() ? fmt::format("{:.4g} s", v.get<double>()) : std::string("-"); }

}  // namespace

json ep_compute_spread(const std::vector<json>& metrics, int64_t warmup, const ParallelLayout& layout) {
  json out = {{"key", fmt::format("{}.{}", metric::kRankTimes, kComputeBeforeAllToAll)},
              {"statistic", "max - mean over each EP group's ranks, the largest over the groups"},
              {"median_s", nullptr}};
  if (layout.ep() <= 1) {
    out["why"] = "one EP rank: no all-to-all to wait at";
    return out;
  }
  // An EP group: the ranks of one stage, TP index and expert-data-parallel index.
  std::map<std::tuple<int64_t, int64_t, int64_t>, std::vector<size_t>> groups;
  for (int64_t r = 0; r < layout.world(); ++r) {
    const auto c = layout.coordinates(r);
    groups[{c.pp, c.tp, c.edp}].push_back(static_cast<size_t>(r));
  }
  json per_step = json::array();
  std::vector<double> values;
  for (size_t i = static_cast<size_t>(std::max<int64_t>(warmup, 0)); i < metrics.size(); ++i) {
    const auto& m = metrics[i];
    if (!m.contains(metric::kRankTimes) || !m[metric::kRankTimes].contains(kComputeBeforeAllToAll)) continue;
    const auto c = m[metric::kRankTimes][kComputeBeforeAllToAll].get<std::vector<double>>();
    if (std::ssize(c) != layout.world()) continue;
    double worst = 0;
    for (const auto& [key, ranks] : groups) {
      double max = 0, sum = 0;
      for (size_t r : ranks) max = std::max(max, c[r]), sum += c[r];
      worst = std::max(worst, max - sum / static_cast<double>(ranks.size()));
    }
    per_step.push_back({{"iteration", m[metric::kIteration]}, {"spread_s", worst}});
    values.push_back(worst);
  }
  if (values.empty()) {
    out["why"] = fmt::format("no steady step has {}.{} for every rank (a run from before it was recorded)", metric::kRankTimes,
                             kComputeBeforeAllToAll);
    return out;
  }
  out["median_s"] = steady_stats(values)["median"];
  out["per_step"] = per_step;
  return out;
}

json expert_loads_summary(const fs::path& run_dir, int64_t first_iteration) {
  const fs::path path = run_dir / files::kExpertLoads;
  std::ifstream in(path);
  if (!in) return nullptr;
  std::vector<json> lines;
  std::string text;
  for (int64_t n = 1; std::getline(in, text); ++n) {
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto j = json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.contains(metric::kIteration) || !j.contains(kTokensPerExpert)) {
      fail_user("{}:{}: not an expert-loads line ({{\"iteration\": N, \"{}\": [[...], ...]}} expected); delete the line or "
                "the file (logging.expert_loads_interval writes it)",
                path.string(), n, kTokensPerExpert);
    }
    lines.push_back(std::move(j));
  }
  if (lines.empty()) return nullptr;
  const bool any_steady = std::any_of(lines.begin(), lines.end(), [&](const json& j) {
    return j[metric::kIteration].get<int64_t>() >= first_iteration;
  });
  json iterations = json::array();
  std::vector<std::vector<int64_t>> sum;
  for (const auto& j : lines) {
    if (any_steady && j[metric::kIteration].get<int64_t>() < first_iteration) continue;
    const auto counts = j[kTokensPerExpert].get<std::vector<std::vector<int64_t>>>();
    if (sum.empty()) sum.assign(counts.size(), {});
    for (size_t l = 0; l < counts.size() && l < sum.size(); ++l) {
      if (sum[l].empty()) sum[l].assign(counts[l].size(), 0);
      for (size_t e = 0; e < counts[l].size() && e < sum[l].size(); ++e) sum[l][e] += counts[l][e];
    }
    iterations.push_back(j[metric::kIteration]);
  }
  return {{"file", path.string()}, {"iterations", iterations}, {kTokensPerExpert, sum}};
}

json routing_comparison(const std::vector<json>& reports) {
  json out = {{"runs", json::array()}, {"straggler_cost", nullptr}};
  std::optional<size_t> natural, forced_run;
  for (size_t i = 0; i < reports.size(); ++i) {
    const bool f = forced(reports[i]);
    out["runs"].push_back({{"run_dir", reports[i]["run_dir"]}, {"routing", f ? "forced" : "natural"}});
    if (f && !forced_run) forced_run = i;
    if (!f && !natural) natural = i;
  }
  if (!natural || !forced_run) return out;
  const json& nat = reports[*natural];
  const json& frc = reports[*forced_run];
  out["title"] = fmt::format("natural routing ({}) against forced routing ({})", run_name(nat), run_name(frc));
  const double t_nat = nat["result"]["step_time_s"].get<double>(), t_frc = frc["result"]["step_time_s"].get<double>();
  const double cost = t_nat - t_frc;
  const json wait = nat.contains("ep_compute_spread") ? nat["ep_compute_spread"]["median_s"] : json(nullptr);
  json sc = {{"natural_run", nat["run_dir"]},
             {"forced_run", frc["run_dir"]},
             {"natural_step_time_s", t_nat},
             {"forced_step_time_s", t_frc},
             {"straggler_cost_s", cost},
             {"straggler_cost_fraction", t_nat > 0 ? json(cost / t_nat) : json(nullptr)},
             {"ep_wait_s", wait},
             {"rest_s", wait.is_number() ? json(cost - wait.get<double>()) : json(nullptr)},
             {"forced_ep_wait_s", frc.contains("ep_compute_spread") ? frc["ep_compute_spread"]["median_s"] : json(nullptr)},
             {"formula", kStragglerFormula}};
  if (!wait.is_number()) sc["why_no_split"] = nat.contains("ep_compute_spread") ? nat["ep_compute_spread"].value("why", "") : "";
  out["straggler_cost"] = sc;
  return out;
}

void add_routing_comparison(json& comparison, const std::vector<json>& reports) {
  const json routing = routing_comparison(reports);
  for (size_t i = 0; i < reports.size() && i < comparison["runs"].size(); ++i) {
    auto& row = comparison["runs"][i];
    row["routing"] = routing["runs"][i]["routing"];
    row["step_time_s"] = reports[i]["result"]["step_time_s"];
  }
  if (routing.contains("title")) comparison["title"] = routing["title"];
  comparison["routing"] = routing["runs"];
  comparison["straggler_cost"] = routing["straggler_cost"];
  json curves = json::array();
  for (const auto& rep : reports) {
    curves.push_back({{"name", run_name(rep)},
                      {"routing", forced(rep) ? "forced" : "natural"},
                      {"iteration", rep["series"][metric::kIteration]},
                      {"lm_loss", rep["series"][metric::kLmLoss]}});
  }
  comparison["loss_curves"] = curves;
}

namespace {

// Each run: routing, tokens/s/chip, every MFU convention its row has, step time.
std::vector<std::vector<std::string>> routing_table(const json& c, std::vector<std::string>& header) {
  header = {"run", "routing", "tokens/s/chip", "step time (median)"};
  std::vector<std::string> mfu_keys;
  for (const auto& r : c["runs"]) {
    for (const auto& [key, v] : r["mfu"].items()) {
      if (std::find(mfu_keys.begin(), mfu_keys.end(), key) == mfu_keys.end()) mfu_keys.push_back(key);
    }
  }
  for (const auto& k : mfu_keys) header.push_back("MFU (" + k + ")");
  std::vector<std::vector<std::string>> rows;
  for (const auto& r : c["runs"]) {
    std::vector<std::string> row = {r["run_dir"].get<std::string>(), r.value("routing", std::string("-")),
                                    r["tokens_per_s_per_chip"].is_number()
                                        ? fmt::format("{:.1f}", r["tokens_per_s_per_chip"].get<double>())
                                        : std::string("-"),
                                    seconds_cell(r.value("step_time_s", json(nullptr)))};
    for (const auto& k : mfu_keys) {
      const bool invalid = r.contains("mfu_invalid") && r["mfu_invalid"].contains(k);
      const json v = r["mfu"].value(k, json(nullptr));
      row.push_back(invalid ? std::string("invalid") : v.is_number() ? fmt::format("{:.2f} %", 100 * v.get<double>()) : "-");
    }
    rows.push_back(row);
  }
  return rows;
}

std::vector<std::pair<std::string, std::string>> straggler_rows(const json& s) {
  std::vector<std::pair<std::string, std::string>> rows = {
      {"natural routing, median step time", seconds_cell(s["natural_step_time_s"])},
      {"forced routing, median step time", seconds_cell(s["forced_step_time_s"])},
      {"straggler cost (natural - forced)",
       seconds_cell(s["straggler_cost_s"]) + (s["straggler_cost_fraction"].is_number()
                                             ? fmt::format(" ({:.1f} % of the natural step)", 100 * s["straggler_cost_fraction"].get<double>())
                                             : std::string())},
      {"(a) EP ranks waiting for the busiest one", seconds_cell(s["ep_wait_s"])},
      {"(b) the rest", seconds_cell(s["rest_s"])},
      {"same spread under forced routing (noise floor)", seconds_cell(s["forced_ep_wait_s"])}};
  if (s.contains("why_no_split")) rows.emplace_back("why (a) is unknown", s["why_no_split"].get<std::string>());
  return rows;
}

}  // namespace

std::string render_routing_markdown(const json& c) {
  if (!c.contains("routing")) return "";
  std::ostringstream o;
  std::vector<std::string> header;
  const auto rows = routing_table(c, header);
  o << "\n## Routing\n\n|";
  for (const auto& h : header) o << " " << h << " |";
  o << "\n|";
  for (size_t i = 0; i < header.size(); ++i) o << "---|";
  o << "\n";
  for (const auto& row : rows) {
    o << "|";
    for (const auto& cell : row) o << " " << cell << " |";
    o << "\n";
  }
  if (c["straggler_cost"].is_object()) {
    const auto& s = c["straggler_cost"];
    o << "\n### The straggler's cost\n\n| | |\n|---|---|\n";
    for (const auto& [k, v] : straggler_rows(s)) o << "| " << k << " | " << v << " |\n";
    o << "\n" << s["formula"].get<std::string>() << " (docs/report.md).\n";
  }
  return o.str();
}

std::string render_routing_html(const json& c) {
  if (!c.contains("routing")) return "";
  std::ostringstream o;
  std::vector<std::string> header;
  const auto rows = routing_table(c, header);
  o << "<h2>Routing</h2><table><tr>";
  for (const auto& h : header) o << "<th>" << html_escape(h) << "</th>";
  o << "</tr>";
  for (const auto& row : rows) {
    o << "<tr>";
    for (const auto& cell : row) o << "<td>" << html_escape(cell) << "</td>";
    o << "</tr>";
  }
  o << "</table>\n";
  if (c["straggler_cost"].is_object()) {
    const auto& s = c["straggler_cost"];
    o << "<h2>The straggler's cost</h2><table>";
    for (const auto& [k, v] : straggler_rows(s)) o << "<tr><th>" << html_escape(k) << "</th><td>" << html_escape(v) << "</td></tr>";
    o << "</table><p>" << html_escape(s["formula"].get<std::string>()) << " (docs/report.md).</p>\n";
  }
  return o.str();
}

std::string loss_overlay_html(const json& c) {
  if (!c.contains("loss_curves") || c["loss_curves"].empty()) return "";
  static const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"};
  std::vector<Series> series;
  size_t k = 0;
  for (const auto& curve : c["loss_curves"]) {
    Series s{curve["name"].get<std::string>() + " (" + curve["routing"].get<std::string>() + ")", colors[k++ % 8], {}, {}};
    for (size_t i = 0; i < curve["iteration"].size(); ++i) {
      s.x.push_back(curve["iteration"][i].is_number() ? curve["iteration"][i].get<double>() : NAN);
      s.y.push_back(i < curve["lm_loss"].size() && curve["lm_loss"][i].is_number() ? curve["lm_loss"][i].get<double>() : NAN);
    }
    series.push_back(std::move(s));
  }
  return "<h2>Loss curves</h2>" + line_chart("LM loss of each run", "loss (nats per token)", series) + "\n";
}

std::string expert_load_histograms_html(const json& report) {
  if (!report.contains("expert_loads") || !report["expert_loads"].is_object()) return "";
  const auto& loads = report["expert_loads"];
  const auto counts = loads[kTokensPerExpert].get<std::vector<std::vector<int64_t>>>();
  if (counts.empty()) return "";
  // One small chart per MoE layer: how many experts (y) received how many tokens (x, 12 bins from 0
  // to the busiest expert of any layer, so the layers compare by eye); the mean marked. The x axis's
  // last label is right-aligned so that it stays inside the chart.
  int64_t top = 1;
  for (const auto& layer : counts) {
    for (int64_t v : layer) top = std::max(top, v);
  }
  constexpr int kBins = 12;
  constexpr double w = 180, h = 110, left = 26, bottom = 24, plot_w = w - left - 8, plot_h = h - bottom - 18;
  std::ostringstream o;
  const auto& its = loads["iterations"];
  o << "<h2>Tokens per expert, per MoE layer</h2><p>Each chart: how many experts (bar height) received how many tokens "
       "(x, 0 to "
    << top << ", the busiest expert of any layer), summed over the iterations " << (its.empty() ? 0 : its.front().get<int64_t>())
    << ".." << (its.empty() ? 0 : its.back().get<int64_t>()) << " of <code>" << html_escape(files::kExpertLoads)
    << "</code>. The red line is the mean: balanced routing puts every expert there.</p><div class=\"plots\">";
  for (size_t l = 0; l < counts.size(); ++l) {
    std::vector<int64_t> bins(kBins, 0);
    double sum = 0;
    for (int64_t v : counts[l]) {
      bins[static_cast<size_t>(std::min<int64_t>(kBins - 1, v * kBins / (top + 1)))] += 1;
      sum += static_cast<double>(v);
    }
    const int64_t most = std::max<int64_t>(1, *std::max_element(bins.begin(), bins.end()));
    o << fmt::format(R"(<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" role="img"><title>MoE layer {}</title>)"
                     R"(<text x="{}" y="12" class="lg">MoE layer {}</text>)",
                     w, h, l, left, l);
    for (int b = 0; b < kBins; ++b) {
      const double bh = plot_h * static_cast<double>(bins[static_cast<size_t>(b)]) / static_cast<double>(most);
      o << fmt::format(R"(<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" fill="#1f77b4"/>)",
                       left + plot_w * b / kBins, h - bottom - bh, plot_w / kBins - 1, bh);
    }
    const double mean = counts[l].empty() ? 0 : sum / static_cast<double>(counts[l].size());
    const double mx = left + plot_w * mean / static_cast<double>(top + 1);
    o << fmt::format(R"(<line x1="{:.1f}" x2="{:.1f}" y1="18" y2="{}" stroke="#d62728"/>)", mx, mx, h - bottom);
    o << fmt::format(R"(<rect x="{}" y="18" width="{}" height="{}" class="plot"/><text x="{}" y="{}" class="yl">{}</text>)"
                     R"(<text x="{}" y="{}" class="yl">0</text><text x="{}" y="{}" class="xl">0</text>)"
                     R"(<text x="{}" y="{}" class="yl">{}</text><text x="{}" y="{}" class="xl">tokens</text></svg>)",
                     left, plot_w, plot_h, left - 3, 26, most, left - 3, h - bottom, left, h - bottom + 12, left + plot_w,
                     h - bottom + 12, top, left + plot_w / 2, h - 2);
  }
  o << "</div>\n";
  return o.str();
}

}  // namespace moeforge
