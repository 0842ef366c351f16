// SVG line charts for `fp8pipe plot` (see svg_plot.h). Coordinates are absolute (no transforms),
// so a point's pixel position maps back to its value through the panel's data-* attributes:
//   x = data-x0 + (px - data-px0) / (data-px1 - data-px0) * (data-x1 - data-x0), likewise for y.
#include "launch/svg_plot.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string_view>

namespace fp8pipe::plot {
namespace {

// Okabe-Ito (colour-blind safe), without its yellow, which is too faint on white.
constexpr const char* kPalette[] = {"#0072B2", "#E69F00", "#009E73", "#D55E00",
                                    "#CC79A7", "#56B4E9", "#000000"};
constexpr int kColours = 7;
constexpr const char* kDashes[] = {"none", "7 3", "2 2", "10 3 2 3"};  // after the colours run out

constexpr double kPanelW = 600, kPanelH = 360, kTitleH = 40;
constexpr double kLeft = 72, kRight = 20, kTop = 34, kBottom = 48, kLegendRow = 18;
constexpr double kCharW = 6.6;  // average glyph width at 11px, for legend layout

struct Style {
  const char* colour;
  const char* dash;
};
Style style_of(int i) { return {kPalette[i % kColours], kDashes[(i / kColours) % 4]}; }

std::string esc(std::string_view s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&':
        o += "&amp;";
        break;
      case '<':
        o += "&lt;";
        break;
      case '>':
        o += "&gt;";
        break;
      case '"':
        o += "&quot;";
        break;
      default:
        o += c;
    }
  }
  return o;
}

std::string px(double v) { return fmt::format("{:.2f}", v); }

struct Extent {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  void add(double v) {
    if (!std::isfinite(v)) return;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  bool empty() const { return lo > hi; }
};

// Plot area in pixels and the data range it shows.
struct Frame {
  double px0, px1, py0, py1;  // left, right, bottom, top
  Ticks xt, yt;
  double X(double x) const { return px0 + (x - xt.lo) / (xt.hi - xt.lo) * (px1 - px0); }
  double Y(double y) const { return py0 - (y - yt.lo) / (yt.hi - yt.lo) * (py0 - py1); }
};

double nice_num(double x, bool round) {
  const double e = std::floor(std::log10(x)), f = x / std::pow(10, e);
  double n;
  if (round)
    n = f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10;
  else
    n = f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10;
  return n * std::pow(10, e);
}

struct LegendEntry {
  std::string label;
  Style style;
  enum Kind { kLine, kMarker, kRef } kind;
  bool hollow = false;
};

std::vector<LegendEntry> legend_of(const Panel& p) {
  std::vector<LegendEntry> e;
  for (size_t i = 0; i < p.lines.size(); ++i) {
    const int c = p.lines[i].colour < 0 ? static_cast<int>(i) : p.lines[i].colour;
    e.push_back({p.lines[i].label, style_of(c), LegendEntry::kLine});
  }
  for (size_t i = 0; i < p.markers.size(); ++i) {
    const int c = p.markers[i].colour < 0 ? static_cast<int>(i) : p.markers[i].colour;
    e.push_back({p.markers[i].label, style_of(c), LegendEntry::kMarker, p.markers[i].hollow});
  }
  if (p.hline) e.push_back({p.hline_label, {"#555555", "6 4"}, LegendEntry::kRef});
  return e;
}

double entry_width(const LegendEntry& e) { return 30 + kCharW * e.label.size() + 14; }

int legend_rows(const std::vector<LegendEntry>& es, double width) {
  int rows = es.empty() ? 0 : 1;
  double x = 0;
  for (const auto& e : es) {
    if (x > 0 && x + entry_width(e) > width) {
      ++rows;
      x = 0;
    }
    x += entry_width(e);
  }
  return rows;
}

void draw_legend(std::string& out, const std::vector<LegendEntry>& es, double x0, double y0,
                 double width) {
  out += "<g class=\"legend\" font-size=\"11\">\n";
  double x = 0, y = y0;
  for (const auto& e : es) {
    if (x > 0 && x + entry_width(e) > width) {
      x = 0;
      y += kLegendRow;
    }
    const double sx = x0 + x;
    if (e.kind == LegendEntry::kMarker) {
      out +=
          fmt::format("<circle cx=\"{}\" cy=\"{}\" r=\"3.2\" fill=\"{}\" stroke=\"{}\"/>\n",
                      px(sx + 12), px(y - 4), e.hollow ? "white" : e.style.colour, e.style.colour);
    } else {
      out += fmt::format(
          "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{}\" stroke-width=\"2\" "
          "stroke-dasharray=\"{}\"/>\n",
          px(sx), px(y - 4), px(sx + 24), px(y - 4), e.style.colour, e.style.dash);
    }
    out += fmt::format("<text x=\"{}\" y=\"{}\">{}</text>\n", px(sx + 30), px(y), esc(e.label));
    x += entry_width(e);
  }
  out += "</g>\n";
}

void draw_axes(std::string& out, const Frame& f) {
  out += "<g class=\"grid\" stroke=\"#e3e3e3\" stroke-width=\"1\">\n";
  for (double v : f.xt.at) {
    out += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\"/>\n", px(f.X(v)),
                       px(f.py0), px(f.py1));
  }
  for (double v : f.yt.at) {
    out += fmt::format("<line x1=\"{1}\" y1=\"{0}\" x2=\"{2}\" y2=\"{0}\"/>\n", px(f.Y(v)),
                       px(f.px0), px(f.px1));
  }
  out += "</g>\n<g class=\"ticks\" font-size=\"11\" fill=\"#333\">\n";
  for (double v : f.xt.at) {
    out += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", px(f.X(v)),
                       px(f.py0 + 16), tick_label(v, f.xt.step));
  }
  for (double v : f.yt.at) {
    out += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n", px(f.px0 - 6),
                       px(f.Y(v) + 4), tick_label(v, f.yt.step));
  }
  out += "</g>\n";
}

