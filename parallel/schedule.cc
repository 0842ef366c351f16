// Schedule generators: 1F1B, ZB-H1 and DeepSeek's DualPipe / DualPipeV, each a short list of
// phases over one Emitter that numbers micro-batches and places sends/receives the same way for
// every kind. The DualPipe phases follow dualpipe.py's step() one loop per loop.
#include "parallel/schedule.h"

#include <algorithm>
#include <deque>
#include <utility>

namespace fp8pipe::parallel {

const char* schedule_kind_name(ScheduleKind k) {
  switch (k) {
    case ScheduleKind::k1F1B:
      return "1f1b";
    case ScheduleKind::kZB1P:
      return "zb1p";
    case ScheduleKind::kDualPipe:
      return "dualpipe";
    case ScheduleKind::kDualPipeV:
      return "dualpipev";
  }
  return "?";
}

Result<ScheduleKind> parse_schedule_kind(std::string_view name) {
  for (ScheduleKind k : {ScheduleKind::k1F1B, ScheduleKind::kZB1P, ScheduleKind::kDualPipe,
                         ScheduleKind::kDualPipeV}) {
    if (name == schedule_kind_name(k)) return k;
  }
  return FP8_INVALID("unknown schedule kind '{}' (valid: 1f1b, zb1p, dualpipe, dualpipev)", name);
}

int Schedule::dir_of(int stream, int stage) const {
  if (kind == ScheduleKind::kDualPipe) return stream;
  if (kind == ScheduleKind::kDualPipeV) return stage >= ranks ? 1 : 0;
  return 0;
}

int Schedule::rank_of(int dir, int stage) const {
  if (kind == ScheduleKind::kDualPipe) return dir == 0 ? stage : ranks - 1 - stage;
  if (kind == ScheduleKind::kDualPipeV) return stage < ranks ? stage : 2 * ranks - 1 - stage;
  return stage;
}

Status check_schedule_request(ScheduleKind kind, int ranks, int mbs) {
  const char* name = schedule_kind_name(kind);
  if (ranks < 1 || mbs < 1) {
    return FP8_INVALID(
        "{}: needs stages >= 1 and microbatches >= 1: got stages={}, microbatches={}", name, ranks,
        mbs);
  }
  switch (kind) {
    case ScheduleKind::k1F1B:
    case ScheduleKind::kZB1P:
      if (mbs < ranks) {
        return FP8_INVALID(
            "{}: needs microbatches >= stages (every rank reaches its steady state): got "
            "microbatches={}, stages={}; valid: microbatches >= {}",
            name, mbs, ranks, ranks);
      }
      break;
    case ScheduleKind::kDualPipe:
      if (ranks % 2 != 0) {
        return FP8_INVALID(
            "dualpipe: needs an even number of pipeline ranks (dualpipe.py: num_ranks % 2 == 0): "
            "got stages={}; valid: 2, 4, 6, ...",
            ranks);
      }
      if (mbs % 2 != 0 || mbs < 2 * ranks) {
        return FP8_INVALID(
            "dualpipe: needs an even number of micro-batches, at least 2 x ranks (dualpipe.py: "
            "num_chunks % 2 == 0 and num_chunks >= num_ranks * 2): got microbatches={}, stages={}; "
            "valid: even and >= {}",
            mbs, ranks, 2 * ranks);
      }
      break;
    case ScheduleKind::kDualPipeV:
      if (mbs < 2 * ranks) {
        return FP8_INVALID(
            "dualpipev: needs at least 2 x ranks micro-batches (dualpipev.py: num_chunks >= "
            "num_ranks * 2): got microbatches={}, stages={}; valid: microbatches >= {}",
            mbs, ranks, 2 * ranks);
      }
      break;
  }
  return Status::Ok();
}

namespace {

// Builds one rank's list. Per local chunk (dir) it counts the forwards, backwards, sends and
// receives issued so far (micro-batches flow through a chunk in order, so the count is the
// micro-batch), and queues deferred W's first in, first out. A send/receive is emitted only when
// the neighbouring stage lives on another rank. `phase` is the rank-relative chunk of DeepSeek's
// step(): dir = phase ^ flip, flip = (dualpipe and rank in the second half).
class Emitter {
 public:
  Emitter(const Schedule& s, int rank, bool flip) : s_(s), rank_(rank), flip_(flip) {}
  std::vector<Instr> take() { return std::move(out_); }
  bool w_pending() const { return !w_.empty(); }

