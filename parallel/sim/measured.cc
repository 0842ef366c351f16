// Calibration of the step simulator on measured traces (see measured.h for what is measured and
// the file format), and the simulation and report with those costs.
#include "parallel/sim/measured.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <tuple>

#include "core/json.h"

namespace fp8pipe::parallel::sim {
namespace {

constexpr char kFormat[] = "fp8pipe-measured-costs";

double median(std::vector<double> v) {
  if (v.empty()) return -1;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double mean(const std::vector<double>& v) {
  if (v.empty()) return -1;
  double sum = 0;
  for (double x : v) sum += x;
  return sum / double(v.size());
}

Result<std::string> read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return FP8_INVALID("'{}' cannot be read", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// An executed instruction's label (instr_label): F3d0, B3d1, W3d0, FB7d0,3d1, S>a3d0, R<g3d1.
bool is_instr_label(const std::string& n) {
  size_t i = 0;
  auto digits = [&] {
    const size_t b = i;
    while (i < n.size() && n[i] >= '0' && n[i] <= '9') ++i;
    return i > b;
  };
  auto unit = [&] { return digits() && i < n.size() && n[i++] == 'd' && digits(); };
  if (n.starts_with("FB")) {
    i = 2;
    if (!unit() || i >= n.size() || n[i++] != ',' || !unit()) return false;
  } else if (n.starts_with("S>") || n.starts_with("R<")) {
    i = 3;
    if (n.size() < 3 || (n[2] != 'a' && n[2] != 'g') || !unit()) return false;
  } else if (!n.empty() && (n[0] == 'F' || n[0] == 'B' || n[0] == 'W')) {
    i = 1;
    if (!unit()) return false;
  } else {
    return false;
  }
  return i == n.size();
}

}  // namespace

Result<std::vector<MeasuredEvent>> parse_trace(const std::string& text, const std::string& label) {
  FP8_ASSIGN_OR_RETURN(json::Value v, json::parse(text, label));
  const json::Value* list = v.find("traceEvents");
  if (!list || !list->is_array()) {
    return FP8_INVALID("trace '{}': expected an object with a \"traceEvents\" array", label);
  }
  std::vector<MeasuredEvent> out;
  for (const json::Value& e : list->items()) {
    const json::Value* ph = e.find("ph");
    if (!ph || !ph->is_string()) return FP8_INVALID("trace '{}': an event has no \"ph\"", label);
    if (ph->as_string() != "X" && ph->as_string() != "i") continue;  // metadata
    const json::Value *name = e.find("name"), *pid = e.find("pid"), *ts = e.find("ts"),
                      *dur = e.find("dur"), *args = e.find("args");
    const json::Value* step = args ? args->find("step") : nullptr;
    const bool instant = ph->as_string() == "i";
    if (!name || !name->is_string() || !pid || !pid->is_int() || !ts || !ts->is_number() || !step ||
        !step->is_int() || (!instant && (!dur || !dur->is_number()))) {
      return FP8_INVALID(
          "trace '{}' byte {}: an event needs name, pid, ts, dur (intervals) and args.step, as "
          "log.trace writes them",
          label, e.pos());
    }
    // Only the executor's instruction rows (tid 0 compute, 1 comm) and instruction labels: other
    // rows (e.g. all-to-all phases) and phase begin/end pairs are not instructions.
    const json::Value* tid = e.find("tid");
    if (!tid || !tid->is_int() || tid->as_int() > 1 || !is_instr_label(name->as_string())) continue;
    out.push_back({int(pid->as_int()), step->as_int(), name->as_string(), ts->as_double(),
                   instant ? 0.0 : dur->as_double(), instant});
  }
  return out;
}

Result<std::vector<MeasuredEvent>> read_trace(const std::string& path) {
  auto text = read_text(path);
  if (!text.ok()) return FP8_INVALID("trace {}", text.status().message());
  return parse_trace(*text, path);
}

double MeasuredCosts::op(const Instr& in) const {
  auto full_b = [&](int st) {
    const StageTimes& t = stages[st];
    return t.bw >= 0 ? t.bw : (t.b >= 0 && t.w >= 0 ? t.b + t.w : -1);
  };
  switch (in.op) {
    case Op::kF:
      return stages[in.stage].f;
    case Op::kB:
      return in.defer_w ? stages[in.stage].b : full_b(in.stage);
    case Op::kW:
      return stages[in.stage].w;
    case Op::kFB: {
      auto it = fb.find({in.stage, in.stage_b});
      if (it != fb.end()) return it->second;
      const double f = stages[in.stage].f, b = full_b(in.stage_b);
      return f >= 0 && b >= 0 ? f + b : -1;
    }
    default:
      return 0;
  }
}

double MeasuredCosts::comm_overhead(const Instr& in) const {
  const StageTimes& t = stages[in.stage];
  const double v = in.op == Op::kSendAct || in.op == Op::kSendGrad ? t.send : t.recv;
  return v >= 0 ? v : 0;  // not observed on this stage (another schedule): no overhead
}

Status MeasuredCosts::check_covers(const Schedule& s, int64_t tokens) const {
  if (int(stages.size()) != s.stages()) {
    return FP8_INVALID(
        "measured costs: {} stages were measured ({}), the schedule {} has {}: calibrate on the "
        "same parallel.pp and stage layout",
        stages.size(), schedule, schedule_kind_name(s.kind), s.stages());
  }
  if (tokens != tokens_per_mb) {
    return FP8_INVALID(
        "measured costs: micro-batches of {} tokens were measured, this config has {} "
        "(train.global_batch / (parallel.dp x parallel.microbatches) x train.seq_len)",
        tokens_per_mb, tokens);
  }
  for (const auto& list : s.rank_instrs) {
    for (const Instr& in : list) {
      if (!in.is_comm() && op(in) < 0) {
        return FP8_INVALID(
            "measured costs ({}): no cost for {} on stage {}{}", schedule, instr_label(in),
            in.stage,
            in.op == Op::kW || (in.op == Op::kB && in.defer_w)
                ? " (deferred weight gradients: calibrate on a schedule that splits B and W, "
                  "e.g. zb1p)"
                : "");
      }
    }
  }
  return Status::Ok();
}

Result<MeasuredCosts> calibrate(const Schedule& s, int dp, int64_t tokens_per_mb,
                                const std::vector<MeasuredEvent>& events, Statistic stat) {
  const int world = s.ranks * dp;
  auto typical = [stat](const std::vector<double>& v) {
    return stat == Statistic::kMean ? mean(v) : median(v);
  };
  // (rank, step) -> events in recorded order.
  std::map<std::pair<int, int64_t>, std::vector<const MeasuredEvent*>> by;
  for (const MeasuredEvent& e : events) {
    if (e.rank < 0 || e.rank >= world) {
      return FP8_INVALID("calibrate: a trace of rank {} but the layout has {} ranks (pp={} dp={})",
                         e.rank, world, s.ranks, dp);
    }
    by[{e.rank, e.step}].push_back(&e);
  }
  std::set<int64_t> steps;
  for (const auto& [key, list] : by) steps.insert(key.second);
  for (int r = 0; r < world; ++r) {
    for (int64_t st : steps) {
      if (!by.count({r, st})) {
        return FP8_INVALID(
            "calibrate: no events of rank {} in step {}: pass every rank's trace of the run "
            "(e.g. a path with {{rank}})",
            r, st);
      }
    }
  }
  if (steps.empty()) return FP8_INVALID("calibrate: the traces hold no events");

  std::vector<std::vector<double>> f(s.stages()), b(s.stages()), w(s.stages()), bw(s.stages()),
      send(s.stages()), recv(s.stages());
  std::map<std::pair<int, int>, std::vector<double>> fb;
  // Message ends, keyed by (dp index, step, transfer): the post (sender) and the end of the wait.
  using MsgKey = std::tuple<int, int64_t, Transfer>;
  std::map<MsgKey, double> posted;
  std::map<MsgKey, std::pair<double, double>> received;  // the wait's start and end
  std::vector<int> samples(s.stages(), 0);
  for (const auto& [key, list] : by) {
    const auto [rank, step] = key;
    const int pr = rank / dp, dpi = rank % dp;  // Topology::rank_of(stage, dp) = stage * dp + dp
    const auto& instrs = s.rank_instrs[pr];
    if (list.size() != instrs.size()) {
      return FP8_INVALID(
          "calibrate: rank {} step {} has {} events, the {} schedule gives pipeline rank {} {} "
          "instructions: were the traces written with the same parallel.* settings?",
          rank, step, list.size(), schedule_kind_name(s.kind), pr, instrs.size());
    }
    for (size_t i = 0; i < list.size(); ++i) {
      const MeasuredEvent& e = *list[i];
      const Instr& in = instrs[i];
      if (e.name != instr_label(in)) {
        return FP8_INVALID(
            "calibrate: rank {} step {} event #{} is '{}', the {} schedule has '{}' there: were "
            "the traces written with the same parallel.* settings?",
            rank, step, i, e.name, schedule_kind_name(s.kind), instr_label(in));
      }
      const double end = e.ts_us + e.dur_us;
      const bool has_next = i + 1 < list.size();
      const double gap = has_next ? std::max(0.0, list[i + 1]->ts_us - end) : 0.0;
      const double occupied = 1e-6 * (e.dur_us + gap);
      switch (in.op) {
        case Op::kF:
          f[in.stage].push_back(occupied), ++samples[in.stage];
          break;
        case Op::kB:
          (in.defer_w ? b : bw)[in.stage].push_back(occupied), ++samples[in.stage];
          break;
        case Op::kW:
          w[in.stage].push_back(occupied), ++samples[in.stage];
          break;
        case Op::kFB:
          fb[{in.stage, in.stage_b}].push_back(occupied), ++samples[in.stage];
          break;
        case Op::kSendAct:
        case Op::kSendGrad:
          if (has_next) send[in.stage].push_back(1e-6 * gap);
          posted[{dpi, step, transfer_of(s, pr, in)}] = e.ts_us;
          break;
        case Op::kRecvAct:
        case Op::kRecvGrad:
          if (has_next) recv[in.stage].push_back(1e-6 * gap);
          received[{dpi, step, transfer_of(s, pr, in)}] = {e.ts_us, end};
          break;
      }
    }
  }

  MeasuredCosts m;
  m.schedule = schedule_kind_name(s.kind);
  m.statistic = stat;
  m.tokens_per_mb = tokens_per_mb;
  m.traced_steps = int(steps.size());
  m.stages.resize(s.stages());
  for (int st = 0; st < s.stages(); ++st) {
    StageTimes& t = m.stages[st];
    t.f = typical(f[st]), t.b = typical(b[st]), t.w = typical(w[st]), t.bw = typical(bw[st]);
    t.send = typical(send[st]), t.recv = typical(recv[st]);
    t.samples = samples[st];
  }
  for (const auto& [k, v] : fb) m.fb[k] = typical(v);

  // p2p. The ranks' trace clocks have unknown offsets: per rank pair, the smallest delay from
  // post to end of receive in each direction gives the offset (d_ab - d_ba) / 2 (NTP's
  // estimate). A message's latency is then its offset-corrected delay, taken over the messages
  // whose receiver was already waiting at the post (the others arrived before they were asked
  // for). Without such messages, the two-way minimum (d_ab + d_ba) / 2.
  struct Msg {
    int src, dst;
    double post, wait_start, wait_end;  // µs, each on its own rank's clock
  };
  std::vector<Msg> msgs;
  std::map<std::pair<int, int>, double> one_way;  // (sender world rank, receiver) -> min delay
  for (const auto& [k, t_post] : posted) {
    auto it = received.find(k);
    if (it == received.end()) continue;
    const auto& [dpi, step, tr] = k;
    const Msg msg{tr.src * dp + dpi, tr.dst * dp + dpi, t_post, it->second.first,
                  it->second.second};
    msgs.push_back(msg);
    const double d = msg.wait_end - msg.post;
    auto [pos, fresh] = one_way.emplace(std::pair{msg.src, msg.dst}, d);
    if (!fresh) pos->second = std::min(pos->second, d);
  }
  std::vector<double> two_way, latencies;
  for (const auto& [ab, d] : one_way) {
    auto back = one_way.find({ab.second, ab.first});
    if (ab.first < ab.second && back != one_way.end()) {
      two_way.push_back(1e-6 * 0.5 * (d + back->second));
    }
  }
  for (const Msg& x : msgs) {
    auto ab = one_way.find({x.src, x.dst}), ba = one_way.find({x.dst, x.src});
    if (ab == one_way.end() || ba == one_way.end()) continue;
    const double offset = 0.5 * (ab->second - ba->second);  // receiver clock - sender clock
    if (x.wait_start - offset < x.post) {
      latencies.push_back(1e-6 * std::max(0.0, x.wait_end - offset - x.post));
    }
  }
  m.p2p_s = std::max(0.0, !latencies.empty() ? typical(latencies)
                          : two_way.empty()  ? 0.0
                                             : median(two_way));

  // Time outside the pipeline and the measured pipeline span, from consecutive traced steps. A
  // rank's last instruction may be a SEND, whose host overhead the simulator charges inside the
  // pipeline: it belongs to the span, not to the time between steps.
  std::vector<double> tails, spans;
  for (int64_t st : steps) {
    double tail = std::numeric_limits<double>::infinity(), span = 0;
    const bool next = steps.count(st + 1) > 0;
    for (int r = 0; r < world; ++r) {
      const auto& cur = by.at({r, st});
      double last = 0;
      for (const MeasuredEvent* e : cur) last = std::max(last, e->ts_us + e->dur_us);
      const Instr& final_in = s.rank_instrs[r / dp].back();
      const double host = final_in.is_comm() ? 1e6 * m.comm_overhead(final_in) : 0;
      span = std::max(span, last + host - cur.front()->ts_us);
      if (next) tail = std::min(tail, by.at({r, st + 1}).front()->ts_us - last - host);
    }
    spans.push_back(1e-6 * span);
    if (next) tails.push_back(1e-6 * std::max(0.0, tail));
  }
  if (tails.empty()) {
    return FP8_INVALID(
        "calibrate: the traces hold no two consecutive steps; trace at least 2 "
        "(log.trace_steps >= 2) to measure the time outside the pipeline");
  }
  m.tail_s = typical(tails);
  m.trace_pipeline_s = typical(spans);
  FP8_RETURN_IF_ERROR(m.check_covers(s, tokens_per_mb));
  return m;
}

std::string to_json(const MeasuredCosts& m) {
  auto ms = [](double s) { return std::round(s * 1e9) / 1e6; };  // ms, 1 ns resolution
  json::Value v = json::Value::object();
  v.set("format", kFormat);
  v.set("version", 1);
  v.set("schedule", m.schedule);
  v.set("statistic", statistic_name(m.statistic));
  v.set("stages", int64_t(m.stages.size()));
  v.set("tokens_per_microbatch", m.tokens_per_mb);
  v.set("traced_steps", m.traced_steps);
  if (m.trace_pipeline_s >= 0) v.set("trace_pipeline_ms", ms(m.trace_pipeline_s));
  v.set("p2p_ms", ms(m.p2p_s));
  v.set("tail_ms", ms(m.tail_s));
  json::Value stages = json::Value::array();
  for (size_t i = 0; i < m.stages.size(); ++i) {
    const StageTimes& t = m.stages[i];
    json::Value o = json::Value::object();
    o.set("stage", int64_t(i));
    const std::pair<const char*, double> fields[] = {{"f_ms", t.f},       {"b_ms", t.b},
                                                     {"w_ms", t.w},       {"bw_ms", t.bw},
                                                     {"send_ms", t.send}, {"recv_ms", t.recv}};
    for (const auto& [k, x] : fields)
      if (x >= 0) o.set(k, ms(x));
    o.set("samples", t.samples);
    stages.push_back(std::move(o));
  }
  v.set("stage_costs", std::move(stages));
  json::Value fb = json::Value::array();
  for (const auto& [k, x] : m.fb) {
    json::Value o = json::Value::object();
    o.set("f_stage", k.first), o.set("b_stage", k.second), o.set("ms", ms(x));
    fb.push_back(std::move(o));
  }
  v.set("fb_ms", std::move(fb));
  return json::write(v, 2) + "\n";
}

Result<MeasuredCosts> parse_measured(const std::string& text, const std::string& label) {
  FP8_ASSIGN_OR_RETURN(json::Value v, json::parse(text, label));
  auto bad = [&](const std::string& what) {
    return FP8_INVALID(
        "measured costs '{}': {} (written by fp8pipe simulate --calibrate-from "
        "... --write-calibration)",
        label, what);
  };
  const json::Value* fmtv = v.find("format");
  if (!fmtv || !fmtv->is_string() || fmtv->as_string() != kFormat) {
    return bad(fmt::format("\"format\" must be \"{}\"", kFormat));
  }
  auto num = [&](const json::Value& o, const char* k, double& out, bool required) -> Status {
    const json::Value* x = o.find(k);
    if (!x) return required ? bad(fmt::format("\"{}\" is missing", k)) : Status::Ok();
    if (!x->is_number() || x->as_double() < 0) {
      return bad(fmt::format("\"{}\" must be a non-negative number", k));
    }
    out = x->as_double();
    return Status::Ok();
  };
  MeasuredCosts m;
  const json::Value* sched = v.find("schedule");
  if (!sched || !sched->is_string()) return bad("\"schedule\" must be a string");
  m.schedule = sched->as_string();
  if (const json::Value* st = v.find("statistic")) {
    if (!st->is_string() || !parse_statistic(st->as_string()).ok()) {
      return bad("\"statistic\" must be \"mean\" or \"median\"");
    }
    m.statistic = *parse_statistic(st->as_string());
  }
  double tokens = 0, steps = 0, p2p = 0, tail = 0, pipe = -1e3;
  FP8_RETURN_IF_ERROR(num(v, "tokens_per_microbatch", tokens, true));
  FP8_RETURN_IF_ERROR(num(v, "traced_steps", steps, false));
  FP8_RETURN_IF_ERROR(num(v, "p2p_ms", p2p, true));
  FP8_RETURN_IF_ERROR(num(v, "tail_ms", tail, true));
  FP8_RETURN_IF_ERROR(num(v, "trace_pipeline_ms", pipe, false));
  m.tokens_per_mb = int64_t(tokens), m.traced_steps = int(steps);
  m.p2p_s = 1e-3 * p2p, m.tail_s = 1e-3 * tail, m.trace_pipeline_s = 1e-3 * pipe;
  const json::Value* stages = v.find("stage_costs");
  if (!stages || !stages->is_array() || stages->items().empty()) {
    return bad("\"stage_costs\" must be a non-empty array");
  }
  for (const json::Value& o : stages->items()) {
    double idx = -1, samples = 0;
    FP8_RETURN_IF_ERROR(num(o, "stage", idx, true));
    if (idx != double(m.stages.size())) return bad("\"stage_costs\" must list stages 0, 1, ...");
    StageTimes t;
    const std::pair<const char*, double*> fields[] = {{"f_ms", &t.f},       {"b_ms", &t.b},
                                                      {"w_ms", &t.w},       {"bw_ms", &t.bw},
                                                      {"send_ms", &t.send}, {"recv_ms", &t.recv}};
    for (const auto& [k, x] : fields) {
      double ms = -1e3;
      FP8_RETURN_IF_ERROR(num(o, k, ms, false));
      *x = 1e-3 * ms;
    }
    FP8_RETURN_IF_ERROR(num(o, "samples", samples, false));
    t.samples = int(samples);
    m.stages.push_back(t);
  }
  if (const json::Value* fb = v.find("fb_ms")) {
    if (!fb->is_array()) return bad("\"fb_ms\" must be an array");
    for (const json::Value& o : fb->items()) {
      double sf = 0, sb = 0, x = 0;
      FP8_RETURN_IF_ERROR(num(o, "f_stage", sf, true));
      FP8_RETURN_IF_ERROR(num(o, "b_stage", sb, true));
      FP8_RETURN_IF_ERROR(num(o, "ms", x, true));
      if (sf >= double(m.stages.size()) || sb >= double(m.stages.size())) {
        return bad("an \"fb_ms\" stage is out of range");
      }
      m.fb[{int(sf), int(sb)}] = 1e-3 * x;
    }
  }
  return m;
}

const char* statistic_name(Statistic s) { return s == Statistic::kMean ? "mean" : "median"; }

Result<Statistic> parse_statistic(const std::string& name) {
  if (name == "mean") return Statistic::kMean;
  if (name == "median") return Statistic::kMedian;
  return FP8_INVALID("statistic '{}': expected mean or median", name);
}

Result<MeasuredCosts> load_measured(const std::string& path) {
  auto text = read_text(path);
  if (!text.ok()) return FP8_INVALID("measured costs {}", text.status().message());
  return parse_measured(*text, path);
}

Result<MeasuredStep> simulate_measured(const Schedule& s, const MeasuredCosts& m,
                                       bool keep_events) {
  FP8_RETURN_IF_ERROR(m.check_covers(s, m.tokens_per_mb));
  OpCosts c;
  c.measured = &m;
  MeasuredStep r;
  FP8_ASSIGN_OR_RETURN(r.pipe, simulate_pipeline(s, c, keep_events));
  r.step_s = r.pipe.makespan + m.tail_s;
  for (int k = 0; k < s.ranks; ++k) r.bubble_s = std::max(r.bubble_s, r.pipe.bubble(k));
  r.bubble_frac = r.pipe.makespan > 0 ? r.bubble_s / r.pipe.makespan : 0;
  return r;
}

std::string format_measured(const Schedule& s, const MeasuredCosts& m, const MeasuredStep& r) {
  auto ms = [](double x) { return x >= 0 ? fmt::format("{:.2f}", 1e3 * x) : std::string("-"); };
  std::string o = fmt::format(
      "measured    costs of a {} run ({} over {} traced step(s)), {} tokens per micro-batch; "
      "simulating {} (pp={}, {} micro-batches)\n",
      m.schedule, statistic_name(m.statistic), m.traced_steps, m.tokens_per_mb,
      schedule_kind_name(s.kind), s.ranks, s.microbatches);
  o += "stage       F ms | B ms (input) | W ms | B+W ms | send ms | recv ms | samples\n";
  for (size_t i = 0; i < m.stages.size(); ++i) {
    const StageTimes& t = m.stages[i];
    o += fmt::format("  {:<9} {} | {} | {} | {} | {} | {} | {}\n", i, ms(t.f), ms(t.b), ms(t.w),
                     ms(t.bw), ms(t.send), ms(t.recv), t.samples);
  }
  for (const auto& [k, x] : m.fb) {
    o += fmt::format("  F&B       F stage {} + B stage {}: {} ms\n", k.first, k.second, ms(x));
  }
  o += fmt::format("p2p         {} ms per message (post to end of receive)\n", ms(m.p2p_s));
  o += fmt::format(
      "outside     {} ms per step (gradient sums, optimizer, zeroing: between traced steps)\n",
      ms(m.tail_s));
  o += fmt::format(
      "simulated   step {} ms = pipeline {} + outside {}; bubble {} ms ({:.1f}% of the "
      "pipeline, worst rank)\n",
      ms(r.step_s), ms(r.pipe.makespan), ms(m.tail_s), ms(r.bubble_s), 100 * r.bubble_frac);
  // The traced span is of the calibration run: shown only when simulating that schedule.
  const bool same = m.schedule == schedule_kind_name(s.kind) && m.trace_pipeline_s >= 0;
  if (same) {
    o += fmt::format("traced      pipeline {} ms ({} over steps of the longest rank span)\n",
                     ms(m.trace_pipeline_s), statistic_name(m.statistic));
  }
  o += fmt::format(
      "result      sim_step_ms={:.3f} sim_pipeline_ms={:.3f} tail_ms={:.3f} p2p_ms={:.3f} "
      "trace_pipeline_ms={:.3f}\n",
      1e3 * r.step_s, 1e3 * r.pipe.makespan, 1e3 * m.tail_s, 1e3 * m.p2p_s,
      same ? 1e3 * m.trace_pipeline_s : -1.0);
  return o;
}

}  // namespace fp8pipe::parallel::sim