std::string points_of(const Series& s, const Frame& f) {
  std::string pts;
  for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
    if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
    pts += fmt::format("{}{},{}", pts.empty() ? "" : " ", px(f.X(s.x[i])), px(f.Y(s.y[i])));
  }
  return pts;
}

void draw_data(std::string& out, const Panel& p, const Frame& f, const std::string& clip) {
  out += fmt::format("<g clip-path=\"url(#{})\">\n", clip);
  if (p.hline) {
    out += fmt::format(
        "<line class=\"hline\" data-value=\"{}\" x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" "
        "stroke=\"#555555\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>\n",
        *p.hline, px(f.px0), px(f.Y(*p.hline)), px(f.px1), px(f.Y(*p.hline)));
  }
  for (size_t i = 0; i < p.lines.size(); ++i) {
    const Series& s = p.lines[i];
    const Style st = style_of(s.colour < 0 ? static_cast<int>(i) : s.colour);
    out += fmt::format(
        "<polyline class=\"series\" data-label=\"{}\" fill=\"none\" stroke=\"{}\" "
        "stroke-width=\"1.8\" stroke-linejoin=\"round\" stroke-dasharray=\"{}\" points=\"{}\"/>\n",
        esc(s.label), st.colour, st.dash, points_of(s, f));
  }
  out += "</g>\n";  // markers unclipped: a point on the frame stays whole
  for (size_t i = 0; i < p.markers.size(); ++i) {
    const Series& s = p.markers[i];
    const Style st = style_of(s.colour < 0 ? static_cast<int>(i) : s.colour);
    out +=
        fmt::format("<g class=\"markers\" data-label=\"{}\" fill=\"{}\" stroke=\"{}\">\n",
                    esc(s.label), s.hollow ? "white" : st.colour, s.hollow ? st.colour : "white");
    for (size_t k = 0; k < s.x.size() && k < s.y.size(); ++k) {
      if (!std::isfinite(s.x[k]) || !std::isfinite(s.y[k])) continue;
      out += fmt::format("<circle cx=\"{}\" cy=\"{}\" r=\"3.6\"/>\n", px(f.X(s.x[k])),
                         px(f.Y(s.y[k])));
    }
    out += "</g>\n";
  }
}

// The axis ranges of a panel: nice ticks around its data (and reference line).
void fit_ranges(const Panel& p, Frame& f) {
  Extent ex, ey;
  for (const auto* group : {&p.lines, &p.markers}) {
    for (const auto& s : *group) {
      for (size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
        if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
        ex.add(s.x[i]);
        ey.add(s.y[i]);
      }
    }
  }
  if (p.hline) ey.add(*p.hline);
  if (ex.empty()) ex.lo = 0, ex.hi = 1;
  if (ey.empty()) ey.lo = 0, ey.hi = 1;
  f.xt = nice_ticks(ex.lo, ex.hi, 7, p.integer_x);
  ey.hi += 0.02 * (ey.hi - ey.lo);  // keep the highest point off the frame
  // With a fixed bottom the ticks are ymin + k * step.
  if (p.ymin) {
    f.yt = nice_ticks(0, std::max(ey.hi - *p.ymin, std::max(1e-9, 0.1 * std::abs(*p.ymin))), 6);
    f.yt.lo += *p.ymin;
    f.yt.hi += *p.ymin;
    for (double& v : f.yt.at) v += *p.ymin;
  } else {
    f.yt = nice_ticks(ey.lo, ey.hi, 6);
  }
}

