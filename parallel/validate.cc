// validate_schedule: a global-step simulation of all ranks' instruction lists that applies every
// rule of validate.h as it goes and, on the first violation, reports it with a step x rank grid.
#include "parallel/validate.h"

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

namespace fp8pipe::parallel {
namespace {

constexpr int kGridRowsBefore = 16;  // grid rows shown above the failing step

// One unit of work: (stream, micro-batch, stage).
struct Key {
  int stream, mb, stage;
  auto operator<=>(const Key&) const = default;
};

struct Posted {
  int step, rank;
  bool received = false;
};

struct Done {
  int step, rank;
  bool defer_w = false;
};

std::string describe(const Schedule& s, const Key& k) {
  return fmt::format("mb={} dir={} stage={}", k.mb, s.dir_of(k.stream, k.stage), k.stage);
}

class Checker {
 public:
  explicit Checker(const Schedule& s) : s_(s), pc_(s.ranks, 0) {}
  Status run();

 private:
  Key key(int dir, int mb, int stage) const { return {s_.stream_of(dir), mb, stage}; }
  std::string check_unit(int rank, int mb, int dir, int stage) const;
  std::string check_shape(int rank, const Instr& in) const;
  bool ready(int rank, const Instr& in, int step) const;
  std::string apply(int rank, const Instr& in, int step);
  std::string apply_f(int rank, const Key& k, int step);
  std::string apply_b(int rank, const Key& k, bool defer_w, int step);
  std::string apply_comm(int rank, const Instr& in, int step);
  Status final_checks() const;
  Status fail(int row, int rank, const std::string& why) const;
  Status deadlock(int step);

