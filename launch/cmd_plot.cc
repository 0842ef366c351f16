// `fp8pipe plot RUN.jsonl [OTHER.jsonl ...] [-o OUT.svg] [--labels a,b] [--floor X]`: one SVG of
// the training metrics (launch/metrics.h JSONL): loss (+ eval, + EMA eval, + floor), tokens/s,
// expert load and lr, runs overlaid, and the batch size when a run's varies (a batch ramp). A tiny
// JSON reader of its own (flat objects + the expert_load array).
#include <fmt/format.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "launch/commands.h"
#include "launch/svg_plot.h"

namespace fp8pipe::cli {
namespace {

// ---- a minimal JSON value and reader -----------------------------------------------------------

struct Json {
  enum Kind { kNull, kBool, kNumber, kString, kArray, kObject } kind = kNull;
  double num = 0;
  std::string str;
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> fields;

  const Json* get(std::string_view key) const {
    for (const auto& [k, v] : fields)
      if (k == key) return &v;
    return nullptr;
  }
  double number(std::string_view key, double fallback) const {
    const Json* v = get(key);
    return v && v->kind == kNumber ? v->num : fallback;
  }
};

// Recursive descent over one line. Numbers go through strtod, so the "nan"/"inf" that fmt writes
// for non-finite values read back as such (the plot then skips those points).
class JsonReader {
 public:
  explicit JsonReader(std::string_view s) : s_(s) {}
  bool parse(Json& v) {
    if (!value(v, 0)) return false;
    ws();
    return i_ == s_.size();
  }

 private:
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\r' || s_[i_] == '\n'))
      ++i_;
  }
  bool eat(char c) {
    ws();
    if (i_ < s_.size() && s_[i_] == c) return ++i_, true;
    return false;
  }

  bool value(Json& v, int depth) {
    ws();
    if (i_ >= s_.size() || depth > 16) return false;
    const char c = s_[i_];
    if (c == '{' || c == '[') return container(v, depth);
    if (c == '"') return v.kind = Json::kString, string(v.str);
    if (word("true")) return v.kind = Json::kBool, v.num = 1, true;
    if (word("false")) return v.kind = Json::kBool, v.num = 0, true;
    if (word("null")) return v.kind = Json::kNull, true;
    return v.kind = Json::kNumber, number(v.num);
  }

  bool word(std::string_view w) {
    if (s_.substr(i_, w.size()) != w) return false;
    i_ += w.size();
    return true;
  }

  bool number(double& out) {
    const size_t b = i_;
    while (i_ < s_.size() && (std::isalnum(static_cast<unsigned char>(s_[i_])) || s_[i_] == '-' ||
                              s_[i_] == '+' || s_[i_] == '.'))
      ++i_;
    const std::string tok(s_.substr(b, i_ - b));
    char* end = nullptr;
    out = std::strtod(tok.c_str(), &end);
    return !tok.empty() && end == tok.c_str() + tok.size();
  }

  bool string(std::string& out) {
    ++i_;  // opening quote
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c == '\\') {
        if (i_ >= s_.size()) return false;
        c = s_[i_++];
        if (c == 'u') {  // keep it simple: non-ASCII escapes become '?'
          if (i_ + 4 > s_.size()) return false;
          const long cp = std::strtol(std::string(s_.substr(i_, 4)).c_str(), nullptr, 16);
          i_ += 4;
          c = cp < 0x80 ? static_cast<char>(cp) : '?';
        } else {
          c = c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : c == 'b' ? '\b' : c;
          c = c == 'f' ? '\f' : c;
        }
      }
      out += c;
    }
    return i_ < s_.size() && s_[i_++] == '"';
  }

  bool container(Json& v, int depth) {
    const bool obj = s_[i_++] == '{';
    v.kind = obj ? Json::kObject : Json::kArray;
    if (eat(obj ? '}' : ']')) return true;
    do {
      std::string key;
      if (obj) {
        ws();
        if (i_ >= s_.size() || s_[i_] != '"' || !string(key) || !eat(':')) return false;
      }
      Json item;
      if (!value(item, depth + 1)) return false;
      if (obj)
        v.fields.emplace_back(std::move(key), std::move(item));
      else
        v.items.push_back(std::move(item));
    } while (eat(','));
    return eat(obj ? '}' : ']');
  }

  std::string_view s_;
  size_t i_ = 0;
};

// ---- reading runs ------------------------------------------------------------------------------

struct Point {
  double step = 0, loss = NAN, lr = NAN, tokens_per_s = NAN, eval_loss = -1;
  double batch = NAN;         // sequences in the step (train.batch_ramp makes it vary)
  double eval_ema_loss = -1;  // optim.ema_decay: the moving average's eval loss
  std::vector<std::pair<std::string, double>> loads;  // layer -> max/mean
};

struct Run {
  std::string path, label;
  std::vector<Point> points;
};