void draw_panel(std::string& out, const Panel& p, int index, double ox, double oy) {
  const auto legend = legend_of(p);
  const double width = kPanelW - kLeft - kRight;
  const int rows = legend_rows(legend, width);
  Frame f{ox + kLeft,
          ox + kPanelW - kRight,
          oy + kPanelH - kBottom,
          oy + kTop + rows * kLegendRow + 4,
          {},
          {}};
  fit_ranges(p, f);
  const std::string clip = fmt::format("clip-{}", index);
  out += fmt::format(
      "<g class=\"panel\" data-panel=\"{}\" data-x0=\"{}\" data-x1=\"{}\" data-y0=\"{}\" "
      "data-y1=\"{}\" data-px0=\"{}\" data-px1=\"{}\" data-py0=\"{}\" data-py1=\"{}\">\n",
      esc(p.id), f.xt.lo, f.xt.hi, f.yt.lo, f.yt.hi, px(f.px0), px(f.px1), px(f.py0), px(f.py1));
  out += fmt::format(
      "<clipPath id=\"{}\"><rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\"/></clipPath>\n", clip,
      px(f.px0), px(f.py1), px(f.px1 - f.px0), px(f.py0 - f.py1));
  draw_axes(out, f);
  draw_data(out, p, f, clip);
  out += fmt::format(
      "<rect class=\"frame\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" "
      "stroke=\"#888\"/>\n",
      px(f.px0), px(f.py1), px(f.px1 - f.px0), px(f.py0 - f.py1));
  out += fmt::format(
      "<text class=\"title\" x=\"{}\" y=\"{}\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
      px(f.px0), px(oy + 20), esc(p.title));
  out += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\">{}</text>\n",
                     px((f.px0 + f.px1) / 2), px(f.py0 + 36), esc(p.xlabel));
  out += fmt::format(
      "<text x=\"{0}\" y=\"{1}\" text-anchor=\"middle\" font-size=\"12\" "
      "transform=\"rotate(-90 {0} {1})\">{2}</text>\n",
      px(ox + 16), px((f.py0 + f.py1) / 2), esc(p.ylabel));
  draw_legend(out, legend, f.px0, oy + kTop + 10, width);
  out += "</g>\n";
}

}  // namespace

Ticks nice_ticks(double lo, double hi, int target, bool integer) {
  if (!(hi > lo)) {  // one value: pad around it
    const double pad = lo == 0 ? 1 : std::abs(lo) * 0.05;
    lo -= pad;
    hi += pad;
  }
  Ticks t;
  t.step = nice_num(nice_num(hi - lo, false) / std::max(1, target - 1), true);
  if (integer) t.step = std::max(1.0, t.step);
  t.lo = std::floor(lo / t.step + 1e-9) * t.step;
  t.hi = std::ceil(hi / t.step - 1e-9) * t.step;
  if (!(t.hi > t.lo)) t.hi = t.lo + t.step;
  const int n = static_cast<int>(std::lround((t.hi - t.lo) / t.step));
  for (int k = 0; k <= n; ++k) {
    const double v = t.lo + k * t.step;
    t.at.push_back(std::abs(v) < t.step * 1e-9 ? 0.0 : v);
  }
  return t;
}

std::string tick_label(double v, double step) {
  if (std::abs(v) < step * 1e-9) return "0";
  if (step < 1e-5) return fmt::format("{:.3g}", v);
  const char* suffix = "";
  double div = 1;
  if (step >= 1e9) {
    div = 1e9, suffix = "G";
  } else if (step >= 1e6) {
    div = 1e6, suffix = "M";
  } else if (step >= 1e3) {
    div = 1e3, suffix = "k";
  }
  const int decimals = std::max(0, static_cast<int>(-std::floor(std::log10(step / div) + 1e-9)));
  return fmt::format("{:.{}f}{}", v / div, decimals, suffix);
}

std::string render_svg(const std::string& title, const std::vector<Panel>& panels, int columns) {
  const int n = static_cast<int>(panels.size());
  const int cols = std::max(1, std::min(columns, n));
  const int rows = (n + cols - 1) / cols;
  const double W = cols * kPanelW, H = kTitleH + rows * kPanelH;
  std::string out = fmt::format(
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" "
      "viewBox=\"0 0 {0} {1}\" font-family=\"DejaVu Sans, Arial, sans-serif\">\n"
      "<desc>fp8pipe plot. Each g.panel maps data to pixels linearly: x = data-x0 + (px - "
      "data-px0) / (data-px1 - data-px0) * (data-x1 - data-x0); y = data-y0 + (py - data-py0) / "
      "(data-py1 - data-py0) * (data-y1 - data-y0). Coordinates are absolute.</desc>\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{2}\" y=\"26\" text-anchor=\"middle\" font-size=\"16\" "
      "font-weight=\"bold\">{3}</text>\n",
      W, H, W / 2, esc(title));
  for (int i = 0; i < n; ++i) {
    draw_panel(out, panels[i], i, (i % cols) * kPanelW, kTitleH + (i / cols) * kPanelH);
  }
  out += "</svg>\n";
  return out;
}

}  // namespace fp8pipe::plot