  const Schedule& s_;
  std::vector<size_t> pc_;
  std::vector<std::vector<std::string>> grid_;  // [step][rank] labels of executed instructions
  std::map<Key, Done> f_, b_, w_;
  std::map<Transfer, Posted> posted_;
};

std::string Checker::check_unit(int rank, int mb, int dir, int stage) const {
  if (mb < 0 || mb >= s_.mb_per_stream()) {
    return fmt::format("micro-batch {} out of range [0, {})", mb, s_.mb_per_stream());
  }
  if (stage < 0 || stage >= s_.stages()) {
    return fmt::format("stage {} out of range [0, {})", stage, s_.stages());
  }
  if (dir < 0 || dir >= 2 || dir != s_.dir_of(s_.stream_of(dir), stage)) {
    return fmt::format("dir {} is not valid for stage {} of {}", dir, stage,
                       schedule_kind_name(s_.kind));
  }
  if (s_.rank_of(dir, stage) != rank) {
    return fmt::format("stage {} of dir {} lives on rank {}, not on rank {}", stage, dir,
                       s_.rank_of(dir, stage), rank);
  }
  return {};
}

std::string Checker::check_shape(int rank, const Instr& in) const {
  std::string why = check_unit(rank, in.mb, in.dir, in.stage);
  if (why.empty() && in.op == Op::kFB) why = check_unit(rank, in.mb_b, in.dir_b, in.stage_b);
  if (!why.empty() || !in.is_comm()) return why;
  const bool toward_next = in.op == Op::kSendAct || in.op == Op::kRecvGrad;
  const int other = in.stage + (toward_next ? 1 : -1);
  if (other < 0 || other >= s_.stages()) {
    return fmt::format("stage {} has no {} stage to talk to", in.stage,
                       toward_next ? "next" : "previous");
  }
  const int peer = s_.rank_of(in.dir, other);
  if (peer == rank) return fmt::format("stage {} is on this rank: no transfer needed", other);
  if (in.peer != peer) {
    return fmt::format("peer is rank {} but stage {} lives on rank {}", in.peer, other, peer);
  }
  return {};
}

bool Checker::ready(int rank, const Instr& in, int step) const {
  if (in.op != Op::kRecvAct && in.op != Op::kRecvGrad) return true;
  auto it = posted_.find(transfer_of(s_, rank, in));
  return it != posted_.end() && it->second.step < step && !it->second.received;
}

std::string Checker::apply_f(int rank, const Key& k, int step) {
  const std::string what = describe(s_, k);
  if (f_.count(k)) return fmt::format("second F of {}", what);
  if (k.stage > 0) {
    const Key prev{k.stream, k.mb, k.stage - 1};
    auto it = f_.find(prev);
    if (it == f_.end() || it->second.step >= step) {
      return fmt::format("F of {} before the F of its previous stage", what);
    }
    auto msg = posted_.find({false, it->second.rank, rank, k.stream, k.mb, k.stage - 1});
    if (it->second.rank != rank && (msg == posted_.end() || !msg->second.received)) {
      return fmt::format("F of {} without receiving its activation from rank {}", what,
                         it->second.rank);
    }
  }
  f_[k] = {step, rank};
  return {};
}

std::string Checker::apply_b(int rank, const Key& k, bool defer_w, int step) {
  const std::string what = describe(s_, k);
  if (b_.count(k)) return fmt::format("second B of {}", what);
  auto f = f_.find(k);
  if (f == f_.end() || f->second.step >= step) return fmt::format("B of {} before its F", what);
  if (k.stage + 1 < s_.stages()) {
    const Key next{k.stream, k.mb, k.stage + 1};
    auto it = b_.find(next);
    if (it == b_.end() || it->second.step >= step) {
      return fmt::format("B of {} before the B of its next stage", what);
    }
    auto msg = posted_.find({true, it->second.rank, rank, k.stream, k.mb, k.stage + 1});
    if (it->second.rank != rank && (msg == posted_.end() || !msg->second.received)) {
      return fmt::format("B of {} without receiving its gradient from rank {}", what,
                         it->second.rank);
    }
  }
  b_[k] = {step, rank, defer_w};
  return {};
}

std::string Checker::apply_comm(int rank, const Instr& in, int step) {
  const Transfer t = transfer_of(s_, rank, in);
  if (in.op == Op::kRecvAct || in.op == Op::kRecvGrad) {
    posted_[t].received = true;
    return {};
  }
  const Key k{t.stream, t.mb, t.src_stage};
  const auto& produced = t.grad ? b_ : f_;
  auto it = produced.find(k);
  if (it == produced.end() || it->second.rank != rank) {
    return fmt::format("sends the {} of {} before this rank computed it",
                       t.grad ? "gradient" : "activation", describe(s_, k));
  }
  if (posted_.count(t)) return fmt::format("second send of {}", describe(s_, k));
  posted_[t] = {step, rank};
  return {};
}

std::string Checker::apply(int rank, const Instr& in, int step) {
  switch (in.op) {
    case Op::kF:
      return apply_f(rank, key(in.dir, in.mb, in.stage), step);
    case Op::kB:
      return apply_b(rank, key(in.dir, in.mb, in.stage), in.defer_w, step);
    case Op::kFB: {
      std::string why = apply_f(rank, key(in.dir, in.mb, in.stage), step);
      return why.empty() ? apply_b(rank, key(in.dir_b, in.mb_b, in.stage_b), false, step) : why;
    }
    case Op::kW: {
      const Key k = key(in.dir, in.mb, in.stage);
      auto b = b_.find(k);
      if (w_.count(k)) return fmt::format("second W of {}", describe(s_, k));
      if (b == b_.end() || b->second.step >= step) {
        return fmt::format("W of {} before its B", describe(s_, k));
      }
      if (!b->second.defer_w) {
        return fmt::format("W of {} whose B already computed the weight gradient", describe(s_, k));
      }
      w_[k] = {step, rank};
      return {};
    }
    default:
      return apply_comm(rank, in, step);
  }
}

Status Checker::run() {
  const auto done = [&](int r) { return pc_[r] >= s_.rank_instrs[r].size(); };
  for (int step = 0;; ++step) {
    bool all_done = true, moved = false;
    grid_.emplace_back(s_.ranks);
    for (int r = 0; r < s_.ranks; ++r) {
      if (done(r)) continue;
      all_done = false;
      const Instr& in = s_.rank_instrs[r][pc_[r]];
      std::string why = check_shape(r, in);
      if (why.empty() && !ready(r, in, step)) continue;
      grid_[step][r] = instr_label(in);
      if (why.empty()) why = apply(r, in, step);
      if (!why.empty())
        return fail(step, r, fmt::format("rank {} instruction #{}: {}", r, pc_[r], why));
      ++pc_[r];
      moved = true;
    }
    if (all_done) {
      grid_.pop_back();
      return final_checks();
    }
    if (!moved) return deadlock(step);
  }
}

Status Checker::final_checks() const {
  for (int st = 0; st < s_.streams(); ++st) {
    for (int mb = 0; mb < s_.mb_per_stream(); ++mb) {
      for (int stage = 0; stage < s_.stages(); ++stage) {
        const Key k{st, mb, stage};
        const int rank = s_.rank_of(s_.dir_of(st, stage), stage);
        const char* missing = !f_.count(k) ? "F" : !b_.count(k) ? "B" : nullptr;
        if (!missing && b_.at(k).defer_w && !w_.count(k)) missing = "W";
        if (missing) {
          return fail(
              -1, -1,
              fmt::format("no {} of {} (expected on rank {})", missing, describe(s_, k), rank));
        }
      }
    }
  }
  for (const auto& [t, p] : posted_) {
    if (!p.received) {
      return fail(p.step, p.rank,
                  fmt::format("rank {} sends to rank {} the {} of {}, which is never received",
                              t.src, t.dst, t.grad ? "gradient" : "activation",
                              describe(s_, {t.stream, t.mb, t.src_stage})));
    }
  }
  return Status::Ok();
}

// The grid: rows [first, last] of grid_ (plus `extra`, a last row of its own), cell (row, rank)
// marked. Columns are as wide as their widest cell.
std::string format_grid(const std::vector<std::vector<std::string>>& rows, int first, int ranks,
                        const std::vector<std::string>& row_names) {
  std::vector<size_t> width(ranks, 6);
  for (const auto& row : rows) {
    for (int r = 0; r < ranks; ++r) width[r] = std::max(width[r], row[r].size());
  }
  const auto line = [&](const std::string& name, auto cell) {
    std::string l = fmt::format("{:>7} |", name);
    for (int r = 0; r < ranks; ++r) l += fmt::format(" {:<{}}", cell(r), width[r]);
    return l.erase(l.find_last_not_of(' ') + 1) + "\n";
  };
  std::string out = line("step", [](int r) { return fmt::format("rank {}", r); });
  for (size_t i = 0; i < rows.size(); ++i) {
    const std::string name = i < row_names.size() ? row_names[i] : std::to_string(first + i);
    out += line(name, [&](int r) { return rows[i][r].empty() ? std::string(".") : rows[i][r]; });
  }
  return out;
}

Status Checker::fail(int row, int rank, const std::string& why) const {
  const int last = row >= 0 ? row : static_cast<int>(grid_.size()) - 1;
  const int first = std::max(0, last - kGridRowsBefore);
  std::vector<std::vector<std::string>> rows(grid_.begin() + first, grid_.begin() + last + 1);
  if (row >= 0 && rank >= 0) rows.back()[rank] = "*" + rows.back()[rank] + "*";
  std::string msg = fmt::format("{} {}x{} schedule is invalid: {}\n", schedule_kind_name(s_.kind),
                                s_.ranks, s_.microbatches, why);
  if (first > 0) msg += fmt::format("(steps 0..{} not shown)\n", first - 1);
  return FP8_INVALID("{}{}", msg, format_grid(rows, first, s_.ranks, {}));
}

Status Checker::deadlock(int step) {
  grid_.pop_back();  // the step in which nothing moved
  std::vector<std::string> blocked(s_.ranks, "done");
  std::string waits;
  for (int r = 0; r < s_.ranks; ++r) {
    if (pc_[r] >= s_.rank_instrs[r].size()) continue;
    const Instr& in = s_.rank_instrs[r][pc_[r]];
    blocked[r] = "*" + instr_label(in) + "*";
    waits += fmt::format("\n  rank {} waits at instruction #{} {} (from rank {})", r, pc_[r],
                         instr_label(in), in.peer);
  }
  const int first = std::max(0, step - kGridRowsBefore);
  std::vector<std::vector<std::string>> rows(grid_.begin() + first, grid_.end());
  rows.push_back(blocked);
  std::vector<std::string> names;
  for (int i = first; i < step; ++i) names.push_back(std::to_string(i));
  names.push_back("blocked");
  return FP8_INVALID("{} {}x{} schedule deadlocks at step {}: no rank can move{}\n{}",
                     schedule_kind_name(s_.kind), s_.ranks, s_.microbatches, step, waits,
                     format_grid(rows, first, s_.ranks, names));
}

}  // namespace

Status validate_schedule(const Schedule& s) {
  if (static_cast<int>(s.rank_instrs.size()) != s.ranks) {
    return FP8_INVALID("schedule has {} instruction lists for {} ranks", s.rank_instrs.size(),
                       s.ranks);
  }
  return Checker(s).run();
}

}  // namespace fp8pipe::parallel