  void forward(int phase, bool recv = true, bool send = true) {
    if (recv) recv_forward(phase);
    const int d = dir(phase);
    out_.push_back({.op = Op::kF, .mb = n_[d].f++, .dir = d, .stage = stage(d)});
    if (send) send_forward(phase);
  }
  void backward(int phase, bool defer_w = false, bool recv = true, bool send = true) {
    if (recv) recv_backward(phase);
    const int d = dir(phase);
    out_.push_back(
        {.op = Op::kB, .mb = n_[d].b++, .dir = d, .stage = stage(d), .defer_w = defer_w});
    if (defer_w) w_.push_back({.op = Op::kW, .mb = out_.back().mb, .dir = d, .stage = stage(d)});
    if (send) send_backward(phase);
  }
  void forward_backward(int p0, int p1, bool recv0 = true) {
    if (recv0) recv_forward(p0);
    recv_backward(p1);
    const int d0 = dir(p0), d1 = dir(p1);
    out_.push_back({.op = Op::kFB,
                    .mb = n_[d0].f++,
                    .dir = d0,
                    .stage = stage(d0),
                    .mb_b = n_[d1].b++,
                    .dir_b = d1,
                    .stage_b = stage(d1)});
    send_forward(p0);
    send_backward(p1);
  }
  void weight() {
    out_.push_back(w_.front());
    w_.pop_front();
  }
  void recv_forward(int phase) { comm(Op::kRecvAct, dir(phase), -1, n_[dir(phase)].rf); }
  void send_forward(int phase) { comm(Op::kSendAct, dir(phase), +1, n_[dir(phase)].sf); }
  void recv_backward(int phase) { comm(Op::kRecvGrad, dir(phase), +1, n_[dir(phase)].rb); }
  void send_backward(int phase) { comm(Op::kSendGrad, dir(phase), -1, n_[dir(phase)].sb); }

 private:
  int dir(int phase) const { return phase ^ (flip_ ? 1 : 0); }
  int stage(int d) const {
    if (s_.kind == ScheduleKind::kDualPipe && d == 1) return s_.ranks - 1 - rank_;
    if (s_.kind == ScheduleKind::kDualPipeV && d == 1) return 2 * s_.ranks - 1 - rank_;
    return rank_;
  }
  // A transfer with the neighbouring stage (step -1: previous, +1: next), if it is remote.
  void comm(Op op, int d, int step, int& counter) {
    const int s = stage(d), other = s + step;
    if (other < 0 || other >= s_.stages()) return;
    const int peer = s_.rank_of(d, other);
    if (peer == rank_) return;
    out_.push_back({.op = op, .mb = counter++, .dir = d, .stage = s, .peer = peer});
  }

