// Readable forms of a Schedule: the text format of DESIGN.md §5 (what `fp8pipe schedule` prints
// and the golden files hold), a full instruction dump, and — under a simple cost model — a
// timeline with per-rank bubbles, drawn as a Chrome/Perfetto trace and as an SVG like DeepSeek's
// DualPipe figure. The timeline is a drawing aid, not the cluster simulator (parallel/sim/).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"
#include "parallel/schedule.h"

namespace fp8pipe::parallel {

// One line per COMPUTE op, rank by rank, in issue order (sends/receives omitted):
//   rank=<r> F|B|W mb=<m> dir=<d>      rank=<r> FB mb=<mf>,<mb> dir=<df>,<db>
// mb counts within its stream (dualpipe: per direction; dir 0 enters at rank 0, dir 1 at rank
// PP-1; dualpipev: dir = the leg). A B whose W is deferred prints as B.
std::string format_schedule(const Schedule& s);

// Every instruction, rank by rank: the lines above plus stage=, ` defer_w` on a B whose W comes
// later, and `rank=<r> SEND_ACT|RECV_ACT|SEND_GRAD|RECV_GRAD mb= dir= stage= peer=`.
std::string format_instructions(const Schedule& s);

// Durations of one chunk's forward (F), full backward (B), weight backward (W) and overlapped
// forward+backward (FB, DeepSeek's F&B). A deferred B costs B - W. Sends/receives take no time.
// Defaults are the ratios of DeepSeek's DualPipe figure (F&B drawn as F + B).
struct Costs {
  double f = 1, b = 2, w = 1, fb = 3;
};
// "F,B,W,FB", e.g. "1,2,1,3"; all >= 0 and W <= B.
Result<Costs> parse_costs(std::string_view text);
double op_cost(const Instr& in, const Costs& c);

// List-scheduled timing: each rank runs its list in order; a compute op starts when the rank is
// free; a RECV completes when both the rank reaches it and its SEND has been posted.
struct Timeline {
  std::vector<std::vector<double>> start, end;  // [rank][instruction index]
  std::vector<double> busy;                     // compute time per rank
  double makespan = 0;                          // the last op's end (all ranks start at 0)
  double bubble(int rank) const { return makespan - busy[rank]; }
};
Result<Timeline> simulate_timeline(const Schedule& s, const Costs& c);

// DeepSeek-V3 TR Table 2's bubble for this kind under these costs, with PP = pipeline stages:
//   1f1b (PP-1)(F+B); zb1p (PP-1)(F+B-2W); dualpipe (PP/2-1)(F&B+B-3W), PP = ranks;
//   dualpipev the same with PP = 2·ranks stages (on PP/2 devices).
double table2_bubble(const Schedule& s, const Costs& c);

// "rank=<r> busy=<t> bubble=<t>" per rank, then makespan and the Table 2 value.
std::string format_bubbles(const Schedule& s, const Timeline& t, const Costs& c);

// Chrome trace JSON (chrome://tracing, Perfetto): one complete ("X") event per instruction,
// pid = rank, threads "compute" and "comm"; one cost unit = 1 ms, ts/dur in µs.
std::string chrome_trace_json(const Schedule& s, const Timeline& t);

// SVG timeline: ranks as rows, time to the right; hue = micro-batch, warm palette for dir 0 and
// cool for dir 1; F light, B dark, W pale and dashed, FB split into its F and B halves; labels
// are micro-batch numbers; each row ends with its bubble.
std::string timeline_svg(const Schedule& s, const Timeline& t, const Costs& c);

}  // namespace fp8pipe::parallel
