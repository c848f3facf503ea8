#include "launch/commands/report_plots.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace moeforge {

namespace {

constexpr double W = 680, H = 260, L = 64, R = 130, T = 28, B = 40;  // the legend sits right of the plot

// A tick's label without floating-point residue (0.30000000000000004 -> 0.3).
std::string tick_label(double v) {
  if (std::abs(v) < 1e-12) return "0";
  return fmt::format("{:g}", std::stod(fmt::format("{:.10g}", v)));
}

double px_x(const Axis& a, double v) { return L + (v - a.lo) / (a.hi - a.lo) * (W - L - R); }
double px_y(const Axis& a, double v) { return H - B - (v - a.lo) / (a.hi - a.lo) * (H - T - B); }

// The room a legend needs right of the plot beyond the R reserved: its longest name at about 7 px
// a character (12 px system-ui), so no name is cut at the SVG's edge.
double legend_overflow(const std::vector<Series>& series) {
  size_t longest = 0;
  for (const auto& se : series) longest = std::max(longest, se.name.size());
  return std::max(0.0, 8 + 7.0 * static_cast<double>(longest) + 8 - R);
}

std::string frame(const std::string& title, const std::string& ylabel, const Axis& x, const Axis& y,
                  const ChartOptions& o, bool ygrid = true, double extra_width = 0) {
  std::string s = fmt::format(R"(<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" viewBox="0 0 {} {}" role="img">)"
                              R"(<title>{}</title><text x="{}" y="18" class="t">{}</text>)",
                              W + extra_width, H, W + extra_width, H, html_escape(title), L, html_escape(title));
  if (o.warmup_before > 0 && o.warmup_before > x.lo) {  // 0: no warm-up (the per-rank view has no iterations)
    const double right = px_x(x, std::min(o.warmup_before - 0.5, x.hi));
    s += fmt::format(R"(<rect x="{}" y="{}" width="{:.1f}" height="{}" class="warm"/><text x="{}" y="{}" class="wl">warm-up</text>)",
                     L, T, std::max(right - L, 0.0), H - T - B, L + 4, T + 12);
  }
  for (double v : y.ticks) {
    const double py = px_y(y, v);
    if (ygrid) s += fmt::format(R"(<line x1="{}" x2="{}" y1="{:.1f}" y2="{:.1f}" class="grid"/>)", L, W - R, py, py);
    s += fmt::format(R"(<text x="{}" y="{:.1f}" class="yl">{}</text>)", L - 4, py + 4, tick_label(v));
  }
  for (double v : x.ticks) s += fmt::format(R"(<text x="{:.1f}" y="{}" class="xl">{}</text>)", px_x(x, v), H - B + 16, tick_label(v));
  s += fmt::format(R"(<rect x="{}" y="{}" width="{}" height="{}" class="plot"/>)", L, T, W - L - R, H - T - B);
  s += fmt::format(R"svg(<text x="{}" y="{}" class="xl">{}</text><text x="12" y="{}" class="yl" transform="rotate(-90 12 {})">{}</text>)svg",
                   L + (W - L - R) / 2, H - 4, html_escape(o.xlabel), H / 2, H / 2, html_escape(ylabel));
  return s;
}

std::string legend(const std::vector<Series>& series) {
  std::string s;
  int at = 0;
  for (const auto& se : series) {
    s += fmt::format(R"(<text x="{}" y="{}" fill="{}" class="lg">{}</text>)", W - R + 8, T + 14 + 14 * at++, se.color,
                     html_escape(se.name));
  }
  return s;
}

Axis x_axis(const std::vector<double>& x) {
  double lo = INFINITY, hi = -INFINITY;
  for (double v : x) {
    if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
  }
  return nice_axis(lo, hi, 6, /*integer=*/true, /*nonnegative=*/lo >= 0);
}

// Half a column more on each side: bars and cells centred on the first and last iterations stay
// inside the frame instead of running under the legend.
Axis padded(Axis a) {
  a.lo -= 0.5;
  a.hi += 0.5;
  return a;
}

}  // namespace

std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '&': out += "&amp;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

Axis nice_axis(double lo, double hi, int target, bool integer, bool nonnegative) {
  if (!std::isfinite(lo) || !std::isfinite(hi)) lo = 0, hi = 1;
  if (hi <= lo) {  // one value: a range around it
    const double half = integer ? 1.0 : std::max(std::abs(lo) * 0.05, 1e-9);
    lo -= half, hi += half;
  }
  if (nonnegative) lo = std::max(lo, 0.0);
  const double raw = (hi - lo) / std::max(target, 1);
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  const double f = raw / magnitude;
  double step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * magnitude;
  if (integer) step = std::max(step, 1.0);
  auto first = static_cast<int64_t>(std::floor(lo / step + 1e-9));
  auto last = static_cast<int64_t>(std::ceil(hi / step - 1e-9));
  // k * step rounds: the end ticks must still cover the data.
  if (static_cast<double>(first) * step > lo) --first;
  if (static_cast<double>(last) * step < hi) ++last;
  if (last == first) ++last;
  Axis a;
  for (int64_t k = first; k <= last; ++k) a.ticks.push_back(static_cast<double>(k) * step);
  a.lo = a.ticks.front(), a.hi = a.ticks.back();
  return a;
}

