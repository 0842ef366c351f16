// ZeRO-1's gradient exchange overlapped with the pipeline (parallel/grad_sync.h GradOverlap),
// checked by a model of NCCL written here independently of the overlap's rounds: every world
// rank (pp x dp) queues its operations in the order it posts them (its matched pipeline groups
// from plan_p2p_groups, each compute instruction's expert all-to-all among its ep group, and each
// set of holders' exchange where GradOverlap starts it, driven through the executor's hooks in
// instruction order) and runs them one after another, as a GPU that runs one NCCL kernel at a
// time; an operation ends when every partner has launched its part (a pipeline message's partner
// is the group holding its other end, a set's exchange or an all-to-all the same one on every
// other member). Every layout must drain every queue, and GradOverlap must
// never start a set before this rank's chunks holding it are final. The same model deadlocks the
// simple rule (a set starts as soon as its chunks are final, as over MPI), which shows that it
// can fail. The weight all-gather overlapped with the next step (GatherOverlap) goes through the
// same model: its sets in GatherOverlap::global_order ahead of the step drain every layout; in
// each rank's chunk order some deadlock.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "parallel/executor.h"
#include "parallel/grad_sync.h"
#include "parallel/p2p_plan.h"
#include "parallel/topology.h"

namespace fp8pipe::parallel {
namespace {

// The sets of holders a rank exchanges, grouped as the trainer's NameSync does: names in order,
// one set per distinct (holder list, stages holding the name), sets in the order of their first
// name. start() records the set.
class RecordingExchange : public SetExchange {
 public:
  RecordingExchange(const std::vector<std::string>& names,
                    const std::map<std::string, std::vector<int>>& holders, const SetKey& key) {
    std::vector<std::string> sorted = names;
    std::sort(sorted.begin(), sorted.end());
    std::map<std::pair<std::vector<int>, std::vector<int>>, size_t> index;
    for (const std::string& n : sorted) {
      auto [it, fresh] = index.try_emplace({holders.at(n), key(n)}, sets_.size());
      if (fresh) sets_.push_back({holders.at(n), {}});
      sets_[it->second].names.push_back(n);
    }
    started_.assign(sets_.size(), false);
  }
  size_t sets() const override { return sets_.size(); }
  const std::vector<int>& set_ranks(size_t k) const override { return sets_[k].ranks; }
  std::vector<std::string> set_names(size_t k) const override { return sets_[k].names; }
  bool started(size_t k) const override { return started_[k]; }
  Status start(size_t k) override {
    started_[k] = true;
    if (on_start) on_start(k);
    return Status::Ok();
  }
  int64_t take_peak_buffer_bytes() override { return 0; }
  std::function<void(size_t)> on_start;

 private:
  struct Set {
    std::vector<int> ranks;
    std::vector<std::string> names;
  };
  std::vector<Set> sets_;
  std::vector<bool> started_;
};

// The weight all-gather's sets as ShardGather and DeviceNameSync cut them (sets of two or more
// holders, keyed by stages); start_gather() records the set.
class RecordingGather : public GatherExchange {
 public:
  RecordingGather(const std::vector<std::string>& names,
                  const std::map<std::string, std::vector<int>>& holders, const SetKey& key) {
    std::vector<std::string> sorted = names;
    std::sort(sorted.begin(), sorted.end());
    std::map<std::pair<std::vector<int>, std::vector<int>>, size_t> index;
    for (const std::string& n : sorted) {
      if (holders.at(n).size() < 2) continue;
      auto [it, fresh] = index.try_emplace({holders.at(n), key(n)}, ranks_.size());
      if (fresh) ranks_.push_back(holders.at(n)), names_.emplace_back();
      names_[it->second].push_back(n);
    }
    on_.assign(ranks_.size(), false);
  }
  size_t sets() const override { return ranks_.size(); }
  std::vector<std::string> set_names(size_t k) const override { return names_[k]; }
  const std::vector<int>& ranks(size_t k) const { return ranks_[k]; }
  Status start_gather(size_t k) override {
    on_[k] = true;
    if (on_start) on_start(k);
    return Status::Ok();
  }
  Status finish_gather(size_t k) override {
    on_[k] = false;
    return Status::Ok();
  }
  bool gathering(size_t k) const override { return on_[k]; }
  int64_t take_peak_buffer_bytes() override { return 0; }
  std::function<void(size_t)> on_start;

