// plan_p2p_groups: the lock-step run described in p2p_plan.h.
#include "parallel/p2p_plan.h"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <set>

namespace fp8pipe::parallel {
namespace {

bool is_send(const Instr& in) { return in.op == Op::kSendAct || in.op == Op::kSendGrad; }

struct RankRun {
  int pc = 0;                  // next instruction to pass
  int point = 0;               // where the rank stands: the point after its last comm run
  std::vector<int> waiting;    // receives of the comm run before `point`, not issued yet
  std::set<int> posted;        // sends passed, not issued yet
  std::map<int, int> post_at;  // send -> the first point after it
  int n = 0;                   // the list's size
  bool at_end() const { return pc == n && waiting.empty(); }
};

}  // namespace

Result<P2pPlan> plan_p2p_groups(const Schedule& s, bool early_sends) {
  const int R = static_cast<int>(s.rank_instrs.size());
  // Each message's send, by its Transfer (named by the sender, as the receive names it).
  std::map<Transfer, std::pair<int, int>> send_of;
  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < static_cast<int>(s.rank_instrs[r].size()); ++i) {
      const Instr& in = s.rank_instrs[r][i];
      if (!in.is_comm() || !is_send(in)) continue;
      if (!send_of.emplace(transfer_of(s, r, in), std::make_pair(r, i)).second)
        return FP8_INVALID("rank {} instruction {} ({}) sends a message twice", r, i,
                           instr_label(in));
    }
  }
  P2pPlan plan;
  plan.ranks.resize(R);
  std::vector<RankRun> run(R);
  for (int r = 0; r < R; ++r) run[r].n = static_cast<int>(s.rank_instrs[r].size());
  // Moves rank r past its computes and its next run of comm instructions, to the point after it.
  auto advance = [&](int r) {
    const auto& list = s.rank_instrs[r];
    const int n = static_cast<int>(list.size());
    RankRun& st = run[r];
    while (st.pc < n && !list[st.pc].is_comm()) ++st.pc;
    std::vector<int> sends;
    while (st.pc < n && list[st.pc].is_comm()) {
      (is_send(list[st.pc]) ? sends : st.waiting).push_back(st.pc);
      ++st.pc;
    }
    st.point = st.pc;
    for (int i : sends) {
      st.posted.insert(i);
      st.post_at[i] = st.point;
    }
  };
  for (int r = 0; r < R; ++r) advance(r);
  // Where each rank issued its last group (-1: none yet).
  std::vector<int> last_point(R, -1);
  for (int round = 0;; ++round) {
    bool done = true;
    for (const RankRun& st : run) done &= st.at_end() && st.posted.empty();
    if (done) break;
    // This round's ops per rank and point, each with the point its message's send is issued at
    // (the sort key that orders a pair's messages alike on both sides, with the transfer).
    std::vector<std::map<int, std::vector<std::pair<int, int>>>> issue(R);
    bool progress = false;
    for (int r = 0; r < R; ++r) {
      std::vector<int> still;
      for (int i : run[r].waiting) {
        const Instr& in = s.rank_instrs[r][i];
        const auto it = send_of.find(transfer_of(s, r, in));
        if (it == send_of.end())
          return FP8_INVALID("rank {} instruction {} ({}) receives a message nobody sends", r, i,
                             instr_label(in));
        const auto [q, j] = it->second;
        if (run[q].posted.erase(j) == 0) {
          still.push_back(i);
          continue;
        }
        int at = run[q].point;
        const int post = run[q].post_at.at(j);
        if (post != at) {  // the sender has moved on since it posted the send
          if (early_sends && last_point[q] <= post)
            at = post;  // nothing issued since: the send goes in a group of its own there
          else
            ++plan.late_sends;
        }
        issue[r][run[r].point].push_back({at, i});
        issue[q][at].push_back({at, j});
        progress = true;
      }
      run[r].waiting = std::move(still);
    }
    for (int r = 0; r < R; ++r) {
      for (auto& [at, ops] : issue[r]) {
        std::sort(ops.begin(), ops.end(), [&](const auto& a, const auto& b) {
          if (a.first != b.first) return a.first < b.first;
          return transfer_of(s, r, s.rank_instrs[r][a.second]) <
                 transfer_of(s, r, s.rank_instrs[r][b.second]);
        });
        P2pGroup g{round, {}, at != run[r].point};
        for (const auto& op : ops) g.ops.push_back(op.second);
        auto& points = plan.ranks[r];
        if (points.empty() || points.back().at != at) points.push_back({at, {}});
        ++plan.groups, plan.early_groups += g.early;
        points.back().groups.push_back(std::move(g));
        last_point[r] = at;
      }
    }
    for (int r = 0; r < R; ++r) {
      const int n = static_cast<int>(s.rank_instrs[r].size());
      if (run[r].waiting.empty() && run[r].pc < n) {
        advance(r);
        progress = true;
      }
    }
    if (!progress) {
      std::string where;
      for (int r = 0; r < R; ++r) {
        where +=
            fmt::format("; rank {} at instruction {} waits for {} receive(s), holds {} send(s)", r,
                        run[r].point, run[r].waiting.size(), run[r].posted.size());
      }
      return FP8_INVALID("{} schedule deadlocks in round {}{}", schedule_kind_name(s.kind), round,
                         where);
    }
    plan.rounds = round + 1;
  }
  return plan;
}

}  // namespace fp8pipe::parallel
