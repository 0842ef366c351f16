// Matched point-to-point groups (parallel/p2p_plan.h), checked by a model of NCCL written here
// independently of the planner: per rank, groups run one after another on its stream; a group
// ends when each of its ops has met its partner in a group that the peer has launched; the k-th
// send from A to B meets B's k-th receive from A (NCCL has no tags), and the two must carry the
// same message. The model also runs the grouping the executor used before the plan (each receive
// issued with the sends posted since the previous one), which deadlocks under DualPipe at pp=2 as
// the CUDA emulation's NCCL showed, and so shows that the model can fail.
#include "parallel/p2p_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "parallel/validate.h"

namespace fp8pipe::parallel {
namespace {

bool is_send(const Instr& in) { return in.op == Op::kSendAct || in.op == Op::kSendGrad; }

using Groups = std::vector<std::vector<std::vector<int>>>;  // [rank][group] -> instruction indices

Groups groups_of(const P2pPlan& p) {
  Groups g(p.ranks.size());
  for (size_t r = 0; r < p.ranks.size(); ++r)
    for (const P2pPoint& pt : p.ranks[r])
      for (const P2pGroup& gr : pt.groups) g[r].push_back(gr.ops);
  return g;
}

// The executor's grouping before the plan: sends join the batch of the next receive it waits on.
Groups eager_groups(const Schedule& s) {
  Groups g(s.rank_instrs.size());
  for (size_t r = 0; r < s.rank_instrs.size(); ++r) {
    std::vector<int> batch;
    for (int i = 0; i < static_cast<int>(s.rank_instrs[r].size()); ++i) {
      const Instr& in = s.rank_instrs[r][i];
      if (!in.is_comm()) continue;
      batch.push_back(i);
      if (!is_send(in)) g[r].push_back(std::move(batch)), batch.clear();
    }
    if (!batch.empty()) g[r].push_back(batch);
  }
  return g;
}

// Runs the NCCL model; "" when every group completes, else what went wrong.
std::string run_nccl_model(const Schedule& s, const Groups& g) {
  const int R = static_cast<int>(s.rank_instrs.size());
  // Pair each op with its partner: per (sender, receiver) in issue order.
  struct Where {
    int rank, group;
  };
  std::map<std::pair<int, int>, std::vector<std::pair<Where, int>>> sends, recvs;
  for (int r = 0; r < R; ++r) {
    for (int k = 0; k < static_cast<int>(g[r].size()); ++k) {
      for (int i : g[r][k]) {
        const Instr& in = s.rank_instrs[r][i];
        if (is_send(in))
          sends[{r, in.peer}].push_back({{r, k}, i});
        else
          recvs[{in.peer, r}].push_back({{r, k}, i});
      }
    }
  }
  // partner_group[r][k]: the (rank, group) of every partner of group k's ops.
  std::vector<std::vector<std::vector<Where>>> partners(R);
  for (int r = 0; r < R; ++r) partners[r].resize(g[r].size());
  for (auto& [pair, ss] : sends) {
    const auto& rr = recvs[pair];
    if (rr.size() != ss.size())
      return "rank " + std::to_string(pair.first) + " sends " + std::to_string(ss.size()) +
             " messages to rank " + std::to_string(pair.second) + ", which receives " +
             std::to_string(rr.size());
    for (size_t k = 0; k < ss.size(); ++k) {
      const auto [ws, is] = ss[k];
      const auto [wr, ir] = rr[k];
      if (transfer_of(s, ws.rank, s.rank_instrs[ws.rank][is]) !=
          transfer_of(s, wr.rank, s.rank_instrs[wr.rank][ir]))
        return "message " + std::to_string(k) + " from rank " + std::to_string(ws.rank) +
               " to rank " + std::to_string(wr.rank) + ": " +
               instr_label(s.rank_instrs[ws.rank][is]) + " meets " +
               instr_label(s.rank_instrs[wr.rank][ir]);
      partners[ws.rank][ws.group].push_back(wr);
      partners[wr.rank][wr.group].push_back(ws);
    }
  }
  std::vector<int> cur(R, 0);  // each rank's launched group (== size: all done)
  for (bool moved = true; moved;) {
    moved = false;
    for (int r = 0; r < R; ++r) {
      if (cur[r] == static_cast<int>(g[r].size())) continue;
      bool ok = true;
      for (const Where& w : partners[r][cur[r]]) ok &= cur[w.rank] >= w.group;
      if (ok) ++cur[r], moved = true;
    }
  }
  std::string stuck;
  for (int r = 0; r < R; ++r) {
    if (cur[r] < static_cast<int>(g[r].size()))
      stuck += " rank " + std::to_string(r) + " at group " + std::to_string(cur[r]) + "/" +
               std::to_string(g[r].size()) + ";";
  }
  return stuck.empty() ? "" : "deadlock:" + stuck;
}

Schedule make(ScheduleKind kind, int ranks, int mbs) {
  auto s = make_schedule(kind, ranks, mbs);
  EXPECT_TRUE(s.ok()) << s.status().to_string();
  return s.ok() ? std::move(s).value() : Schedule{};
}

TEST(P2pPlan, EveryKindAndSizeRunsUnderTheNcclModel) {
  for (ScheduleKind kind : {ScheduleKind::k1F1B, ScheduleKind::kZB1P, ScheduleKind::kDualPipe,
                            ScheduleKind::kDualPipeV}) {
    for (int ranks : {1, 2, 4, 8, 16}) {
      for (int mult : {1, 2, 3}) {
        const bool dual = kind == ScheduleKind::kDualPipe || kind == ScheduleKind::kDualPipeV;
        const int mbs = dual ? 2 * ranks * mult : ranks * mult + 1;
        if (kind == ScheduleKind::kDualPipe && ranks % 2) continue;
        const std::string what = std::string(schedule_kind_name(kind)) + " ranks " +
                                 std::to_string(ranks) + " mbs " + std::to_string(mbs);
        const Schedule s = make(kind, ranks, mbs);
        ASSERT_TRUE(validate_schedule(s).ok()) << what;
        int late_without = 0;
        for (bool early : {false, true}) {
          auto plan = plan_p2p_groups(s, early);
          ASSERT_TRUE(plan.ok()) << what << ": " << plan.status().to_string();
          EXPECT_EQ(run_nccl_model(s, groups_of(*plan)), "") << what;
          // Every comm instruction once; a send after its instruction, a receive completed at the
          // point right after its run of comm instructions (before the compute that needs it).
          for (int r = 0; r < ranks; ++r) {
            const auto& list = s.rank_instrs[r];
            const int n = static_cast<int>(list.size());
            std::vector<int> seen(n, 0);
            int last_round = -1, last_at = -1;
            for (const P2pPoint& pt : plan->ranks[r]) {
              EXPECT_GT(pt.at, last_at) << what << " rank " << r;
              last_at = pt.at;
              EXPECT_TRUE(pt.at == n || !list[pt.at].is_comm()) << what << " rank " << r;
              for (const P2pGroup& gr : pt.groups) {
                // Rounds never go back (two groups share one when a send goes early at one
                // point and the rank's own group of that round at a later one).
                EXPECT_GE(gr.round, last_round) << what << " rank " << r;
                last_round = gr.round;
                EXPECT_FALSE(gr.ops.empty());
                for (int i : gr.ops) {
                  ASSERT_TRUE(i >= 0 && i < n && list[i].is_comm()) << what;
                  ++seen[i];
                  EXPECT_LT(i, pt.at) << what << " rank " << r << " " << instr_label(list[i]);
                  if (!is_send(list[i])) {
                    int next = i;
                    while (next < n && list[next].is_comm()) ++next;
                    EXPECT_EQ(pt.at, next) << what << " rank " << r << " " << instr_label(list[i]);
                  }
                }
              }
            }
            for (int i = 0; i < n; ++i) EXPECT_EQ(seen[i], list[i].is_comm() ? 1 : 0) << what;
          }
          // No send waits for more of its sender's compute with early sends; nor without them
          // under 1F1B and DualPipe, whose reference codes (Megatron's combined send/receive
          // calls, dualpipe.py's batched isend/irecv per step) issue matched groups on NCCL.
          // ZB1P's W-only stretches and DualPipeV's turn leave some late in lock-step.
          if (early || kind == ScheduleKind::k1F1B || kind == ScheduleKind::kDualPipe)
            EXPECT_EQ(plan->late_sends, 0) << what << " early " << early;
          else if (ranks == 8 && mult == 2)
            std::printf("%s: %d late sends of %d rounds without early sends\n", what.c_str(),
                        plan->late_sends, plan->rounds);
          // Early groups (sends only) exactly where they replace late sends.
          int early_groups = 0, groups = 0;
          for (const auto& pts : plan->ranks) {
            for (const P2pPoint& pt : pts) {
              for (const P2pGroup& g : pt.groups) {
                early_groups += g.early, ++groups;
                for (int i : g.ops)
                  if (g.early) EXPECT_TRUE(is_send(s.rank_instrs[&pts - &plan->ranks[0]][i]));
              }
            }
          }
          EXPECT_EQ(plan->groups, groups) << what;  // the counts the CLI reports
          EXPECT_EQ(plan->early_groups, early_groups) << what;
          if (!early) {
            late_without = plan->late_sends;
            EXPECT_EQ(early_groups, 0) << what;
          } else {
            EXPECT_EQ(early_groups > 0, late_without > 0) << what;
          }
        }
      }
    }
  }
}

// The model fails the old grouping where the CUDA emulation's NCCL hung (DualPipe, pp=2), and
// passes it for 1F1B at pp=2, which ran there (launch/device_check.sh train_nccl_vs_mpi).
TEST(P2pPlan, TheModelCatchesTheEagerGroupingDeadlock) {
  EXPECT_EQ(run_nccl_model(make(ScheduleKind::k1F1B, 2, 4),
                           eager_groups(make(ScheduleKind::k1F1B, 2, 4))),
            "");
  const Schedule dp = make(ScheduleKind::kDualPipe, 2, 4);
  EXPECT_NE(run_nccl_model(dp, eager_groups(dp)).find("deadlock"), std::string::npos);
  auto plan = plan_p2p_groups(dp, false);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(run_nccl_model(dp, groups_of(*plan)), "");
}

// A receive whose send never comes, or a wait for data that cannot have been produced yet, is an
// error naming the rank and instruction, not a hang.
TEST(P2pPlan, UnmatchedOrCircularReceivesAreErrors) {
  Schedule s = make(ScheduleKind::k1F1B, 2, 2);
  Schedule lost = s;
  auto& l0 = lost.rank_instrs[0];
  l0.erase(
      std::find_if(l0.begin(), l0.end(), [](const Instr& in) { return in.op == Op::kSendAct; }));
  auto plan = plan_p2p_groups(lost, false);
  ASSERT_FALSE(plan.ok());
  EXPECT_NE(plan.status().to_string().find(
                "rank 1 instruction 0 (R<a0d0) receives a message nobody sends"),
            std::string::npos)
      << plan.status().to_string();
  // Rank 0 waits for the first gradient before it sends the first activation.
  Schedule circular = s;
  auto& c0 = circular.rank_instrs[0];
  auto g =
      std::find_if(c0.begin(), c0.end(), [](const Instr& in) { return in.op == Op::kRecvGrad; });
  const Instr recv = *g;
  c0.erase(g);
  c0.insert(c0.begin(), recv);
  plan = plan_p2p_groups(circular, true);
  ASSERT_FALSE(plan.ok());
  EXPECT_NE(plan.status().to_string().find("1f1b schedule deadlocks in round 0"), std::string::npos)
      << plan.status().to_string();
}

}  // namespace
}  // namespace fp8pipe::parallel
