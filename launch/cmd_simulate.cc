// `fp8pipe simulate CONFIG [--a.b=v ...] [--calibration FILE.json] [--trace FILE.json]
// [--csv FILE.csv] [--sweep] [--svg FILE.svg]`: predicts a training step on the config's cluster
// with the discrete-event simulator (parallel/sim/) and, with --sweep, scaling curves over layouts.
// With `--calibrate-from TRACE` (log.trace files of a real run, "{rank}" expanded over the ranks;
// repeatable) or `--measured-costs FILE.json` the per-stage costs come from that run instead of
// the GPU cost model (parallel/sim/measured.h); `--write-calibration FILE.json` saves them.
#include <fmt/format.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "core/config.h"
#include "launch/cli_files.h"
#include "launch/commands.h"
#include "launch/flops.h"
#include "launch/metrics.h"
#include "launch/svg_plot.h"
#include "parallel/schedule.h"
#include "parallel/sim/cost_model.h"
#include "parallel/sim/measured.h"
#include "parallel/sim/simulator.h"

namespace fp8pipe::cli {
namespace {

namespace pl = fp8pipe::parallel;
namespace sim = fp8pipe::parallel::sim;

constexpr char kUsage[] =
    "usage: fp8pipe simulate CONFIG [--a.b=v ...] [--calibration FILE.json] [--trace FILE.json] "
    "[--csv FILE.csv] [--sweep] [--svg FILE.svg]\n"
    "       fp8pipe simulate CONFIG [--a.b=v ...] (--calibrate-from TRACE.json ... "
    "[--calibrate-stat mean|median] [--write-calibration FILE.json] | --measured-costs "
    "FILE.json) [--trace FILE.json]";

struct Options {
  std::string config, calibration, trace, csv, svg, write_calibration, measured_costs;
  std::string calibrate_stat;  // default mean
  std::vector<std::string> calibrate_from;
  bool sweep = false;
  std::vector<std::string> overrides;
};

Result<Options> parse(int argc, char** argv) {
  Options o;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](std::string& out) -> Status {
      if (i + 1 >= argc) return FP8_INVALID("{} needs a value\n{}", a, kUsage);
      out = argv[++i];
      return Status::Ok();
    };
    if (a == "--sweep") {
      o.sweep = true;
    } else if (a == "--trace") {
      FP8_RETURN_IF_ERROR(value(o.trace));
    } else if (a == "--csv") {
      FP8_RETURN_IF_ERROR(value(o.csv));
    } else if (a == "--svg") {
      FP8_RETURN_IF_ERROR(value(o.svg));
    } else if (a == "--calibration") {
      FP8_RETURN_IF_ERROR(value(o.calibration));
    } else if (a == "--calibrate-from") {
      FP8_RETURN_IF_ERROR(value(o.calibrate_from.emplace_back()));
    } else if (a == "--calibrate-stat") {
      FP8_RETURN_IF_ERROR(value(o.calibrate_stat));
    } else if (a == "--write-calibration") {
      FP8_RETURN_IF_ERROR(value(o.write_calibration));
    } else if (a == "--measured-costs") {
      FP8_RETURN_IF_ERROR(value(o.measured_costs));
    } else if (a.starts_with("--")) {
      o.overrides.push_back(a);
      if (a.find('=') == std::string::npos && i + 1 < argc) o.overrides.push_back(argv[++i]);
    } else if (o.config.empty()) {
      o.config = a;
    } else {
      return FP8_INVALID("unexpected argument '{}'\n{}", a, kUsage);
    }
  }
  if (o.config.empty()) return FP8_INVALID("a CONFIG is required\n{}", kUsage);
  const bool measured = !o.calibrate_from.empty() || !o.measured_costs.empty();
  if (!o.calibrate_from.empty() && !o.measured_costs.empty()) {
    return FP8_INVALID("--calibrate-from and --measured-costs exclude each other\n{}", kUsage);
  }
  if ((!o.write_calibration.empty() || !o.calibrate_stat.empty()) && o.calibrate_from.empty()) {
    return FP8_INVALID("--write-calibration and --calibrate-stat need --calibrate-from\n{}",
                       kUsage);
  }
  if (measured && (o.sweep || !o.calibration.empty() || !o.csv.empty())) {
    return FP8_INVALID(
        "--sweep, --calibration and --csv use the GPU cost model; they do not combine with "
        "measured costs\n{}",
        kUsage);
  }
  return o;
}

struct Run {
  config::Config cfg;
  pl::Schedule sched;
  sim::CostModel cm;
  sim::StepResult r;
};

