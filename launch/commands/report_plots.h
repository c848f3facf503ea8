// defines: html_escape, Axis, nice_axis, Series, ChartOptions, line_chart, stacked_bars,
//          heatmap, empty_chart
//
// The SVG plots of report.html, drawn here (no scripts, no resources from elsewhere). Axes a
// person can read: ticks at 1, 2 or 5 times a power of ten, whole iterations on the x axis, no
// tick below zero for data that is never negative, units in the axis labels, and the warm-up
// iterations the steady state leaves out shaded.
#pragma once

#include <string>
#include <vector>

namespace moeforge {

std::string html_escape(const std::string& s);

struct Axis {
  double lo = 0, hi = 1;
  std::vector<double> ticks;  // lo and hi are the first and last
};

// About `target` ticks covering [lo, hi] at 1, 2 or 5 times a power of ten; `integer`: steps of at
// least 1 (iterations); `nonnegative`: nothing below 0.
Axis nice_axis(double lo, double hi, int target, bool integer, bool nonnegative);

struct Series {
  std::string name, color;
  std::vector<double> x, y;  // NaN = gap
  // A curve that may lie exactly on another (a run against its own reference) is drawn dashed
  // over it with hollow markers, so both stay visible; empty = solid.
  std::string dash = {};
};

struct ChartOptions {
  std::string xlabel = "iteration";
  double warmup_before = 0;  // iterations below this are shaded as warm-up; 0 = none
};

std::string line_chart(const std::string& title, const std::string& ylabel, const std::vector<Series>& series,
                       const ChartOptions& options = {});
std::string stacked_bars(const std::string& title, const std::string& ylabel, const std::vector<double>& x,
                         const std::vector<Series>& parts, const ChartOptions& options = {});
// A plot's frame with a sentence where the curves would be: what was not measured, and why
// ("no communication (one process)"), instead of an empty axis.
std::string empty_chart(const std::string& title, const std::string& message);
// rows[r][c]: the value of row r (a layer) at x[c]; white at `low`, the darkest red at the maximum.
std::string heatmap(const std::string& title, const std::string& row_label, const std::vector<double>& x,
                    const std::vector<std::vector<double>>& rows, double low, const ChartOptions& options = {});

}  // namespace moeforge
