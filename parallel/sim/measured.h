// The simulator calibrated on a real run: per-stage costs of F, B, W and F&B measured from the
// per-rank Chrome traces the trainer writes (log.trace, parallel/trace.h), instead of the GPU cost
// model, so that a simulated step can be compared with the measured one (CPU backend).
//
// What is measured, per pipeline stage (the mean, or the median, over every micro-batch of every
// traced step; the mean by default: the target is a mean step time, and time lost to other
// processes lands in an op in proportion to its length, so a median drops real time on a
// loaded machine):
//   f, b (input gradient of a deferred B), w, bw (a full B: input and weight gradients) and fb
//   (an F&B pair, per (F stage, B stage)): the instruction's interval plus the idle gap up to the
//   rank's next recorded event (host work the executor does between instructions);
//   send_s: the gap after a SEND's post (the compute thread is held while the message is handed to
//   the comm thread); recv_s: the gap after a RECV's wait ends;
//   p2p_s: one message, from the SEND's post to the end of the matching RECV, over the messages
//   whose receiver was already waiting. Each rank has its own trace clock: the offset between
//   two ranks' clocks is NTP's estimate (min delay a->b - min delay b->a) / 2;
//   tail_s: the step time outside the pipeline (zeroing gradients, the by-name gradient sums,
//   the optimizer, metrics): between two consecutive traced steps, the gap from a rank's last
//   event to its first event of the next step, the smallest over the ranks (the rank that
//   finished the pipeline last), over step pairs. Needs log.trace_steps >= 2.
//
// The calibration file (`fp8pipe simulate CONFIG --calibrate-from TRACE --write-calibration F`) is
// a JSON object, times in milliseconds:
//   {"format": "fp8pipe-measured-costs", "version": 1, "schedule": "1f1b", "statistic": "mean",
//    "stages": 2,
//    "tokens_per_microbatch": 256, "traced_steps": 3, "trace_pipeline_ms": 410.2,
//    "p2p_ms": 0.21, "tail_ms": 8.3,
//    "stage_costs": [{"stage": 0, "f_ms": 20.9, "bw_ms": 38.5, "send_ms": 0.1, "recv_ms": 0.05,
//                     "samples": 24}, ...],
//    "fb_ms": [{"f_stage": 0, "b_stage": 3, "ms": 61.0}, ...]}
// A cost that was not observed is absent ("b_ms", "w_ms" only with deferred weight gradients).
// Applied to another schedule of the same stages (`--measured-costs F`): a full B falls back to
// b + w, an F&B pair to f + bw; a deferred B or a W needs b and w measured (calibrate on zb1p).
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/status.h"
#include "parallel/schedule.h"
#include "parallel/sim/simulator.h"

namespace fp8pipe::parallel::sim {

// One event of a log.trace file: an interval (compute op or receive wait) or an instant (send).
struct MeasuredEvent {
  int rank = 0;  // world rank (the trace's pid)
  int64_t step = 0;
  std::string name;  // instr_label() of the executed instruction
  double ts_us = 0, dur_us = 0;
  bool instant = false;
};

// Reads one log.trace file: the executed instructions (events named by instr_label on the compute
// and comm rows, tid 0 and 1), in recorded order; other rows, names and phases are skipped.
Result<std::vector<MeasuredEvent>> read_trace(const std::string& path);
Result<std::vector<MeasuredEvent>> parse_trace(const std::string& text, const std::string& label);

struct StageTimes {
  // Seconds; < 0: not observed.
  double f = -1, b = -1, w = -1, bw = -1, send = -1, recv = -1;
  int samples = 0;  // compute instructions measured on this stage
};

enum class Statistic { kMean, kMedian };
const char* statistic_name(Statistic s);
Result<Statistic> parse_statistic(const std::string& name);

struct MeasuredCosts {
  std::string schedule;  // the schedule kind the traces ran
  Statistic statistic = Statistic::kMean;
  int64_t tokens_per_mb = 0;
  int traced_steps = 0;
  std::vector<StageTimes> stages;            // [stage]
  std::map<std::pair<int, int>, double> fb;  // (F stage, B stage) -> seconds
  double p2p_s = 0, tail_s = 0;
  double trace_pipeline_s = -1;  // measured: the longest rank's span, over the traced steps

  // The compute-stream time of an instruction (compute ops; comm ops: their overhead).
  double op(const Instr& in) const;
  double comm_overhead(const Instr& in) const;
  // Every instruction of `s` has a cost (same stage count, same tokens per micro-batch).
  Status check_covers(const Schedule& s, int64_t tokens_per_mb) const;
};

// Calibration from the traces of every rank of one run (world rank = stage * dp + dp index, as
// parallel/topology.h lays them out). Each traced step of each rank must list exactly the
// instructions of `s` for its pipeline rank.
Result<MeasuredCosts> calibrate(const Schedule& s, int dp, int64_t tokens_per_mb,
                                const std::vector<MeasuredEvent>& events,
                                Statistic stat = Statistic::kMean);

std::string to_json(const MeasuredCosts& m);
Result<MeasuredCosts> load_measured(const std::string& path);
Result<MeasuredCosts> parse_measured(const std::string& text, const std::string& label);

struct MeasuredStep {
  PipelineResult pipe;
  double step_s = 0;  // pipe.makespan + tail
  double bubble_s = 0, bubble_frac = 0;
};

// The pipeline with measured costs (send transfer time folded into p2p_s), plus the tail.
Result<MeasuredStep> simulate_measured(const Schedule& s, const MeasuredCosts& m,
                                       bool keep_events = false);

// What `fp8pipe simulate --calibrate-from/--measured-costs` prints, ending with a `result` line
// of key=value pairs for scripts.
std::string format_measured(const Schedule& s, const MeasuredCosts& m, const MeasuredStep& r);

}  // namespace fp8pipe::parallel::sim