Result<Run> run_one(const config::Config& cfg, const sim::Calibration& cal, bool events) {
  Run run;
  run.cfg = cfg;
  const auto& p = cfg.parallel();
  FP8_ASSIGN_OR_RETURN(auto kind, pl::parse_schedule_kind(p.schedule()));
  FP8_ASSIGN_OR_RETURN(run.sched, pl::make_schedule(kind, p.pp(), p.microbatches()));
  FP8_ASSIGN_OR_RETURN(run.cm, sim::build_cost_model(cfg, run.sched, cal));
  FP8_ASSIGN_OR_RETURN(run.r, sim::simulate_step(cfg, run.sched, run.cm, events));
  return run;
}

// The whole run: train.steps through the batch plan (train.batch_ramp), each batch size's step
// simulated once with its own micro-batch count; `full` is the full batch's step.
Result<std::string> run_line(const config::Config& cfg, const sim::Calibration& cal,
                             const Run& full) {
  FP8_ASSIGN_OR_RETURN(const data::BatchPlan plan, batch_plan(cfg));
  const auto& p = cfg.parallel();
  const auto& t = cfg.train();
  std::map<int64_t, int64_t> steps_at;  // batch -> steps
  const int64_t ramp_end = std::min(t.steps(), plan.ramp_steps());
  for (int64_t s = 0; s < ramp_end; ++s) ++steps_at[plan.batch(s)];
  if (t.steps() > ramp_end) steps_at[plan.full()] += t.steps() - ramp_end;
  double seconds = 0, ramp_s = 0;
  for (const auto& [b, n] : steps_at) {
    double step_s = full.r.step_s;
    if (b != plan.full()) {
      config::Config c = cfg;
      c.mutable_train()->set_global_batch(b);
      c.mutable_parallel()->set_microbatches(microbatches_for(cfg, b));
      FP8_ASSIGN_OR_RETURN(auto r, run_one(c, cal, false));
      step_s = r.r.step_s;
      ramp_s += static_cast<double>(n) * step_s;
    }
    seconds += static_cast<double>(n) * step_s;
  }
  const int64_t gpus = int64_t{p.pp()} * p.dp();
  const double tokens = static_cast<double>(plan.first_sample(t.steps())) * t.seq_len();
  std::string out = fmt::format(
      "run         train.steps={}: {:.4g}T tokens in {:.1f} days on {} GPUs = {:.0f}K GPU-hours",
      t.steps(), tokens / 1e12, seconds / 86400, gpus, seconds * gpus / 3600 / 1e3);
  if (ramp_end > 0) {
    out += fmt::format(" (batch ramp: {} steps, {:.4g}B tokens, {:.1f} days)", ramp_end,
                       static_cast<double>(plan.first_sample(ramp_end)) * t.seq_len() / 1e9,
                       ramp_s / 86400);
  }
  return out + "\n";
}

constexpr char kCsvHeader[] =
    "study,gpus,pp,dp,ep,schedule,microbatches,step_s,pipeline_s,bubble_s,bubble_frac,"
    "exposed_comm_s,mem_gib,params_b,tokens_per_s_per_gpu,tflops_per_gpu,mfu_bf16,"
    "gpu_hours_per_trillion\n";

std::string csv_row(const std::string& study, const Run& x) {
  const auto& p = x.cfg.parallel();
  const auto& r = x.r;
  return fmt::format(
      "{},{},{},{},{},{},{},{:.4f},{:.4f},{:.4f},{:.4f},{:.4f},{:.2f},{:.3f},{:.1f},"
      "{:.1f},{:.4f},{:.0f}\n",
      study, int64_t(p.pp()) * p.dp(), p.pp(), p.dp(), p.ep(), p.schedule(), p.microbatches(),
      r.step_s, r.pipe.makespan, r.bubble_s, r.bubble_frac, r.exposed_comm_s,
      r.mem.total() / double(1ull << 30), r.params_per_gpu / 1e9, r.tokens_per_s_per_gpu,
      r.tflops_per_gpu, r.mfu_bf16, r.gpu_hours_per_trillion);
}

// The consistency line: the cost model's model FLOPs per token vs launch/flops.h's.
std::string flops_check(const Run& x) {
  const double per_token = x.r.model_flops_per_step / x.r.tokens_per_step;
  const double ref = flops_per_token(x.cfg.model(), x.cfg.train().seq_len()).train();
  return fmt::format("check       model FLOPs/token {:.1f} G (launch/flops.h: {:.1f} G)\n",
                     per_token / 1e9, ref / 1e9);
}

