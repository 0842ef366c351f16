// `fp8pipe schedule --kind K --stages PP --microbatches M [--trace FILE.json] [--svg FILE.svg]
// [--cost F,B,W,FB] [--instrs] [--groups]`: builds the schedule, validates it by simulating all
// ranks, and prints the DESIGN.md §5 text format (or, with --instrs, every instruction incl.
// sends/receives). --groups then prints the matched point-to-point groups that the executor posts
// over NCCL (parallel/p2p_plan.h), a line per rank, and on stderr their rounds, early and late
// sends, and with --cost the makespan under them next to the eager one (MPI).
// --stages counts pipeline RANKS (config parallel.pp). An invalid request or schedule prints the
// rule (and for a bad schedule the step x rank grid) and exits 2. --trace / --svg draw the timeline
// under the cost model (default 1,2,1,3: DeepSeek's figure ratios) and print bubbles on stderr.
#include <fmt/format.h>

#include <charconv>
#include <cstdio>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>

#include "launch/cli_files.h"
#include "launch/commands.h"
#include "parallel/p2p_plan.h"
#include "parallel/schedule.h"
#include "parallel/schedule_format.h"
#include "parallel/sim/simulator.h"
#include "parallel/validate.h"

namespace fp8pipe::cli {
namespace {

namespace pl = fp8pipe::parallel;

constexpr char kUsage[] =
    "usage: fp8pipe schedule --kind 1f1b|zb1p|dualpipe|dualpipev --stages PP --microbatches M "
    "[--trace FILE.json] [--svg FILE.svg] [--cost F,B,W,FB] [--instrs] [--groups]";

struct Options {
  pl::ScheduleKind kind = pl::ScheduleKind::kDualPipe;
  int stages = 0, microbatches = 0;
  std::string trace, svg;
  pl::Costs costs;
  bool cost_given = false, instrs = false, groups = false;
};

Result<int> parse_int(std::string_view flag, std::string_view v) {
  int x = 0;
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), x);
  if (ec != std::errc() || p != v.data() + v.size()) {
    return FP8_INVALID("{}: '{}' is not an integer", flag, v);
  }
  return x;
}

Status set_flag(Options& o, std::string_view flag, std::string_view v) {
  if (flag == "--kind") {
    FP8_ASSIGN_OR_RETURN(o.kind, pl::parse_schedule_kind(v));
  } else if (flag == "--stages") {
    FP8_ASSIGN_OR_RETURN(o.stages, parse_int(flag, v));
  } else if (flag == "--microbatches") {
    FP8_ASSIGN_OR_RETURN(o.microbatches, parse_int(flag, v));
  } else if (flag == "--trace") {
    o.trace = v;
  } else if (flag == "--svg") {
    o.svg = v;
  } else if (flag == "--cost") {
    FP8_ASSIGN_OR_RETURN(o.costs, pl::parse_costs(v));
    o.cost_given = true;
  } else {
    return FP8_INVALID(
        "unknown flag '{}' (valid: --kind, --stages, --microbatches, --trace, --svg, --cost, "
        "--instrs, --groups)",
        flag);
  }
  return Status::Ok();
}

Result<Options> parse(int argc, char** argv) {
  Options o;
  bool kind = false;
  for (int i = 0; i < argc; ++i) {
    const std::string_view flag = argv[i];
    if (flag == "--instrs" || flag == "--groups") {
      (flag == "--instrs" ? o.instrs : o.groups) = true;
      continue;
    }
    if (i + 1 >= argc) return FP8_INVALID("{} needs a value\n{}", flag, kUsage);
    FP8_RETURN_IF_ERROR(set_flag(o, flag, argv[++i]));
    kind |= flag == "--kind";
  }
  if (!kind || o.stages == 0 || o.microbatches == 0) {
    return FP8_INVALID("--kind, --stages and --microbatches are required\n{}", kUsage);
  }
  return o;
}

