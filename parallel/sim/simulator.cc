// The step simulator: a sweep over all ranks' instruction lists with a compute and a comm stream
// per rank (sends on comm, receives blocking compute), then the step's DP sync, optimizer step,
// memory per GPU and throughput figures. See simulator.h for the model.
#include "parallel/sim/simulator.h"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <optional>

#include "parallel/executor.h"
#include "parallel/grad_sync.h"
#include "parallel/sim/measured.h"

namespace fp8pipe::parallel::sim {

double OpCosts::op(const Instr& in) const {
  if (model) return op_time(*model, in);
  if (measured) return measured->op(in);
  switch (in.op) {
    case Op::kF:
      return f;
    case Op::kB:
      return in.defer_w ? b_input : b_input + w;
    case Op::kW:
      return w;
    case Op::kFB:
      return fb;
    default:
      return 0;
  }
}

double OpCosts::exposed_comm(const Instr& in) const {
  if (!model) return 0;
  const auto& ch = model->chunks;
  switch (in.op) {
    case Op::kF:
      return ch[in.stage].f.a2a_s;
    case Op::kB:
      return ch[in.stage].b.a2a_s;
    case Op::kFB: {
      const double comm = ch[in.stage].f.a2a_s + ch[in.stage_b].b.a2a_s;
      const double compute =
          ch[in.stage].f.compute_s + ch[in.stage_b].b.compute_s + ch[in.stage_b].w.compute_s;
      return std::max(0.0, comm - compute) + model->cal.fb_exposed_frac * comm;
    }
    default:
      return 0;
  }
}

double OpCosts::overhead(const Instr& in) const {
  return measured ? measured->comm_overhead(in) : 0;
}

double OpCosts::send_bytes(int stage) const {
  return model ? model->chunks[stage].p2p_bytes : p2p_bytes;
}
double OpCosts::send_time(int stage) const {
  if (measured) return 0;
  return model ? send_bytes(stage) / (model->p2p_gbps * 1e9) : send_bytes(stage) / p2p_bytes_per_s;
}
double OpCosts::latency() const {
  if (measured) return measured->p2p_s;
  return model ? model->p2p_latency_s : p2p_latency;
}

namespace {

struct RankState {
  size_t pc = 0;
  double now = 0, comm_free = 0, held = 0, held_bytes = 0;
};

// Activations: + one chunk's worth at F, - at its full B or its W (TR Table 2's accounting);
// a B that defers its W already frees what only the input gradient reads (act_b_bytes: the
// logits), the W the rest.
void track_activations(const Schedule& s, const OpCosts& c, const Instr& in, int r, RankState& st,
                       PipelineResult& out) {
  auto bytes = [&](int stage) { return c.model ? c.model->chunks[stage].act_bytes : 0.0; };
  auto b_bytes = [&](int stage) { return c.model ? c.model->chunks[stage].act_b_bytes : 0.0; };
  auto add = [&](int stage, double sign) {
    st.held += sign;
    st.held_bytes += sign * bytes(stage);
  };
  if (in.op == Op::kF || in.op == Op::kFB) add(in.stage, 1);
  if (in.op == Op::kB && !in.defer_w) add(in.stage, -1);
  if (in.op == Op::kB && in.defer_w) st.held_bytes -= b_bytes(in.stage);
  if (in.op == Op::kW) {
    add(in.stage, -1);
    st.held_bytes += b_bytes(in.stage);  // freed by its B already
  }
  // FB: the forward's activations are allocated before the backward's are freed.
  out.peak_act_units[r] = std::max(out.peak_act_units[r], st.held);
  out.peak_act_bytes[r] = std::max(out.peak_act_bytes[r], st.held_bytes);
  if (in.op == Op::kFB) add(in.stage_b, -1);
  (void)s;
}

void run_compute(const Schedule& s, const OpCosts& c, const Instr& in, int r, RankState& st,
                 PipelineResult& out, bool keep) {
  if (c.release) {  // the chunk's weights (optim.overlap_param_gather)
    double at = (*c.release)[r][in.dir];
    if (in.op == Op::kFB) at = std::max(at, (*c.release)[r][in.dir_b]);
    if (at > st.now) out.weight_wait[r] += at - st.now, st.now = at;
  }
  const double d = c.op(in);
  if (keep) out.events.push_back({r, false, instr_label(in), st.now, d});
  st.now += d;
  out.busy[r] += d;
  if (in.op == Op::kB || in.op == Op::kW) out.chunk_final[r][in.dir] = st.now;
  if (in.op == Op::kFB) out.chunk_final[r][in.dir_b] = st.now;
  out.op_cost_sum += d;
  out.exposed_a2a[r] += c.exposed_comm(in);
  track_activations(s, c, in, r, st, out);
}

// Runs rank r until it blocks on a RECV whose SEND has not been posted; true if it moved.
bool advance(const Schedule& s, const OpCosts& c, int r, RankState& st,
             std::map<Transfer, double>& arrival, PipelineResult& out, bool keep) {
  bool moved = false;
  for (; st.pc < s.rank_instrs[r].size(); ++st.pc, moved = true) {
    const Instr& in = s.rank_instrs[r][st.pc];
    if (in.op == Op::kSendAct || in.op == Op::kSendGrad) {
      const double start = std::max(st.now, st.comm_free), dur = c.send_time(in.stage);
      st.comm_free = start + dur;
      arrival[transfer_of(s, r, in)] = st.comm_free + c.latency();
      out.bytes_sent += c.send_bytes(in.stage);
      if (keep) out.events.push_back({r, true, instr_label(in), start, dur});
      const double host = c.overhead(in);
      st.now += host, out.busy[r] += host;
    } else if (in.op == Op::kRecvAct || in.op == Op::kRecvGrad) {
      const Transfer tr = transfer_of(s, r, in);
      auto it = arrival.find(tr);
      if (it == arrival.end()) break;
      out.recv_wait[r] += std::max(0.0, it->second - st.now);
      if (keep) {
        out.events.push_back(
            {r, true, instr_label(in), st.now, std::max(0.0, it->second - st.now)});
      }
      st.now = std::max(st.now, it->second);
      const double host = c.overhead(in);
      st.now += host, out.busy[r] += host;
      // The message carries the sender's stage output: its size is the sender stage's.
      out.bytes_received += c.send_bytes(tr.src_stage);
    } else {
      run_compute(s, c, in, r, st, out, keep);
    }
  }
  return moved;
}

// ---- matched point-to-point groups (p2p_plan.h: the executor over NCCL) ----
//
// The host posts every group of a plan point when it reaches it; the rank's comm stream runs its
// groups one after another: a group starts at max(post, the previous group's end) and ends when
// each of its messages has moved, max(its start, the partner group's start) + bytes/bw +
// latency. The host waits at the point for the groups that hold receives; send-only groups hold
// only the comm stream.
struct GroupSim {
  int round = 0;
  bool has_recv = false;
  struct Msg {
    int rank = 0, group = 0;  // the partner's group
    double dur = 0;
    double bytes = 0;
    bool send = false;
  };
  std::vector<Msg> msgs;
  double post = -1, start = -1, end = -1;
};

struct MatchedRank {
  std::vector<GroupSim> groups;  // in plan order
  std::vector<int> first;        // [point] -> index of its first group
  size_t next_point = 0, next_comm = 0;
  double comm_free = 0;
};

// Resolves rank r's comm stream as far as the partners' starts allow; true if it moved.
bool resolve_comm(std::vector<MatchedRank>& m, int r, PipelineResult& out, bool keep) {
  MatchedRank& mr = m[r];
  bool moved = false;
  while (mr.next_comm < mr.groups.size()) {
    GroupSim& g = mr.groups[mr.next_comm];
    if (g.post < 0) break;
    if (g.start < 0) g.start = std::max(g.post, mr.comm_free), moved = true;
    double end = g.start;
    for (const GroupSim::Msg& msg : g.msgs) {
      const double peer = m[msg.rank].groups[msg.group].start;
      if (peer < 0) return moved;
      end = std::max(end, std::max(g.start, peer) + msg.dur);
    }
    g.end = mr.comm_free = end;
    for (const GroupSim::Msg& msg : g.msgs)
      (msg.send ? out.bytes_sent : out.bytes_received) += msg.bytes;
    if (keep) out.events.push_back({r, true, fmt::format("G{}", g.round), g.start, end - g.start});
    ++mr.next_comm;
    moved = true;
  }
  return moved;
}

bool advance_matched(const Schedule& s, const OpCosts& c, const P2pPlan& plan, int r, RankState& st,
                     std::vector<MatchedRank>& m, PipelineResult& out, bool keep) {
  MatchedRank& mr = m[r];
  const auto& points = plan.ranks[r];
  const size_t n = s.rank_instrs[r].size();
  bool moved = resolve_comm(m, r, out, keep);
  while (true) {
    if (mr.next_point < points.size() && points[mr.next_point].at == static_cast<int>(st.pc)) {
      const size_t p = mr.next_point;
      const size_t g0 = mr.first[p], g1 = g0 + points[p].groups.size();
      if (mr.groups[g0].post < 0) {
        for (size_t g = g0; g < g1; ++g) {
          mr.groups[g].post = st.now;
          out.group_posts[r].push_back({mr.groups[g].round, st.now});
        }
        moved = true;
        resolve_comm(m, r, out, keep);
      }
      double ready = st.now;
      for (size_t g = g0; g < g1; ++g) {
        if (!mr.groups[g].has_recv) continue;
        if (mr.groups[g].end < 0) return moved;  // waits for a receive
        ready = std::max(ready, mr.groups[g].end);
      }
      out.recv_wait[r] += ready - st.now;
      if (keep && ready > st.now) out.events.push_back({r, true, "R", st.now, ready - st.now});
      st.now = ready;
      ++mr.next_point;
      moved = true;
    }
    if (st.pc >= n) break;
    const Instr& in = s.rank_instrs[r][st.pc];
    if (in.is_comm()) {
      const double host = c.overhead(in);
      st.now += host, out.busy[r] += host;
    } else {
      run_compute(s, c, in, r, st, out, keep);
    }
    ++st.pc;
    moved = true;
  }
  return moved;
}

Result<PipelineResult> simulate_matched(const Schedule& s, const OpCosts& c, const P2pPlan& plan,
                                        bool keep_events) {
  PipelineResult out;
  const size_t n = s.ranks;
  out.busy.assign(n, 0), out.exposed_a2a.assign(n, 0), out.recv_wait.assign(n, 0);
  out.weight_wait.assign(n, 0);
  out.peak_act_units.assign(n, 0), out.peak_act_bytes.assign(n, 0);
  out.end.assign(n, 0), out.group_posts.assign(n, {});
  out.chunk_final.assign(n, std::vector<double>(chunks_per_rank(s), 0));
  if (plan.ranks.size() != n) return FP8_INVALID("simulate: a plan of another schedule");
  std::vector<RankState> st(n);
  std::vector<MatchedRank> m(n);
  // Each message's two ends: (rank, index of the group in that rank's list).
  struct End {
    int rank = -1, group = -1;
  };
  std::map<Transfer, std::pair<End, End>> ends;  // send end, receive end
  for (int r = 0; r < s.ranks; ++r) {
    for (size_t p = 0; p < plan.ranks[r].size(); ++p) {
      m[r].first.push_back(static_cast<int>(m[r].groups.size()));
      for (const P2pGroup& g : plan.ranks[r][p].groups) {
        const int gi = static_cast<int>(m[r].groups.size());
        GroupSim gs;
        gs.round = g.round;
        for (int i : g.ops) {
          const Instr& in = s.rank_instrs[r][i];
          const bool send = in.op == Op::kSendAct || in.op == Op::kSendGrad;
          gs.has_recv |= !send;
          auto& e = ends[transfer_of(s, r, in)];
          (send ? e.first : e.second) = {r, gi};
        }
        m[r].groups.push_back(std::move(gs));
      }
    }
  }
  for (const auto& [tr, e] : ends) {
    if (e.first.rank < 0 || e.second.rank < 0)
      return FP8_INVALID("simulate: a planned message without both ends (rank {} -> {})", tr.src,
                         tr.dst);
    const double bytes = c.send_bytes(tr.src_stage);
    const double dur = c.send_time(tr.src_stage) + c.latency();
    m[e.first.rank].groups[e.first.group].msgs.push_back(
        {e.second.rank, e.second.group, dur, bytes, true});
    m[e.second.rank].groups[e.second.group].msgs.push_back(
        {e.first.rank, e.first.group, dur, bytes, false});
  }
  for (bool moved = true; moved;) {
    moved = false;
    for (int r = 0; r < s.ranks; ++r)
      moved |= advance_matched(s, c, plan, r, st[r], m, out, keep_events);
  }
  for (int r = 0; r < s.ranks; ++r) {
    if (st[r].pc < s.rank_instrs[r].size() || m[r].next_comm < m[r].groups.size()) {
      return FP8_INVALID(
          "simulate: rank {} is stuck at instruction #{} with matched groups; validate the "
          "schedule",
          r, st[r].pc);
    }
    out.makespan = std::max(out.makespan, st[r].now);
    out.end[r] = st[r].now;
  }
  return out;
}

}  // namespace

Result<PipelineResult> simulate_pipeline(const Schedule& s, const OpCosts& c, bool keep_events,
                                         const P2pPlan* groups) {
  if (groups) return simulate_matched(s, c, *groups, keep_events);
  PipelineResult out;
  const size_t n = s.ranks;
  out.busy.assign(n, 0), out.exposed_a2a.assign(n, 0), out.recv_wait.assign(n, 0);
  out.weight_wait.assign(n, 0);
  out.peak_act_units.assign(n, 0), out.peak_act_bytes.assign(n, 0);
  out.end.assign(n, 0), out.group_posts.assign(n, {});
  out.chunk_final.assign(n, std::vector<double>(chunks_per_rank(s), 0));
  std::vector<RankState> st(n);
  std::map<Transfer, double> arrival;
  for (bool moved = true; moved;) {
    moved = false;
    for (int r = 0; r < s.ranks; ++r) moved |= advance(s, c, r, st[r], arrival, out, keep_events);
  }
  for (int r = 0; r < s.ranks; ++r) {
    if (st[r].pc < s.rank_instrs[r].size()) {
      return FP8_INVALID(
          "simulate: rank {} is stuck at instruction #{} ({}); validate the schedule", r, st[r].pc,
          instr_label(s.rank_instrs[r][st[r].pc]));
    }
    out.makespan = std::max(out.makespan, st[r].now);
    out.end[r] = st[r].now;
  }
  return out;
}

namespace {

// Parameters of the chunks rank r holds, split into the part replicated over dp and experts.
void rank_params(const config::Config& cfg, const Schedule& s, const CostModel& cm, int r,
                 double& dense, double& expert) {
  dense = expert = 0;
  bool first = false, last = false;
  for (int dir = 0; dir < chunks_per_rank(s); ++dir) {
    const int st = stage_of(s, r, dir);
    dense += cm.chunks[st].dense_params, expert += cm.chunks[st].expert_params;
    first |= st == 0, last |= st == s.stages() - 1;
  }
  // TR §3.2.3: with the embedding stage and the head/MTP stage on one rank, MTP shares the
  // embedding physically (the cost model counted an MTP copy on the head stage).
  if (first && last && s.stages() > 1 && cfg.model().mtp_depth() > 0) {
    dense -= double(cfg.model().vocab_size()) * cfg.model().hidden();
  }
}

// ZeRO-1 over dp: reduce-scatter FP32 gradients, all-gather BF16 parameters, ring over n ranks
// (bytes per GPU (n-1)/n x size) at the inter-node rate; experts over dp/ep replicas. rs_s: the
// reduce-scatter's part of sync_s.
void rank_step(const config::Config& cfg, const CostModel& cm, double dense, double expert,
               double& sync_s, double& rs_s, double& opt_s, Memory& mem) {
  const auto& p = cfg.parallel();
  const Calibration& c = cm.cal;
  const double dp = p.dp(), edp = std::max(1, p.dp() / std::max(1, p.ep()));
  const double ring =
      ((dp - 1) / dp * dense + (edp - 1) / edp * expert) * (c.grad_comm_bytes + c.param_bytes);
  sync_s = ring / (cm.net_bytes_per_s * c.net_eff) * (1 - c.dp_overlap);
  rs_s = sync_s * c.grad_comm_bytes / (c.grad_comm_bytes + c.param_bytes);
  const bool z1 = cfg.optim().zero1();
  const double shard = z1 ? dense / dp + expert / edp : dense + expert;
  // Optimizer state: FP32 master + BF16 Adam moments (TR §3.2.3) = 8 B per sharded param.
  // Step traffic: master r/w 8, moments r/w 8, FP32 grad read 4, BF16 param write 2 = 22 B.
  opt_s = shard * 22 / (cm.hbm_bytes_per_s * c.hbm_eff);
  mem.params = (dense + expert) * c.param_bytes;
  mem.grads = (dense + expert) * 4;  // FP32 gradient accumulators (TR §3.3), not sharded
  mem.optimizer = shard * 8;
}

// When a transfer of `work` seconds (at the NIC's full rate) started at t ends if, until
// `busy_until` (the rank's pipeline end), it gets only `share` of the NIC: the EP all-to-all
// takes the rest (ep_nic_share).
double nic_done(double t, double work, double busy_until, double share) {
  if (t < busy_until) {
    const double slow = (busy_until - t) * share;  // work done before busy_until
    if (work <= slow) return t + work / share;
    work -= slow, t = busy_until;
  }
  return t + work;
}

// optim.overlap_grad_reduce: when rank k's reduce-scatter ends if each chunk's part starts once
// every holder of its stage may post it (parallel/grad_sync.h GradOverlap): over MPI when each
// holder's chunk is final; over matched groups at the set's round R, the latest over the holders
// of GradOverlap::round_after(that chunk's last backward instruction), each holder posting before
// its first group of round >= R (or at its end). The parts run one after another on the rank's
// network, each taking rs_s in proportion to its chunk's parameters, at `share` of the NIC while
// the rank's pipeline runs (nic_done). dp replicas are symmetric.
double overlapped_rs_end(const Schedule& s, const CostModel& cm, const PipelineResult& pipe,
                         const P2pPlan* plan, int k, double rs_s, double share) {
  if (rs_s <= 0) return 0;
  const int D = chunks_per_rank(s);
  struct Part {
    double start, params;
  };
  std::vector<Part> parts;
  double total = 0;
  for (int d = 0; d < D; ++d) {
    const int st = stage_of(s, k, d);
    std::vector<std::pair<int, int>> holders;  // (pipeline rank, dir) holding stage st
    for (int r = 0; r < s.ranks; ++r)
      for (int e = 0; e < D; ++e)
        if (stage_of(s, r, e) == st) holders.push_back({r, e});
    double start = 0;
    if (!plan) {
      for (auto [r, e] : holders) start = std::max(start, pipe.chunk_final[r][e]);
    } else {
      int round = 0;
      for (auto [r, e] : holders) {
        round = std::max(
            round, GradOverlap::round_after(*plan, r, PipelineExecutor::last_grad_instr(s, r, e)));
      }
      for (auto [r, e] : holders) {
        double t = pipe.end[r];
        for (auto [g, at] : pipe.group_posts[r]) {
          if (g >= round) {
            t = at;
            break;
          }
        }
        start = std::max(start, t);
      }
    }
    const double params = cm.chunks[st].dense_params + cm.chunks[st].expert_params;
    parts.push_back({start, params});
    total += params;
  }
  std::sort(parts.begin(), parts.end(),
            [](const Part& a, const Part& b) { return a.start < b.start; });
  double t = 0;
  for (const Part& p : parts) {
    t = nic_done(std::max(t, p.start), total > 0 ? rs_s * p.params / total : 0, pipe.end[k], share);
  }
  return t;
}

// optim.overlap_param_gather: when each chunk's weights land in the next step. Every rank posts
// its all-gather parts after the optimizer (the step's start here), in the global order of
// parallel/grad_sync.h GatherOverlap (lowest stage first); they run one after another on the
// rank's network, each taking ag_s in proportion to its chunk's parameters, at `share` of it
// once the rank computes.
std::vector<double> gather_release(const Schedule& s, const CostModel& cm, int k, double ag_s,
                                   double share) {
  const int D = chunks_per_rank(s);
  std::vector<std::pair<int, int>> parts;  // (stage, dir)
  double total = 0;
  for (int d = 0; d < D; ++d) {
    const int st = stage_of(s, k, d);
    parts.push_back({st, d});
    total += cm.chunks[st].dense_params + cm.chunks[st].expert_params;
  }
  std::sort(parts.begin(), parts.end());
  // Until the rank's first compute instruction can start (its chunk's part landed) it runs no
  // all-to-all of its own: the parts up to that one get the whole NIC, the later ones `share`.
  int first = 0;
  for (const Instr& in : s.rank_instrs[k]) {
    if (!in.is_comm()) {
      first = in.dir;
      break;
    }
  }
  std::vector<double> release(D, 0);
  double t = 0, rate = 1;
  for (auto [st, d] : parts) {
    const double params = cm.chunks[st].dense_params + cm.chunks[st].expert_params;
    t += total > 0 ? ag_s * params / total / rate : 0;
    release[d] = t;
    if (d == first) rate = share;
  }
  return release;
}

// Bytes rank k's EP all-to-alls send in a step over IB and NVLink.
void ep_traffic(const Schedule& s, const CostModel& cm, int k, double& ib, double& nvl) {
  ib = nvl = 0;
  auto add = [&](const PassCost& p) { ib += p.ib_bytes, nvl += p.nvlink_bytes; };
  for (const Instr& in : s.rank_instrs[k]) {
    if (in.op == Op::kF || in.op == Op::kFB) add(cm.chunks[in.stage].f);
    if (in.op == Op::kB) add(cm.chunks[in.stage].b);
    if (in.op == Op::kFB) add(cm.chunks[in.stage_b].b);
  }
}

// The share of rank k's NIC left to the DP exchange while its pipeline runs: the EP all-to-all's
// IB traffic, spread evenly over the pipeline's `span` (a first-order model: the all-to-all
// comes in bursts, and the cool-down where most reduce-scatter parts run has fewer of them),
// takes the rest. At least 10%.
double ep_nic_share(const Schedule& s, const CostModel& cm, int k, double span) {
  double ib = 0, nvl = 0;
  ep_traffic(s, cm, k, ib, nvl);
  const double busy = ib / (cm.net_bytes_per_s * cm.cal.net_eff);
  return span > 0 ? std::max(0.1, 1 - busy / span) : 1.0;
}

void throughput(const config::Config& cfg, const Schedule& s, const CostModel& cm, StepResult& r) {
  const double gpus = double(cfg.parallel().pp()) * cfg.parallel().dp();
  r.tokens_per_step = double(cfg.train().global_batch()) * cfg.train().seq_len();
  double per_mb = 0;
  for (const ChunkCost& c : cm.chunks) per_mb += c.f.work.model + c.b.work.model + c.w.work.model;
  r.model_flops_per_step = per_mb * s.microbatches * cfg.parallel().dp();
  r.tokens_per_s_per_gpu = r.tokens_per_step / r.step_s / gpus;
  r.tflops_per_gpu = r.model_flops_per_step / r.step_s / gpus / 1e12;
  r.mfu_bf16 = r.tflops_per_gpu * 1e12 / cm.peak_bf16;
  r.mfu_fp8 = r.tflops_per_gpu * 1e12 / cm.peak_fp8;
  r.gpu_hours_per_trillion = 1e12 / r.tokens_per_s_per_gpu / 3600;
}

}  // namespace

Result<StepResult> simulate_step(const config::Config& cfg, const Schedule& s, const CostModel& cm,
                                 bool keep_events) {
  OpCosts oc;
  oc.model = &cm;
  StepResult r;
  // Over NCCL the executor posts matched groups (p2p_plan.h).
  std::optional<P2pPlan> plan;
  if (cfg.parallel().comm_backend() == "nccl") {
    FP8_ASSIGN_OR_RETURN(plan, plan_p2p_groups(s, /*early_sends=*/true));
  }
  // Each rank's exchange costs (its chunks' parameters); with optim.overlap_param_gather the
  // all-gather of the last step delays each chunk's first instruction until its weights land.
  std::vector<double> sync_by_rank(s.ranks), rs_by_rank(s.ranks), opt_by_rank(s.ranks);
  std::vector<Memory> mem_by_rank(s.ranks);
  std::vector<std::pair<double, double>> params_by_rank(s.ranks);  // (dense, expert)
  for (int k = 0; k < s.ranks; ++k) {
    auto& [dense, expert] = params_by_rank[k];
    rank_params(cfg, s, cm, k, dense, expert);
    rank_step(cfg, cm, dense, expert, sync_by_rank[k], rs_by_rank[k], opt_by_rank[k],
              mem_by_rank[k]);
  }
  const bool overlap = cfg.optim().overlap_grad_reduce();
  const bool overlap_ag = cfg.optim().overlap_param_gather();
  FP8_ASSIGN_OR_RETURN(
      r.pipe, simulate_pipeline(s, oc, keep_events && !overlap_ag, plan ? &*plan : nullptr));
  // The DP exchange under the pipeline shares each rank's NIC with its EP all-to-all, at the
  // share left over the pipeline's span (the all-gather's from the pipeline without it).
  std::vector<double> share(s.ranks, 1.0);
  for (int k = 0; k < s.ranks && (overlap || overlap_ag); ++k)
    share[k] = ep_nic_share(s, cm, k, r.pipe.makespan);
  std::vector<std::vector<double>> release;
  if (overlap_ag) {
    for (int k = 0; k < s.ranks; ++k)
      release.push_back(gather_release(s, cm, k, sync_by_rank[k] - rs_by_rank[k], share[k]));
    oc.release = &release;
    FP8_ASSIGN_OR_RETURN(r.pipe, simulate_pipeline(s, oc, keep_events, plan ? &*plan : nullptr));
  }
  r.dp_nic_share = *std::min_element(share.begin(), share.end());
  double tail = 0, finish = r.pipe.makespan;  // finish: the worst rank's step end (overlap)
  const double buffers = cm.cal.comm_buffer_gib * (1ull << 30) + 4 * cm.chunks[0].p2p_bytes;
  for (int k = 0; k < s.ranks; ++k) {
    const auto [dense, expert] = params_by_rank[k];
    const double sync = sync_by_rank[k], rs = rs_by_rank[k], opt = opt_by_rank[k];
    Memory mem = mem_by_rank[k];
    // What of the exchange follows the pipeline: all of it, or the reduce-scatter only when the
    // all-gather runs under the next step (its wait is in the pipeline's weight_wait).
    const double after = overlap_ag ? rs : sync;
    double exposed_sync = after + r.pipe.weight_wait[k];
    if (overlap) {  // the reduce-scatter under the pipeline
      const double rs_end =
          overlapped_rs_end(s, cm, r.pipe, plan ? &*plan : nullptr, k, rs, share[k]);
      const double ag = overlap_ag ? 0 : sync - rs;
      const double end = std::max(r.pipe.end[k], rs_end) + opt + ag;
      if (end > finish) finish = end;
      exposed_sync = std::max(r.pipe.end[k], rs_end) - r.pipe.end[k] + ag + r.pipe.weight_wait[k];
    }
    r.dp_sync_total_s = std::max(r.dp_sync_total_s, sync);
    r.params_by_rank.push_back(dense + expert);
    mem.activations = r.pipe.peak_act_bytes[k];
    mem.buffers = buffers;
    if (mem.total() > r.mem.total()) r.mem = mem, r.params_per_gpu = dense + expert;
    if (after + opt > tail) tail = after + opt, r.dp_sync_s = after, r.optimizer_s = opt;
    const double bubble = r.pipe.bubble(k);
    r.bubble_s = std::max(r.bubble_s, bubble);
    r.exposed_comm_s =
        std::max(r.exposed_comm_s, r.pipe.exposed_a2a[k] + r.pipe.recv_wait[k] + exposed_sync);
    double ib = 0, nvl = 0;
    ep_traffic(s, cm, k, ib, nvl);
    if (ib + nvl > r.ep_ib_bytes + r.ep_nvlink_bytes) r.ep_ib_bytes = ib, r.ep_nvlink_bytes = nvl;
  }
  r.step_s = r.pipe.makespan + tail;
  if (overlap) {  // the step ends with its last rank; what of the sync shows is the rest
    r.step_s = std::max(r.pipe.makespan, finish);
    r.dp_sync_s = std::max(0.0, r.step_s - r.pipe.makespan - r.optimizer_s);
  }
  r.bubble_frac = r.pipe.makespan > 0 ? r.bubble_s / r.pipe.makespan : 0;
  throughput(cfg, s, cm, r);
  return r;
}

std::string format_step(const config::Config& cfg, const Schedule& s, const CostModel& cm,
                        const StepResult& r) {
  const auto& p = cfg.parallel();
  const double gib = double(1ull << 30);
  const ChunkCost& c = cm.chunks[std::min<int>(1, cm.chunks.size() - 1)];
  std::string o = fmt::format(
      "layout      pp={} dp={} ep={} gpus={} schedule={} microbatches={} ({} tokens each)\n",
      p.pp(), p.dp(), p.ep(), int64_t(p.pp()) * p.dp(), schedule_kind_name(s.kind), s.microbatches,
      cm.tokens_per_mb);
  o += fmt::format(
      "chunk[1]    blocks={} moe={} F={:.2f} ms (a2a {:.2f}) B={:.2f} ms (a2a {:.2f}) W={:.2f} "
      "ms F&B={:.2f} ms\n",
      c.blocks, c.moe_blocks, 1e3 * c.f.compute_s, 1e3 * c.f.a2a_s, 1e3 * c.b.compute_s,
      1e3 * c.b.a2a_s, 1e3 * c.w.compute_s, 1e3 * fb_time(cm, c.stage, c.stage));
  const bool rs = cfg.optim().overlap_grad_reduce(), ag = cfg.optim().overlap_param_gather();
  std::string hidden;
  if (rs || ag) {
    const double wait = r.pipe.weight_wait.empty() ? 0
                                                   : *std::max_element(r.pipe.weight_wait.begin(),
                                                                       r.pipe.weight_wait.end());
    hidden = fmt::format(
        " (of {:.3f} in all: {}{}{}; under the pipeline at {:.0f}% of the NIC, the EP all-to-all "
        "taking the rest)",
        r.dp_sync_total_s, rs ? "the reduce-scatter overlaps the pipeline" : "",
        rs && ag ? ", " : "",
        ag ? fmt::format("the all-gather the next step's, chunks waiting at most {:.3f} s for "
                         "weights",
                         wait)
           : "",
        100 * r.dp_nic_share);
  }
  o += fmt::format("step        {:.3f} s = pipeline {:.3f} + dp sync {:.3f} + optimizer {:.3f}{}\n",
                   r.step_s, r.pipe.makespan, r.dp_sync_s, r.optimizer_s, hidden);
  o += fmt::format("bubble      {:.3f} s ({:.1f}% of the pipeline, worst rank)\n", r.bubble_s,
                   100 * r.bubble_frac);
  o +=
      fmt::format("exposed     {:.3f} s communication (EP a2a + p2p waits + DP sync, worst rank)\n",
                  r.exposed_comm_s);
  if (r.ep_ib_bytes + r.ep_nvlink_bytes > 0) {
    o += fmt::format(
        "ep a2a      {:.6g} bytes/GPU/step sent (IB {:.6g}, NVLink {:.6g}; busiest rank)\n",
        r.ep_ib_bytes + r.ep_nvlink_bytes, r.ep_ib_bytes, r.ep_nvlink_bytes);
  }
  o += fmt::format(
      "memory/GPU  {:.1f} GiB = params {:.1f} ({:.2f}B) + grads {:.1f} + optimizer {:.1f} + "
      "activations {:.1f} + buffers {:.1f} (of {:.1f})\n",
      r.mem.total() / gib, r.mem.params / gib, r.params_per_gpu / 1e9, r.mem.grads / gib,
      r.mem.optimizer / gib, r.mem.activations / gib, r.mem.buffers / gib, cfg.cluster().hbm_gib());
  if (const double over = r.mem.total() / gib - cfg.cluster().hbm_gib(); over > 0) {
    o += fmt::format(
        "            does not fit: {:.1f} GiB over the GPU's memory (see train.recompute, a "
        "larger parallel.pp or parallel.ep)\n",
        over);
  }
  o += fmt::format(
      "throughput  {:.0f} tokens/s/GPU, {:.0f} TFLOP/s/GPU, MFU {:.1f}% of BF16 peak "
      "({:.1f}% of FP8 peak)\n",
      r.tokens_per_s_per_gpu, r.tflops_per_gpu, 100 * r.mfu_bf16, 100 * r.mfu_fp8);
  o += "rank busy   ";
  for (double b : r.pipe.busy) o += fmt::format(" {:.2f}", b);
  o += " s\nstage F+B+W";
  for (const ChunkCost& ch : cm.chunks) {
    o += fmt::format(" {:.0f}", 1e3 * (ch.f.compute_s + ch.b.compute_s + ch.w.compute_s));
  }
  o += " ms (compute only)\n";
  o += fmt::format("cost        {:.0f}K GPU-hours per trillion tokens\n",
                   r.gpu_hours_per_trillion / 1e3);
  return o;
}

std::string chrome_trace(const PipelineResult& r, int ranks) {
  std::string o = "{\"traceEvents\":[\n";
  for (int k = 0; k < ranks; ++k) {
    o += fmt::format(
        "{{\"ph\":\"M\",\"name\":\"process_name\",\"pid\":{0},\"args\":{{\"name\":\"rank "
        "{0}\"}}}},\n{{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":{0},\"tid\":0,"
        "\"args\":{{\"name\":\"compute\"}}}},\n{{\"ph\":\"M\",\"name\":\"thread_name\","
        "\"pid\":{0},\"tid\":1,\"args\":{{\"name\":\"comm\"}}}},\n",
        k);
  }
  for (const TraceEvent& e : r.events) {
    o += fmt::format(
        "{{\"ph\":\"X\",\"name\":\"{}\",\"pid\":{},\"tid\":{},\"ts\":{:.3f},\"dur\":{:.3f}}},\n",
        e.name, e.rank, e.comm ? 1 : 0, e.start * 1e6, e.dur * 1e6);
  }
  if (o.ends_with(",\n")) o.resize(o.size() - 2);
  return o + "\n]}\n";
}

}  // namespace fp8pipe::parallel::sim