// The simulator on costs measured by a real run (`--calibrate-from`, `--measured-costs`).
Status simulate_measured_run(const config::Config& cfg, const Options& o) {
  const auto& p = cfg.parallel();
  FP8_ASSIGN_OR_RETURN(auto kind, pl::parse_schedule_kind(p.schedule()));
  FP8_ASSIGN_OR_RETURN(auto sched, pl::make_schedule(kind, p.pp(), p.microbatches()));
  const int64_t rows = int64_t(p.dp()) * p.microbatches();
  if (cfg.train().global_batch() % rows != 0) {
    return FP8_INVALID(
        "simulate: train.global_batch={} is not a multiple of parallel.dp={} x "
        "parallel.microbatches={}",
        cfg.train().global_batch(), p.dp(), p.microbatches());
  }
  const int64_t tokens = cfg.train().global_batch() / rows * cfg.train().seq_len();
  sim::MeasuredCosts m;
  if (!o.calibrate_from.empty()) {
    std::vector<sim::MeasuredEvent> events;
    for (const std::string& pattern : o.calibrate_from) {
      const bool per_rank = pattern.find("{rank}") != std::string::npos;
      for (int r = 0; r < (per_rank ? p.pp() * p.dp() : 1); ++r) {
        FP8_ASSIGN_OR_RETURN(auto ev, sim::read_trace(rank_path(pattern, r)));
        events.insert(events.end(), ev.begin(), ev.end());
      }
    }
    FP8_ASSIGN_OR_RETURN(
        auto stat, sim::parse_statistic(o.calibrate_stat.empty() ? "mean" : o.calibrate_stat));
    FP8_ASSIGN_OR_RETURN(m, sim::calibrate(sched, p.dp(), tokens, events, stat));
    if (!o.write_calibration.empty()) {
      FP8_RETURN_IF_ERROR(write_text_file(o.write_calibration, sim::to_json(m)));
    }
  } else {
    FP8_ASSIGN_OR_RETURN(m, sim::load_measured(o.measured_costs));
  }
  FP8_RETURN_IF_ERROR(m.check_covers(sched, tokens));
  FP8_ASSIGN_OR_RETURN(auto r, sim::simulate_measured(sched, m, !o.trace.empty()));
  const std::string out = sim::format_measured(sched, m, r);
  std::fwrite(out.data(), 1, out.size(), stdout);
  if (!o.trace.empty()) return write_text_file(o.trace, sim::chrome_trace(r.pipe, sched.ranks));
  return Status::Ok();
}

}  // namespace

// Sweep (in cmd_simulate_sweep below): layouts derived from the base config.
Status simulate_sweep(const config::Config& base, const sim::Calibration& cal,
                      const std::string& csv, const std::string& svg);

int cmd_simulate(int argc, char** argv) {
  auto fail = [](const Status& s, int code) {
    std::fprintf(stderr, "fp8pipe simulate: %s\n", s.to_string().c_str());
    return code;
  };
  auto opts = parse(argc, argv);
  if (!opts.ok()) return fail(opts.status(), 2);
  auto cfg = load_config(opts->config, opts->overrides);
  if (!cfg.ok()) return fail(cfg.status(), 2);
  if (!opts->calibrate_from.empty() || !opts->measured_costs.empty()) {
    Status st = simulate_measured_run(*cfg, *opts);
    return st.ok() ? 0 : fail(st, 1);
  }
  sim::Calibration cal;
  std::string calib =
      opts->calibration.empty() ? cfg->cluster().calibration_file() : opts->calibration;
  if (!calib.empty()) {
    auto c = sim::load_calibration(calib);
    if (!c.ok()) return fail(c.status(), 2);
    cal = *c;
  }
  if (opts->sweep) {
    Status st = simulate_sweep(*cfg, cal, opts->csv.empty() ? "sweep.csv" : opts->csv,
                               opts->svg.empty() ? "sweep.svg" : opts->svg);
    return st.ok() ? 0 : fail(st, 1);
  }
  auto run = run_one(*cfg, cal, !opts->trace.empty());
  if (!run.ok()) return fail(run.status(), 2);
  auto whole = run_line(*cfg, cal, *run);
  if (!whole.ok()) return fail(whole.status(), 2);
  std::string out =
      sim::format_step(run->cfg, run->sched, run->cm, run->r) + flops_check(*run) + *whole;
  std::fwrite(out.data(), 1, out.size(), stdout);
  Status st;
  if (!opts->trace.empty()) {
    st = write_text_file(opts->trace, sim::chrome_trace(run->r.pipe, run->sched.ranks));
  }
  if (st.ok() && !opts->csv.empty()) {
    st = write_text_file(opts->csv, kCsvHeader + csv_row("single", *run));
  }
  return st.ok() ? 0 : fail(st, 1);
}