std::string line_chart(const std::string& title, const std::string& ylabel, const std::vector<Series>& series,
                       const ChartOptions& o) {
  std::vector<double> xs;
  double y0 = INFINITY, y1 = -INFINITY;
  for (const auto& s : series) {
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i])) continue;
      xs.push_back(s.x[i]);
      y0 = std::min(y0, s.y[i]), y1 = std::max(y1, s.y[i]);
    }
  }
  if (xs.empty()) return "";
  const Axis x = x_axis(xs), y = nice_axis(y0, y1, 5, false, /*nonnegative=*/y0 >= 0);
  std::string s = frame(title, ylabel, x, y, o, true, legend_overflow(series));
  for (const auto& se : series) {
    std::string points, markers;
    for (size_t i = 0; i < se.x.size(); ++i) {
      if (!std::isfinite(se.y[i])) continue;
      points += fmt::format("{:.1f},{:.1f} ", px_x(x, se.x[i]), px_y(y, se.y[i]));
      if (!se.dash.empty()) {
        markers += fmt::format(R"(<circle cx="{:.1f}" cy="{:.1f}" r="3" fill="white" stroke="{}"/>)", px_x(x, se.x[i]),
                               px_y(y, se.y[i]), se.color);
      }
    }
    s += fmt::format(R"(<polyline points="{}" fill="none" stroke="{}" stroke-width="1.6"{}/>)", points, se.color,
                     se.dash.empty() ? std::string() : fmt::format(R"( stroke-dasharray="{}")", se.dash));
    s += markers;
  }
  return s + legend(series) + "</svg>";
}

std::string stacked_bars(const std::string& title, const std::string& ylabel, const std::vector<double>& x_values,
                         const std::vector<Series>& parts, const ChartOptions& o) {
  if (x_values.empty()) return "";
  double top = 0;
  for (size_t i = 0; i < x_values.size(); ++i) {
    double sum = 0;
    for (const auto& p : parts) sum += std::isfinite(p.y[i]) ? p.y[i] : 0;
    top = std::max(top, sum);
  }
  const Axis x = padded(x_axis(x_values)), y = nice_axis(0, top > 0 ? top : 1, 5, false, true);
  std::string s = frame(title, ylabel, x, y, o, true, legend_overflow(parts));
  const double width = std::max((W - L - R) / (x.hi - x.lo) * 0.8, 0.5);
  for (size_t i = 0; i < x_values.size(); ++i) {
    double base = 0;
    for (const auto& p : parts) {
      const double v = std::isfinite(p.y[i]) ? p.y[i] : 0;
      s += fmt::format(R"(<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" fill="{}"/>)", px_x(x, x_values[i]) - width / 2,
                       px_y(y, base + v), width, px_y(y, base) - px_y(y, base + v), p.color);
      base += v;
    }
  }
  return s + legend(parts) + "</svg>";
}

std::string empty_chart(const std::string& title, const std::string& message) {
  return fmt::format(R"(<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" viewBox="0 0 {} {}" role="img">)"
                     R"(<title>{}</title><text x="{}" y="18" class="t">{}</text><rect x="{}" y="{}" width="{}" height="{}" class="plot"/>)"
                     R"(<text x="{}" y="{}" class="none" text-anchor="middle">{}</text></svg>)",
                     W, H, W, H, html_escape(title), L, html_escape(title), L, T, W - L - R, H - T - B, L + (W - L - R) / 2,
                     T + (H - T - B) / 2, html_escape(message));
}

std::string heatmap(const std::string& title, const std::string& row_label, const std::vector<double>& x_values,
                    const std::vector<std::vector<double>>& rows, double low, const ChartOptions& o) {
  if (x_values.empty() || rows.empty()) return "";
  double high = low;
  for (const auto& r : rows) {
    for (double v : r) {
      if (std::isfinite(v)) high = std::max(high, v);
    }
  }
  const Axis x = padded(x_axis(x_values));
  Axis y;  // one band per row, labelled by row index
  y.lo = -0.5, y.hi = static_cast<double>(rows.size()) - 0.5;
  const int64_t every = std::max<int64_t>(1, static_cast<int64_t>(rows.size()) / 8);
  for (int64_t r = 0; r < static_cast<int64_t>(rows.size()); r += every) y.ticks.push_back(static_cast<double>(r));
  std::string s = frame(title, row_label, x, y, o, /*ygrid=*/false);
  const double cell_w = std::max((W - L - R) / (x.hi - x.lo), 0.5), cell_h = (H - T - B) / static_cast<double>(rows.size());
  for (size_t r = 0; r < rows.size(); ++r) {
    for (size_t c = 0; c < std::min(rows[r].size(), x_values.size()); ++c) {
      if (!std::isfinite(rows[r][c])) continue;
      const double f = high > low ? std::clamp((rows[r][c] - low) / (high - low), 0.0, 1.0) : 0.0;
      const int g = static_cast<int>(std::lround(255 * (1 - f)));
      s += fmt::format(R"svg(<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" fill="rgb(255,{},{})" class="heat"><title>{} {}, iteration {}: {:.3g}</title></rect>)svg",
                       px_x(x, x_values[c]) - cell_w / 2, px_y(y, static_cast<double>(r)) - cell_h / 2, cell_w, cell_h, g, g,
                       html_escape(row_label), r, x_values[c], rows[r][c]);
    }
  }
  s += fmt::format(R"svg(<text x="{}" y="{}" class="lg">white: {:.3g}</text><text x="{}" y="{}" fill="rgb(255,0,0)" class="lg">red: {:.3g}</text>)svg",
                   W - R + 8, T + 14, low, W - R + 8, T + 28, high);
  return s + "</svg>";
}

}  // namespace moeforge