 private:
  std::vector<std::vector<int>> ranks_;
  std::vector<std::vector<std::string>> names_;
  std::vector<bool> on_;
};

// One queued operation of a world rank: a pipeline group (its messages), a set's exchange, or
// an expert all-to-all of a compute instruction among the ep group (the dp replicas of one
// pipeline rank that share the experts).
struct Op {
  bool zero = false;                         // a set's exchange or an all-to-all
  std::vector<int> ranks;                    // zero: the members
  std::vector<std::string> names;            // zero: the set's names, or {"a2a", instruction}
  std::vector<std::pair<int, Transfer>> io;  // pipeline: (world peer, message)
};

struct Layout {
  ScheduleKind kind;
  int pp, dp, ep, mbs;
};

std::string name_of(const Layout& l) {
  return std::string(schedule_kind_name(l.kind)) + " pp=" + std::to_string(l.pp) +
         " dp=" + std::to_string(l.dp) + " ep=" + std::to_string(l.ep);
}

// How the last step's weight all-gather is posted before the step (GatherOverlap): not at all,
// in GatherOverlap::global_order, or by this rank's chunks (a negative control).
enum class Gather { kNone, kGlobal, kByChunk };

// Builds every world rank's queue. matched: GradOverlap at the plan's rounds; else as over MPI
// (a set starts when its chunks are final). Returns "" or the first error.
std::string queues_of(const Layout& l, bool matched, std::vector<std::vector<Op>>& queues,
                      int* early, Gather gather = Gather::kNone) {
  auto sched = make_schedule(l.kind, l.pp, l.mbs);
  if (!sched.ok()) return sched.status().to_string();
  const Schedule& s = *sched;
  auto plan = plan_p2p_groups(s, /*early_sends=*/true);
  if (!plan.ok()) return plan.status().to_string();
  auto topo = Topology::create(l.pp, l.dp, l.ep, l.pp * l.dp, 0);
  if (!topo.ok()) return topo.status().to_string();
  // One block per stage; the embedding on the first stage (and on the last for MTP), the head on
  // the last; two routed experts per block, sharded over ep.
  const int stages = l.kind == ScheduleKind::kDualPipeV ? 2 * l.pp : l.pp;
  std::vector<model::ModelPart> parts(stages);
  for (int st = 0; st < stages; ++st) parts[st] = {st, st + 1, st == 0, st == stages - 1};
  std::vector<std::string> names = {"embed.weight", "head.weight"};
  for (int b = 0; b < stages; ++b) {
    names.push_back("layers." + std::to_string(b) + ".attn.wq.weight");
    for (int e = 0; e < 2; ++e)
      names.push_back("layers." + std::to_string(b) + ".ffn.experts." + std::to_string(e) +
                      ".w1.weight");
  }
  std::map<std::string, std::vector<int>> holders;
  for (const auto& n : names) holders[n] = holders_of(n, s, parts, *topo, 2);
  const int world = l.pp * l.dp;
  queues.assign(world, {});
  *early = 0;
  for (int w = 0; w < world; ++w) {
    const int p = topo->coords_of(w).stage, d = topo->coords_of(w).dp_index;
    std::vector<std::string> mine;
    for (const auto& n : names) {
      const auto& h = holders[n];
      if (std::find(h.begin(), h.end(), w) != h.end()) mine.push_back(n);
    }
    RecordingExchange ex(mine, holders,
                         [&](const std::string& n) { return stages_holding(n, parts); });
    ex.on_start = [&, w](size_t k) {
      queues[w].push_back({true, ex.set_ranks(k), ex.set_names(k), {}});
    };
    GradOverlap ov(
        ex, w,
        [&](int rank, const std::string& n) {
          return dirs_holding(n, s, parts, topo->coords_of(rank).stage);
        },
        [&](int rank) { return topo->coords_of(rank).stage; });
    ov.begin(s, matched ? &*plan : nullptr);
    const auto& list = s.rank_instrs[p];
    const int n = static_cast<int>(list.size());
    // The weight all-gather, posted after the last optimizer step: before any of this step's
    // operations. Its waits (GatherOverlap::chunk_first) hold only the host, behind them.
    RecordingGather g(mine, holders,
                      [&](const std::string& n) { return stages_holding(n, parts); });
    std::vector<std::vector<int>> gdirs(g.sets());
    for (size_t k = 0; k < g.sets(); ++k)
      gdirs[k] = dirs_holding(g.set_names(k).front(), s, parts, p);
    std::vector<size_t> order = GatherOverlap::global_order(g, parts);
    if (gather == Gather::kByChunk) {  // this rank's chunk order: dir 0's sets, then dir 1's
      auto dir = [&](size_t k) { return *std::min_element(gdirs[k].begin(), gdirs[k].end()); };
      std::stable_sort(order.begin(), order.end(),
                       [&](size_t a, size_t b) { return dir(a) < dir(b); });
    }
    g.on_start = [&, w](size_t k) {
      queues[w].push_back({true, g.ranks(k), g.set_names(k), {}});
      queues[w].back().names.insert(queues[w].back().names.begin(), "gather");
    };
    GatherOverlap gov(g, gdirs, order, {});
    if (gather != Gather::kNone) {
      Status st = gov.start();
      if (!st.ok()) return st.to_string();
    }
    std::vector<int> last(chunks_per_rank(s));
    for (int dir = 0; dir < chunks_per_rank(s); ++dir)
      last[dir] = PipelineExecutor::last_grad_instr(s, p, dir);
    size_t next = 0;
    auto point = [&](int at) -> Status {  // the plan's groups at `at`, as the executor posts them
      if (next >= plan->ranks[p].size() || plan->ranks[p][next].at != at) return Status::Ok();
      for (const P2pGroup& g : plan->ranks[p][next++].groups) {
        if (matched) FP8_RETURN_IF_ERROR(ov.before_round(g.round, true));
        Op op;
        for (int i : g.ops)
          op.io.push_back({topo->rank_of(list[i].peer, d), transfer_of(s, p, list[i])});
        queues[w].push_back(std::move(op));
      }
      return Status::Ok();
    };
    // The ep group: the ranks of this pipeline rank and ep group (l.ep of them), one all-to-all
    // per compute instruction (a real one has several, in the same order on every member).
    std::vector<int> ep_group;
    for (int m = 0; m < world; ++m) {
      const auto c = topo->coords_of(m);
      if (c.stage == p && c.ep_group == topo->coords_of(w).ep_group) ep_group.push_back(m);
    }
    std::vector<bool> used(chunks_per_rank(s), false);
    for (int i = 0; i < n; ++i) {
      Status st = point(i);
      if (!list[i].is_comm()) {  // the executor's chunk_first hook
        for (int dir :
             {list[i].dir, list[i].op == decltype(list[i].op)::kFB ? list[i].dir_b : -1}) {
          if (dir < 0 || used[dir] || !st.ok()) continue;
          used[dir] = true;
          st = gov.chunk_first(dir, i > 0);
        }
      }
      if (!list[i].is_comm() && ep_group.size() > 1)
        queues[w].push_back({true, ep_group, {"a2a", std::to_string(i)}, {}});
      for (int dir = 0; dir < chunks_per_rank(s) && st.ok(); ++dir)
        if (last[dir] == i) st = ov.chunk_final(dir, true);
      if (!st.ok()) return name_of(l) + " rank " + std::to_string(w) + ": " + st.to_string();
    }
    Status st = point(n);
    if (st.ok()) st = ov.end();
    if (!st.ok()) return name_of(l) + " rank " + std::to_string(w) + ": " + st.to_string();
    // Every set of the all-gather ended at its chunk's first use, none left for finish().
    if (gather != Gather::kNone && (gov.pending() || gov.at_first_use() != int(g.sets())))
      return name_of(l) + " rank " + std::to_string(w) + ": a weight set not used by the step";
    *early += ov.started();
  }
  return "";
}

// Runs the queues one operation at a time per rank: "" when all drain, else where they stick.
std::string run_model(const std::vector<std::vector<Op>>& queues) {
  const int R = static_cast<int>(queues.size());
  // Partners: a message's other end (the k-th send of a pair meets the k-th receive, matched by
  // the message itself here), a set's exchange on each other member (the sets a pair shares go
  // in one order on both, else that is a mismatch too).
  std::map<std::tuple<int, int, Transfer>, int> at;  // (rank, peer, message) -> queue index
  std::map<std::pair<int, std::vector<std::string>>, int> set_at;
  for (int r = 0; r < R; ++r) {
    for (int k = 0; k < static_cast<int>(queues[r].size()); ++k) {
      const Op& op = queues[r][k];
      if (op.zero && !set_at.try_emplace({r, op.names}, k).second) return "an operation twice";
      for (const auto& [peer, t] : op.io) at[{r, peer, t}] = k;
    }
  }
  std::vector<std::vector<std::vector<std::pair<int, int>>>> partners(R);
  for (int r = 0; r < R; ++r) {
    partners[r].resize(queues[r].size());
    for (int k = 0; k < static_cast<int>(queues[r].size()); ++k) {
      const Op& op = queues[r][k];
      for (int m : op.ranks) {
        if (m == r) continue;
        auto it = set_at.find({m, op.names});
        if (it == set_at.end()) return "rank " + std::to_string(m) + " never posts " + op.names[0];
        partners[r][k].push_back({m, it->second});
      }
      for (const auto& [peer, t] : op.io) {
        auto it = at.find({peer, r, t});
        if (it == at.end()) return "a message without its other end";
        partners[r][k].push_back({peer, it->second});
      }
    }
  }
  std::vector<int> cur(R, 0);
  for (bool moved = true; moved;) {
    moved = false;
    for (int r = 0; r < R; ++r) {
      if (cur[r] == static_cast<int>(queues[r].size())) continue;
      bool ok = true;
      for (auto [m, k] : partners[r][cur[r]]) ok &= cur[m] >= k;
      if (ok) ++cur[r], moved = true;
    }
  }
  std::string stuck;
  for (int r = 0; r < R; ++r) {
    if (cur[r] < static_cast<int>(queues[r].size())) {
      stuck += " rank " + std::to_string(r) + " at " + std::to_string(cur[r]) + "/" +
               std::to_string(queues[r].size()) + (queues[r][cur[r]].zero ? " (a set)" : "") + ";";
    }
  }
  return stuck.empty() ? "" : "deadlock:" + stuck;
}

TEST(GradOverlap, MatchedRoundsNeverDeadlockTheNcclModel) {
  int layouts = 0, early_total = 0;
  for (ScheduleKind kind : {ScheduleKind::k1F1B, ScheduleKind::kZB1P, ScheduleKind::kDualPipe,
                            ScheduleKind::kDualPipeV}) {
    for (int pp : {2, 4, 8}) {
      for (auto [dp, ep] : {std::pair{1, 1}, {2, 1}, {2, 2}}) {
        const bool dual = kind == ScheduleKind::kDualPipe || kind == ScheduleKind::kDualPipeV;
        for (int mbs : {dual ? 2 * pp : pp, dual ? 4 * pp : 2 * pp + 1}) {
          const Layout l{kind, pp, dp, ep, mbs};
          std::vector<std::vector<Op>> q;
          int early = 0;
          ASSERT_EQ(queues_of(l, /*matched=*/true, q, &early), "") << name_of(l);
          EXPECT_EQ(run_model(q), "") << name_of(l) << " mbs=" << mbs;
          // Every set once on each of its members; the all-to-alls where ep > 1.
          int a2a = 0;
          for (int r = 0; r < static_cast<int>(q.size()); ++r) {
            for (const Op& op : q[r]) {
              if (op.zero) {
                EXPECT_TRUE(std::count(op.ranks.begin(), op.ranks.end(), r) == 1);
              }
              a2a += op.zero && op.names[0] == "a2a";
            }
          }
          EXPECT_EQ(a2a > 0, ep > 1) << name_of(l);
          early_total += early;
          ++layouts;
        }
      }
    }
  }
  EXPECT_EQ(layouts, 72);
  EXPECT_GT(early_total, 0);  // some sets do start before the end of the list
}

// optim.overlap_param_gather: the last step's all-gather posted before the step in
// GatherOverlap::global_order, then the step as above, drains every layout. Posted by each
// rank's own chunk order instead (its first chunk's sets, then its second's), some deadlock:
// DualPipe's rank s holds stage s as its first chunk and stage pp-1-s as its second, its mirror
// rank pp-1-s the same two stages the other way round, and they share both sets.
TEST(GatherOverlap, GlobalOrderNeverDeadlocksTheNcclModel) {
  int layouts = 0, gathers = 0, deadlocks = 0;
  for (ScheduleKind kind : {ScheduleKind::k1F1B, ScheduleKind::kZB1P, ScheduleKind::kDualPipe,
                            ScheduleKind::kDualPipeV}) {
    for (int pp : {2, 4, 8}) {
      for (auto [dp, ep] : {std::pair{1, 1}, {2, 1}, {2, 2}}) {
        const bool dual = kind == ScheduleKind::kDualPipe || kind == ScheduleKind::kDualPipeV;
        const Layout l{kind, pp, dp, ep, dual ? 2 * pp : pp};
        std::vector<std::vector<Op>> q;
        int early = 0;
        ASSERT_EQ(queues_of(l, /*matched=*/true, q, &early, Gather::kGlobal), "") << name_of(l);
        EXPECT_EQ(run_model(q), "") << name_of(l);
        for (const auto& ops : q)
          for (const Op& op : ops) gathers += op.zero && op.names[0] == "gather";
        ASSERT_EQ(queues_of(l, /*matched=*/true, q, &early, Gather::kByChunk), "") << name_of(l);
        deadlocks += run_model(q).rfind("deadlock", 0) == 0;
        ++layouts;
      }
    }
  }
  EXPECT_EQ(layouts, 36);
  EXPECT_GT(gathers, 0);
  std::printf(
      "%d layouts drain with the all-gather in the global order; %d deadlock in each "
      "rank's chunk order\n",
      layouts, deadlocks);
  EXPECT_GE(deadlocks, 1);
}

TEST(GradOverlap, StartingWhenFinalDeadlocksTheNcclModel) {
  // 1F1B, pp=2: the last stage's copy of the embedding (MTP) is final long before the first
  // stage's; posted then, it holds that rank's stream until the first stage posts its part at
  // its end, while the first stage waits for the gradients queued behind it.
  int deadlocks = 0;
  for (ScheduleKind kind : {ScheduleKind::k1F1B, ScheduleKind::kDualPipe}) {
    const Layout l{kind, 2, 2, 1, 4};
    std::vector<std::vector<Op>> q;
    int early = 0;
    ASSERT_EQ(queues_of(l, /*matched=*/false, q, &early), "") << name_of(l);
    const std::string r = run_model(q);
    deadlocks += r.rfind("deadlock", 0) == 0;
    // The same layout at matched rounds drains.
    ASSERT_EQ(queues_of(l, /*matched=*/true, q, &early), "") << name_of(l);
    EXPECT_EQ(run_model(q), "") << name_of(l);
  }
  EXPECT_GE(deadlocks, 1);
}

}  // namespace
}  // namespace fp8pipe::parallel