namespace {

struct Point {
  std::string study;
  int gpus, pp, ep, mb;
  std::string kind;
};

// GPUs 256 -> 2048 by dp (pp fixed, ep = min(base ep, dp), global batch fixed) for each kind;
// pp, ep and micro-batch count (sequences per micro-batch) at the base GPU count.
std::vector<Point> sweep_points(const config::Config& b) {
  const auto& p = b.parallel();
  const int gpus = p.pp() * p.dp();
  std::vector<Point> pts;
  for (const char* k : {"1f1b", "zb1p", "dualpipe", "dualpipev"}) {
    for (int g = 256; g <= gpus; g *= 2) pts.push_back({"gpus", g, p.pp(), p.ep(), 0, k});
    for (int pp : {8, 16, 32}) pts.push_back({"pp", gpus, pp, p.ep(), 0, k});
  }
  for (int ep : {8, 16, 32, 64, 128}) pts.push_back({"ep", gpus, p.pp(), ep, 0, p.schedule()});
  const int mbs = p.microbatches();
  for (int m : {mbs / 4, mbs / 2, mbs})
    pts.push_back({"microbatches", gpus, p.pp(), p.ep(), m, p.schedule()});
  return pts;
}

Result<config::Config> layout(const config::Config& base, const Point& pt) {
  config::Config c = base;
  auto* p = c.mutable_parallel();
  const int dp = pt.gpus / pt.pp;
  p->set_pp(pt.pp), p->set_dp(dp), p->set_ep(std::min(pt.ep, dp)), p->set_schedule(pt.kind);
  const int64_t seqs = c.train().global_batch() / dp;
  p->set_microbatches(pt.mb > 0 ? pt.mb : int(seqs));
  c.mutable_cluster()->set_gpus(pt.gpus);
  c.mutable_train()->clear_batch_ramp();  // the sweep compares full-batch steps
  FP8_RETURN_IF_ERROR(validate(c));
  return c;
}

plot::Panel panel(const std::vector<std::pair<Point, Run>>& runs, const char* id, const char* title,
                  const char* ylabel, double (*y)(const Run&)) {
  plot::Panel pn;
  pn.id = id, pn.title = title, pn.xlabel = "GPUs", pn.ylabel = ylabel;
  for (const char* k : {"1f1b", "zb1p", "dualpipe", "dualpipev"}) {
    plot::Series s;
    s.label = k;
    for (const auto& [pt, run] : runs) {
      if (pt.study != "gpus" || pt.kind != k) continue;
      s.x.push_back(pt.gpus), s.y.push_back(y(run));
    }
    pn.lines.push_back(s);
  }
  pn.ymin = 0;
  return pn;
}

}  // namespace

Status simulate_sweep(const config::Config& base, const sim::Calibration& cal,
                      const std::string& csv, const std::string& svg) {
  std::string rows = kCsvHeader;
  std::vector<std::pair<Point, Run>> runs;
  for (const Point& pt : sweep_points(base)) {
    auto c = layout(base, pt);
    auto run = c.ok() ? run_one(*c, cal, false) : Result<Run>(c.status());
    if (!run.ok()) {
      std::fprintf(stderr, "skip %s gpus=%d pp=%d ep=%d %s: %s\n", pt.study.c_str(), pt.gpus, pt.pp,
                   pt.ep, pt.kind.c_str(), run.status().message().c_str());
      continue;
    }
    rows += csv_row(pt.study, *run);
    std::fputs(csv_row(pt.study, *run).c_str(), stdout);
    runs.emplace_back(pt, std::move(*run));
  }
  std::vector<plot::Panel> panels = {
      panel(runs, "tps", "tokens/s per GPU", "tokens/s",
            [](const Run& r) { return r.r.tokens_per_s_per_gpu; }),
      panel(runs, "cost", "GPU-hours per trillion tokens", "GPU-hours",
            [](const Run& r) { return r.r.gpu_hours_per_trillion; }),
      panel(runs, "bubble", "pipeline bubble (worst rank)", "fraction",
            [](const Run& r) { return r.r.bubble_frac; }),
      panel(runs, "mem", "memory per GPU", "GiB",
            [](const Run& r) { return r.r.mem.total() / double(1ull << 30); })};
  FP8_RETURN_IF_ERROR(write_text_file(csv, rows));
  return write_text_file(svg,
                         plot::render_svg("fp8pipe simulate: scaling by data parallelism (pp " +
                                              std::to_string(base.parallel().pp()) + ")",
                                          panels, 2));
}

}  // namespace fp8pipe::cli
