// Pipeline schedules as data (DESIGN.md §5, STYLE.md 1): make_schedule() is a pure function from
// (kind, pipeline ranks, micro-batches) to every rank's ordered instruction list — compute ops and
// the point-to-point sends/receives between them. The executor runs these lists through a table of
// handlers, the simulator runs the same lists with costs, and validate_schedule() checks them.
//
// Placement (which stages a rank holds; `stage` counts along one micro-batch's path):
//   1f1b, zb1p  one stream of M micro-batches through PP stages; rank r holds stage r.
//   dualpipe    two streams (dir 0 enters at rank 0, dir 1 at rank PP-1) of M/2 micro-batches each,
//               PP stages per stream; rank r holds stage r of dir 0 and stage PP-1-r of dir 1,
//               i.e. model stages r and PP-1-r (2x parameters per rank).
//   dualpipev   one stream of M micro-batches through 2·PP stages folded into a V; rank r holds
//               stage r (leg dir=0, going down) and stage 2·PP-1-r (leg dir=1, coming back up);
//               the turn (stage PP-1 -> PP) stays on rank PP-1 and needs no send.
// In every kind `dir` is also the index of the rank's local model chunk that runs the op.
// `PP` is the number of pipeline RANKS (config parallel.pp, CLI --stages), not of stages.
//
// Issue-order semantics (what the executor must honour): SENDs are asynchronous (post and go on;
// the buffer stays alive until the send completes); a RECV blocks until its data has arrived.
// Every RECV sits right before the compute that needs it, or where DeepSeek's implementation
// waits for it; every SEND right after the compute that produced it, or where DeepSeek posts it.
// Over NCCL (blocking sends) the executor posts them in matched groups instead (p2p_plan.h),
// derived from these lists: the same messages, each receive complete where it stands here.
//
// DualPipe / DualPipeV reproduce deepseek-ai/DualPipe (dualpipe.py / dualpipev.py, commit
// 3da1bbea) op for op, sends and receives included; tests/parallel/golden/ holds traces of that
// code. ZB1P is ZB-H1 (Qi et al. 2023): 1F1B's order with B split into B (input gradient) and W,
// rank r keeping r W's pending so that W fills the cool-down bubble; peak memory as 1F1B's.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace fp8pipe::parallel {

enum class ScheduleKind { k1F1B, kZB1P, kDualPipe, kDualPipeV };

// "1f1b", "zb1p", "dualpipe", "dualpipev".
const char* schedule_kind_name(ScheduleKind k);
Result<ScheduleKind> parse_schedule_kind(std::string_view name);

enum class Op {
  kF,         // forward of (mb, dir, stage)
  kB,         // backward: full, or input-gradient only when defer_w (its W comes later)
  kW,         // weight gradient of a deferred B
  kFB,        // overlapped pair: forward (mb, dir, stage) + full backward (mb_b, dir_b, stage_b)
  kSendAct,   // activation of (mb, dir, stage) -> peer, which runs stage+1
  kRecvAct,   // activation for (mb, dir, stage) <- peer, which ran stage-1
  kSendGrad,  // input gradient of (mb, dir, stage) -> peer, which runs stage-1
  kRecvGrad,  // output gradient for (mb, dir, stage) <- peer, which ran stage+1
};

struct Instr {
  Op op = Op::kF;
  int mb = 0;     // micro-batch index within its stream
  int dir = 0;    // dualpipe: direction; dualpipev: leg; else 0. Also the local model chunk.
  int stage = 0;  // stage index along the stream (comm ops: the LOCAL stage of the data)
  int mb_b = 0, dir_b = 0, stage_b = 0;  // kFB only: the backward half
  int peer = -1;                         // comm ops only: the other pipeline rank
  bool defer_w = false;                  // kB only: input gradient now, W later

  bool is_comm() const { return op >= Op::kSendAct; }
  bool operator==(const Instr&) const = default;
};

struct Schedule {
  ScheduleKind kind = ScheduleKind::k1F1B;
  int ranks = 0;                                // pipeline ranks
  int microbatches = 0;                         // as requested (dualpipe: both directions together)
  std::vector<std::vector<Instr>> rank_instrs;  // [rank] -> instructions in issue order

  int streams() const { return kind == ScheduleKind::kDualPipe ? 2 : 1; }
  int mb_per_stream() const { return microbatches / streams(); }
  int stages() const { return kind == ScheduleKind::kDualPipeV ? 2 * ranks : ranks; }
  int stream_of(int dir) const { return kind == ScheduleKind::kDualPipe ? dir : 0; }
  // The dir an op of `stream` at `stage` carries (dualpipev: the leg).
  int dir_of(int stream, int stage) const;
  // The rank that holds `stage` of the stream of `dir`.
  int rank_of(int dir, int stage) const;
};

// The published validity rules, with the rule and the values in the message:
//   all: ranks >= 1, microbatches >= 1;  1f1b, zb1p: microbatches >= ranks;
//   dualpipe (dualpipe.py's asserts): ranks even; microbatches even and >= 2·ranks;
//   dualpipev (dualpipev.py's assert): microbatches >= 2·ranks.
Status check_schedule_request(ScheduleKind kind, int ranks, int microbatches);

Result<Schedule> make_schedule(ScheduleKind kind, int ranks, int microbatches);

// The message a comm instruction sends or waits for, named by the SENDER's unit of work: on rank
// r, RECV_ACT of (mb, stage) matches the peer's SEND_ACT of (mb, stage-1), RECV_GRAD of (mb, stage)
// the peer's SEND_GRAD of (mb, stage+1). Executors can derive message tags from it.
struct Transfer {
  bool grad = false;  // activation (forward) or gradient (backward)
  int src = 0, dst = 0;
  int stream = 0, mb = 0, src_stage = 0;
  auto operator<=>(const Transfer&) const = default;
};
// Requires in.is_comm().
Transfer transfer_of(const Schedule& s, int rank, const Instr& in);

// Short cell label for grids: F3d0, B3d1, W3d0, FB7d0,3d1, S>a3d0, R<g3d1.
std::string instr_label(const Instr& in);

}  // namespace fp8pipe::parallel