// Timeline, trace, SVG and the bubble summary (stderr) when asked for.
Status draw(const Options& o, const pl::Schedule& s) {
  if (o.trace.empty() && o.svg.empty() && !o.cost_given) return Status::Ok();
  FP8_ASSIGN_OR_RETURN(const pl::Timeline t, pl::simulate_timeline(s, o.costs));
  if (!o.trace.empty()) FP8_RETURN_IF_ERROR(write_text_file(o.trace, pl::chrome_trace_json(s, t)));
  if (!o.svg.empty()) FP8_RETURN_IF_ERROR(write_text_file(o.svg, pl::timeline_svg(s, t, o.costs)));
  std::fputs(pl::format_bubbles(s, t, o.costs).c_str(), stderr);
  return Status::Ok();
}

// --groups: each rank's plan points, "@AT" (before instruction AT), then its groups, "[ops]#ROUND"
// ("e" after the round: an early send-only group); stderr: the counts and, with --cost, the
// makespans of the step simulator (free messages) eager and matched (with early sends, as the
// executor plans them, and with late sends instead).
Status print_groups(const Options& o, const pl::Schedule& s) {
  FP8_ASSIGN_OR_RETURN(const pl::P2pPlan plan, pl::plan_p2p_groups(s, /*early_sends=*/true));
  FP8_ASSIGN_OR_RETURN(const pl::P2pPlan late, pl::plan_p2p_groups(s, /*early_sends=*/false));
  for (int r = 0; r < s.ranks; ++r) {
    std::string line = fmt::format("rank {}:", r);
    for (const pl::P2pPoint& pt : plan.ranks[r]) {
      line += fmt::format(" @{}", pt.at);
      for (const pl::P2pGroup& g : pt.groups) {
        std::string ops;
        for (int i : g.ops) ops += (ops.empty() ? "" : " ") + pl::instr_label(s.rank_instrs[r][i]);
        line += fmt::format(" [{}]#{}{}", ops, g.round, g.early ? "e" : "");
      }
    }
    std::printf("%s\n", line.c_str());
  }
  std::string summary = fmt::format(
      "matched groups (NCCL): {} groups in {} rounds, {} of them early sends; without early "
      "sends {} sends would go late",
      plan.groups, plan.rounds, plan.early_groups, late.late_sends);
  if (o.cost_given) {
    pl::sim::OpCosts c;
    c.f = o.costs.f, c.b_input = o.costs.b - o.costs.w, c.w = o.costs.w, c.fb = o.costs.fb;
    FP8_ASSIGN_OR_RETURN(const auto eager, pl::sim::simulate_pipeline(s, c));
    FP8_ASSIGN_OR_RETURN(const auto matched, pl::sim::simulate_pipeline(s, c, false, &plan));
    FP8_ASSIGN_OR_RETURN(const auto lated, pl::sim::simulate_pipeline(s, c, false, &late));
    summary += fmt::format("; makespan {:g} eager (MPI), {:g} matched, {:g} with late sends",
                           eager.makespan, matched.makespan, lated.makespan);
  }
  std::fprintf(stderr, "%s\n", summary.c_str());
  return Status::Ok();
}

}  // namespace

int cmd_schedule(int argc, char** argv) {
  auto opts = parse(argc, argv);
  if (!opts.ok()) {
    std::fprintf(stderr, "%s\n", opts.status().to_string().c_str());
    return 2;
  }
  auto sched = pl::make_schedule(opts->kind, opts->stages, opts->microbatches);
  Status st = sched.ok() ? pl::validate_schedule(*sched) : sched.status();
  if (!st.ok()) {
    std::fprintf(stderr, "%s\n", st.to_string().c_str());
    return 2;
  }
  const std::string text =
      opts->instrs ? pl::format_instructions(*sched) : pl::format_schedule(*sched);
  std::fwrite(text.data(), 1, text.size(), stdout);
  st = draw(*opts, *sched);
  if (st.ok() && opts->groups) st = print_groups(*opts, *sched);
  if (!st.ok()) {
    std::fprintf(stderr, "%s\n", st.to_string().c_str());
    return 1;
  }
  return 0;
}

}  // namespace fp8pipe::cli