Point point_of(const Json& j) {
  Point p;
  p.step = j.number("step", NAN);
  p.loss = j.number("loss", NAN);
  p.lr = j.number("lr", NAN);
  p.tokens_per_s = j.number("tokens_per_s", NAN);
  p.batch = j.number("batch", NAN);
  p.eval_loss = j.number("eval_loss", -1);
  p.eval_ema_loss = j.number("eval_ema_loss", -1);
  if (const Json* el = j.get("expert_load"); el && el->kind == Json::kArray) {
    for (size_t i = 0; i < el->items.size(); ++i) {
      const Json& l = el->items[i];
      const Json* name = l.get("layer");
      p.loads.emplace_back(name && name->kind == Json::kString ? name->str : fmt::format("#{}", i),
                           l.number("max_over_mean", NAN));
    }
  }
  return p;
}

// Step records only: objects with a numeric "step" and no "kind". Unparsable lines (e.g. the
// half-written last line of a live run) are skipped with a warning.
Result<Run> read_run(const std::string& path) {
  std::ifstream in(path);
  if (!in) return FP8_ERROR(Code::kNotFound, "plot: cannot open '{}'", path);
  Run run;
  run.path = path;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    Json j;
    if (!JsonReader(line).parse(j) || j.kind != Json::kObject) {
      std::fprintf(stderr, "fp8pipe plot: %s:%d: not a JSON object, skipped\n", path.c_str(), n);
      continue;
    }
    const Json* step = j.get("step");
    if (!step || step->kind != Json::kNumber || j.get("kind")) continue;
    run.points.push_back(point_of(j));
  }
  if (run.points.empty()) {
    return Status(Code::kInvalidArgument, fmt::format("plot: '{}' has no step records", path),
                  "expected JSONL lines like {\"step\":1,\"loss\":...} (fp8pipe train's "
                  "log.jsonl); lines with a \"kind\" field are notes, not steps");
  }
  return run;
}

// The file name without directory and ".jsonl"; the parent directory is kept when names clash.
std::vector<std::string> default_labels(const std::vector<std::string>& paths) {
  auto base = [](const std::string& p, bool parent) {
    std::string s = p;
    if (s.ends_with(".jsonl")) s.resize(s.size() - 6);
    size_t cut = s.rfind('/');
    if (parent && cut != std::string::npos && cut > 0) cut = s.rfind('/', cut - 1);
    return cut == std::string::npos ? s : s.substr(cut + 1);
  };
  std::vector<std::string> out;
  std::map<std::string, int> seen;
  for (const auto& p : paths) ++seen[base(p, false)];
  for (const auto& p : paths) out.push_back(base(p, seen[base(p, false)] > 1));
  return out;
}

// ---- panels ------------------------------------------------------------------------------------

plot::Panel make_panel(std::string id, std::string title, std::string ylabel) {
  plot::Panel p;
  p.id = std::move(id);
  p.title = std::move(title);
  p.xlabel = "step";
  p.ylabel = std::move(ylabel);
  return p;
}

plot::Series make_series(std::string label, int colour = -1) {
  plot::Series s;
  s.label = std::move(label);
  s.colour = colour;
  return s;
}

plot::Panel loss_panel(const std::vector<Run>& runs, std::optional<double> floor) {
  plot::Panel p = make_panel("loss", "Loss", "loss (nats/token)");
  for (size_t r = 0; r < runs.size(); ++r) {
    plot::Series line = make_series(runs[r].label, static_cast<int>(r));
    plot::Series eval = make_series(runs[r].label + " eval", static_cast<int>(r));
    plot::Series ema = make_series(runs[r].label + " eval ema", static_cast<int>(r));
    ema.hollow = true;
    for (const auto& pt : runs[r].points) {
      line.x.push_back(pt.step);
      line.y.push_back(pt.loss);
      if (pt.eval_loss >= 0) eval.x.push_back(pt.step), eval.y.push_back(pt.eval_loss);
      if (pt.eval_ema_loss >= 0) ema.x.push_back(pt.step), ema.y.push_back(pt.eval_ema_loss);
    }
    p.lines.push_back(std::move(line));
    if (!eval.x.empty()) p.markers.push_back(std::move(eval));
    if (!ema.x.empty()) p.markers.push_back(std::move(ema));
  }
  if (floor) {
    p.hline = floor;
    p.hline_label = fmt::format("floor {:.4g}", *floor);
  }
  return p;
}

// One line per run of `field` against step.
plot::Panel field_panel(const std::vector<Run>& runs, std::string id, std::string title,
                        std::string ylabel, double Point::*field) {
  plot::Panel p = make_panel(std::move(id), std::move(title), std::move(ylabel));
  for (size_t r = 0; r < runs.size(); ++r) {
    plot::Series s = make_series(runs[r].label, static_cast<int>(r));
    for (const auto& pt : runs[r].points) {
      s.x.push_back(pt.step);
      s.y.push_back(pt.*field);
    }
    p.lines.push_back(std::move(s));
  }
  return p;
}

