// A small, dependency-free SVG line-chart writer for `fp8pipe plot`: a grid of panels, each with
// nice-number axes, a light grid, a legend and overlaid series in a colour-blind-safe palette.
// Every panel records its data-to-pixel transform as data-* attributes so tests can invert it.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace fp8pipe::plot {

// One line (or set of markers) in a panel. Non-finite points are dropped.
struct Series {
  std::string label;
  std::vector<double> x, y;
  int colour = -1;      // palette index; < 0: the series' position in its panel
  bool hollow = false;  // markers: outlined circles (e.g. the EMA's eval loss) instead of filled
};

struct Panel {
  std::string id;  // short name, written as data-panel (e.g. "loss")
  std::string title, xlabel, ylabel;
  std::vector<Series> lines;    // drawn as <polyline class="series">
  std::vector<Series> markers;  // drawn as <circle> points (e.g. eval loss)
  std::optional<double> hline;  // horizontal dashed reference line (e.g. a loss floor)
  std::string hline_label;
  std::optional<double> ymin;  // fixed bottom of the y axis (else from the data)
  bool integer_x = true;       // x ticks at whole numbers only (steps)
};

// Axis ticks at 1/2/5 x 10^k spacing covering [lo, hi]; lo/hi are widened to the outer ticks.
struct Ticks {
  double lo = 0, hi = 1, step = 1;
  std::vector<double> at;
};
Ticks nice_ticks(double lo, double hi, int target, bool integer = false);
// A tick label: as few decimals as the spacing needs; k/M/G for large values, e-notation for tiny.
std::string tick_label(double v, double step);

// The whole figure: `title` on top, panels in rows of `columns`.
std::string render_svg(const std::string& title, const std::vector<Panel>& panels, int columns = 2);

}  // namespace fp8pipe::plot