  struct Counts {
    int f = 0, b = 0, sf = 0, sb = 0, rf = 0, rb = 0;
  };
  const Schedule& s_;
  int rank_;
  bool flip_;
  Counts n_[2];
  std::deque<Instr> w_;
  std::vector<Instr> out_;
};

// 1F1B (zb = false) and ZB-H1 (zb = true): warm-up forwards, then one forward and one backward
// per step, then the remaining backwards. ZB-H1 splits each backward; rank r keeps r W's pending
// (rank r holds PP-1-r warm-up activations, so its peak stays PP, 1F1B's peak) and runs them in
// the cool-down, where 1F1B's bubble was.
std::vector<Instr> one_f_one_b(const Schedule& s, int r, bool zb) {
  Emitter e(s, r, false);
  const int m = s.microbatches, warm = std::min(s.ranks - 1 - r, m);
  for (int i = 0; i < warm; ++i) e.forward(0);
  for (int i = warm; i < m; ++i) {
    e.forward(0);
    e.backward(0, zb);
    if (zb && i - warm >= r) e.weight();
  }
  for (int i = 0; i < warm; ++i) {
    e.backward(0, zb);
    if (zb) e.weight();
  }
  while (e.w_pending()) e.weight();
  return e.take();
}

// DualPipe(V) phase arguments of one rank: n = ranks per half (dualpipe) or ranks (dualpipev);
// h = the rank's distance from the nearer end (dualpipe) or the rank (dualpipev); m = micro-batches
// per stream; turn = where the two chunks meet (dualpipe: the middle ranks; dualpipev: the last).
struct DualArgs {
  int n, h, m;
  bool turn;
};

// Steps 1-3: nF0, nF0F1, nB1W1F1.
void dual_warmup(Emitter& e, const DualArgs& a) {
  for (int i = 0; i < (a.n - a.h - 1) * 2; ++i) e.forward(0);
  e.recv_forward(0);
  for (int i = 0; i < a.h + 1; ++i) {
    e.forward(0, /*recv=*/false, /*send=*/a.turn);
    e.recv_forward(0);
    e.forward(1, /*recv=*/true, /*send=*/!a.turn || i < a.h);
    if (!a.turn) e.send_forward(0);
  }
  for (int i = 0; i < a.n - a.h - 1; ++i) {
    e.backward(1, /*defer_w=*/true);
    e.recv_forward(1);
    e.weight();
    e.forward(1, /*recv=*/false);
  }
}

// Steps 4-5: nF0B1F1B0 (the first pair not overlapped at the turn, to shrink the bubble), nB1F1B0.
void dual_steady(Emitter& e, const DualArgs& a) {
  for (int i = 0; i < a.m - 2 * a.n + a.h + 1; ++i) {
    if (i == 0 && a.turn) {
      e.forward(0, /*recv=*/false, /*send=*/false);
      e.send_forward(1);
      e.backward(1, /*defer_w=*/false, /*recv=*/true, /*send=*/false);
      e.send_forward(0);
      e.send_backward(1);
    } else {
      e.forward_backward(0, 1, /*recv0=*/i != 0);
    }
    e.forward_backward(1, 0);
  }
  for (int i = 0; i < a.n - a.h - 1; ++i) {
    e.backward(1);
    e.forward_backward(1, 0);
  }
}

// Steps 6-8: nB1B0 (W deferred from the middle on), nWB0, nW.
void dual_cooldown(Emitter& e, const DualArgs& a) {
  bool zb = false;
  for (int i = 0; i < a.h + 1; ++i) {
    if (i == (a.h + 1) / 2 && a.h % 2 == 1) zb = true;
    e.backward(1, zb);
    if (i == (a.h + 1) / 2 && a.h % 2 == 0) zb = true;
    e.backward(0, zb);
  }
  for (int i = 0; i < a.n - a.h - 1; ++i) {
    e.weight();
    e.backward(0, /*defer_w=*/true);
  }
  for (int i = 0; i < a.h + 1; ++i) e.weight();
}

std::vector<Instr> dual_pipe(const Schedule& s, int r) {
  const bool v = s.kind == ScheduleKind::kDualPipeV;
  const int n = v ? s.ranks : s.ranks / 2;
  const int h = v ? r : std::min(r, s.ranks - 1 - r);
  const DualArgs a{n, h, s.mb_per_stream(), v ? r == s.ranks - 1 : h == n - 1};
  Emitter e(s, r, !v && r >= n);
  dual_warmup(e, a);
  dual_steady(e, a);
  dual_cooldown(e, a);
  return e.take();
}

}  // namespace

Result<Schedule> make_schedule(ScheduleKind kind, int ranks, int microbatches) {
  FP8_RETURN_IF_ERROR(check_schedule_request(kind, ranks, microbatches));
  Schedule s{.kind = kind, .ranks = ranks, .microbatches = microbatches, .rank_instrs = {}};
  for (int r = 0; r < ranks; ++r) {
    switch (kind) {
      case ScheduleKind::k1F1B:
      case ScheduleKind::kZB1P:
        s.rank_instrs.push_back(one_f_one_b(s, r, kind == ScheduleKind::kZB1P));
        break;
      case ScheduleKind::kDualPipe:
      case ScheduleKind::kDualPipeV:
        s.rank_instrs.push_back(dual_pipe(s, r));
        break;
    }
  }
  return s;
}

Transfer transfer_of(const Schedule& s, int rank, const Instr& in) {
  const bool send = in.op == Op::kSendAct || in.op == Op::kSendGrad;
  const bool grad = in.op == Op::kSendGrad || in.op == Op::kRecvGrad;
  const int src_stage = send ? in.stage : in.stage + (grad ? 1 : -1);
  return {.grad = grad,
          .src = send ? rank : in.peer,
          .dst = send ? in.peer : rank,
          .stream = s.stream_of(in.dir),
          .mb = in.mb,
          .src_stage = src_stage};
}

std::string instr_label(const Instr& in) {
  switch (in.op) {
    case Op::kF:
      return fmt::format("F{}d{}", in.mb, in.dir);
    case Op::kB:
      return fmt::format("B{}d{}", in.mb, in.dir);
    case Op::kW:
      return fmt::format("W{}d{}", in.mb, in.dir);
    case Op::kFB:
      return fmt::format("FB{}d{},{}d{}", in.mb, in.dir, in.mb_b, in.dir_b);
    case Op::kSendAct:
      return fmt::format("S>a{}d{}", in.mb, in.dir);
    case Op::kRecvAct:
      return fmt::format("R<a{}d{}", in.mb, in.dir);
    case Op::kSendGrad:
      return fmt::format("S>g{}d{}", in.mb, in.dir);
    case Op::kRecvGrad:
      return fmt::format("R<g{}d{}", in.mb, in.dir);
  }
  return "?";
}

}  // namespace fp8pipe::parallel