// Whether any run's step records carry more than one batch size.
bool batch_varies(const std::vector<Run>& runs) {
  for (const auto& r : runs) {
    double first = NAN;
    for (const auto& pt : r.points) {
      if (!std::isfinite(pt.batch)) continue;
      if (!std::isfinite(first)) first = pt.batch;
      if (pt.batch != first) return true;
    }
  }
  return false;
}

// Max/mean expert load per MoE layer of the first run, y from 1 (perfect balance).
plot::Panel load_panel(const Run& run) {
  plot::Panel p = make_panel("expert_load", "Expert load, max/mean (" + run.label + ")",
                             "max / mean tokens per expert");
  p.ymin = 1.0;
  std::map<std::string, size_t> index;
  for (const auto& pt : run.points) {
    for (const auto& [layer, ratio] : pt.loads) {
      auto [it, fresh] = index.emplace(layer, p.lines.size());
      if (fresh) p.lines.push_back(make_series(layer));
      p.lines[it->second].x.push_back(pt.step);
      p.lines[it->second].y.push_back(ratio);
    }
  }
  return p;
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  return out;
}

struct Args {
  std::vector<std::string> files, labels;
  std::string out;
  std::optional<double> floor;
};

int usage() {
  std::fprintf(stderr,
               "usage: fp8pipe plot RUN.jsonl [OTHER.jsonl ...] [-o OUT.svg] [--labels a,b,...] "
               "[--floor X]\n  one SVG: loss (+eval, +floor line), tokens/s, expert load (first "
               "run) and lr vs step\n");
  return 2;
}

// Returns false (after printing why) on a bad command line.
bool parse_args(int argc, char** argv, Args& a) {
  for (int i = 0; i < argc; ++i) {
    const std::string s = argv[i];
    const bool has_value = i + 1 < argc;
    if ((s == "-o" || s == "--out") && has_value) {
      a.out = argv[++i];
    } else if (s == "--labels" && has_value) {
      a.labels = split_commas(argv[++i]);
    } else if (s == "--floor" && has_value) {
      char* end = nullptr;
      a.floor = std::strtod(argv[++i], &end);
      if (*end != '\0' || !std::isfinite(*a.floor)) {
        std::fprintf(stderr, "fp8pipe plot: --floor '%s' is not a number\n", argv[i]);
        return false;
      }
    } else if (s.starts_with("-") && s != "-") {
      std::fprintf(stderr, "fp8pipe plot: unknown or incomplete argument '%s'\n", s.c_str());
      return false;
    } else {
      a.files.push_back(s);
    }
  }
  if (a.files.empty()) return false;
  if (!a.labels.empty() && a.labels.size() != a.files.size()) {
    std::fprintf(stderr, "fp8pipe plot: --labels has %zu names for %zu files\n", a.labels.size(),
                 a.files.size());
    return false;
  }
  return true;
}

}  // namespace

int cmd_plot(int argc, char** argv) {
  Args a;
  if (!parse_args(argc, argv, a)) return usage();
  if (a.labels.empty()) a.labels = default_labels(a.files);
  if (a.out.empty()) {
    a.out = a.files[0];
    if (a.out.ends_with(".jsonl")) a.out.resize(a.out.size() - 6);
    a.out += ".svg";
  }
  std::vector<Run> runs;
  for (size_t i = 0; i < a.files.size(); ++i) {
    auto run = read_run(a.files[i]);
    if (!run.ok()) {
      std::fprintf(stderr, "%s\n", run.status().to_string().c_str());
      return 2;
    }
    run->label = a.labels[i];
    runs.push_back(std::move(*run));
  }
  std::vector<plot::Panel> panels = {
      loss_panel(runs, a.floor),
      field_panel(runs, "tokens_per_s", "Throughput", "tokens / s", &Point::tokens_per_s),
      load_panel(runs[0]),
      field_panel(runs, "lr", "Learning rate", "lr", &Point::lr),
  };
  if (batch_varies(runs)) {  // a batch-size ramp (train.batch_ramp): its sizes against step
    panels.push_back(field_panel(runs, "batch", "Batch size", "sequences", &Point::batch));
  }
  std::string title;
  for (const auto& r : runs) title += (title.empty() ? "" : " vs ") + r.label;
  std::ofstream out(a.out);
  out << plot::render_svg("fp8pipe: " + title, panels);
  if (!out.good()) {
    std::fprintf(stderr, "fp8pipe plot: cannot write '%s'\n", a.out.c_str());
    return 1;
  }
  size_t steps = 0;
  for (const auto& r : runs) steps += r.points.size();
  std::printf("wrote %s (%zu runs, %zu step records)\n", a.out.c_str(), runs.size(), steps);
  return 0;
}

}  // namespace fp8pipe::cli
