#include "parallel/executor.h"

#include <fmt/format.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <string_view>
#include <thread>

namespace fp8pipe::parallel {

Result<std::vector<model::ModelPart>> partition_stages(const config::Model& m, int stages) {
  const int L = m.layers();
  if (stages < 1 || L < stages) {
    return FP8_INVALID(
        "model.layers={} cannot be split over {} pipeline stages (each stage needs "
        "at least one block)",
        L, stages);
  }
  std::vector<model::ModelPart> parts;
  int begin = 0;
  for (int s = 0; s < stages; ++s) {
    const int n = L / stages + (s < L % stages ? 1 : 0);
    parts.push_back({begin, begin + n, s == 0, s == stages - 1});
    begin += n;
  }
  return parts;
}

int stage_of(const Schedule& s, int rank, int dir) {
  switch (s.kind) {
    case ScheduleKind::kDualPipe:
      return dir == 0 ? rank : s.ranks - 1 - rank;
    case ScheduleKind::kDualPipeV:
      return dir == 0 ? rank : 2 * s.ranks - 1 - rank;
    default:
      return rank;
  }
}

int chunks_per_rank(const Schedule& s) {
  return s.kind == ScheduleKind::kDualPipe || s.kind == ScheduleKind::kDualPipeV ? 2 : 1;
}

PipelineExecutor::PipelineExecutor(const Schedule& s, int pp_rank, Comm* pp,
                                   std::vector<model::Model*> chunks, model::ModelCtx* ctx,
                                   int64_t hidden, bool fb_overlap)
    : sched_(&s),
      rank_(pp_rank),
      pp_(pp),
      chunks_(std::move(chunks)),
      ctx_(ctx),
      hidden_(hidden),
      matched_(pp && pp->p2p_matched_groups()),
      fb_overlap_(fb_overlap) {
  if (const char* e = std::getenv("FP8PIPE_P2P_GROUPS")) {
    const std::string_view v(e);
    if (v == "matched" || v == "eager") {
      matched_ = v == "matched";
    } else {  // reported by run(), which can fail
      env_error_ = FP8_INVALID("FP8PIPE_P2P_GROUPS='{}' (valid: matched, eager)", v);
    }
  }
}

PipelineExecutor::~PipelineExecutor() = default;

Status PipelineExecutor::set_schedule(const Schedule& s) {
  if (s.kind != sched_->kind || s.ranks != sched_->ranks || s.stages() != sched_->stages()) {
    return FP8_INVALID(
        "executor: a schedule of another layout ({} ranks, {} stages) cannot replace this one ({} "
        "ranks, {} stages)",
        s.ranks, s.stages(), sched_->ranks, sched_->stages());
  }
  sched_ = &s;
  plan_sched_ = nullptr;
  return Status::Ok();
}

void PipelineExecutor::set_tracer(Tracer* t, int64_t step) {
  tracer_ = t;
  trace_step_ = step;
  traced_ep_.clear();
  clock_.reset();
  auto* ep = dynamic_cast<CommExpertComm*>(ctx_ ? ctx_->ep : nullptr);
  if (!t || !ep) return;
  clock_ = std::make_unique<CompletionClock>(*t);
  for (size_t d = 0; d < chunks_.size(); ++d)
    traced_ep_.push_back(ep->traced(t, clock_.get(), fmt::format("a2a d{}", d), step));
}

int PipelineExecutor::local_next_dir(int stream, int stage, int step) const {
  const int next = stage + step;
  if (next < 0 || next >= sched_->stages()) return -1;
  const int d = sched_->dir_of(stream, next);
  return sched_->rank_of(d, next) == rank_ ? d : -1;
}

Status PipelineExecutor::forward(model::ModelCtx& c, const BatchFn& batch, int mb, int dir,
                                 int stage) {
  model::Model& m = *chunks_[dir];
  const int stream = sched_->stream_of(dir);
  const model::MicroBatch& b = batch(stream, mb);
  Tensor x;
  if (stage == 0) {
    FP8_ASSIGN_OR_RETURN(x, m.embed_forward(c, mb, b));
  } else {
    auto it = act_in_.find({dir, mb});
    if (it == act_in_.end()) {
      return FP8_ERROR(Code::kInternal, "F mb={} dir={} stage={}: no input activation", mb, dir,
                       stage);
    }
    x = it->second;
    act_in_.erase(it);
  }
  for (int i = 0; i < m.num_blocks(); ++i) {
    FP8_ASSIGN_OR_RETURN(x, m.block(i).forward(c, mb, x, b.B, b.T));
  }
  if (is_last(stage)) {
    FP8_ASSIGN_OR_RETURN(auto lp, m.head_forward(c, mb, x, b));
    stats_.loss.main += lp.main;
    stats_.loss.total += lp.total;
    stats_.loss.mtp.resize(lp.mtp.size());
    for (size_t k = 0; k < lp.mtp.size(); ++k) stats_.loss.mtp[k] += lp.mtp[k];
    stats_.loss.tokens += lp.tokens;
    ++stats_.loss_microbatches;
    return Status::Ok();
  }
  const int nd = local_next_dir(stream, stage, +1);
  if (nd >= 0)
    act_in_[{nd, mb}] = x;  // DualPipeV's turn: the next stage is on this rank
  else
    act_out_[{dir, mb}] = x;
  return Status::Ok();
}

Status PipelineExecutor::backward(model::ModelCtx& c, int mb, int dir, int stage, bool defer_w,
                                  float loss_scale) {
  model::Model& m = *chunks_[dir];
  Tensor d;
  if (is_last(stage)) {
    FP8_ASSIGN_OR_RETURN(d, m.head_backward_input(c, mb, loss_scale));
  } else {
    auto it = grad_in_.find({dir, mb});
    if (it == grad_in_.end()) {
      return FP8_ERROR(Code::kInternal, "B mb={} dir={} stage={}: no output gradient", mb, dir,
                       stage);
    }
    d = it->second;
    grad_in_.erase(it);
  }
  for (int i = m.num_blocks() - 1; i >= 0; --i) {
    FP8_ASSIGN_OR_RETURN(d, m.block(i).backward_input(c, mb, d));
  }
  if (!defer_w) FP8_RETURN_IF_ERROR(weight(c, mb, dir, stage));
  if (stage == 0) return m.embed_backward(c, mb, d);
  const int pd = local_next_dir(sched_->stream_of(dir), stage, -1);
  if (pd >= 0)
    grad_in_[{pd, mb}] = d;
  else
    grad_out_[{dir, mb}] = d;
  return Status::Ok();
}

Status PipelineExecutor::weight(model::ModelCtx& c, int mb, int dir, int stage) {
  model::Model& m = *chunks_[dir];
  if (is_last(stage)) FP8_RETURN_IF_ERROR(m.head_backward_weight(c, mb));
  for (int i = m.num_blocks() - 1; i >= 0; --i) {
    FP8_RETURN_IF_ERROR(m.block(i).backward_weight(c, mb));
  }
  return Status::Ok();
}

void PipelineExecutor::set_flat_grads(Tensor grads, Tensor accs) {
  flat_grads_ = std::move(grads);
  flat_accs_ = std::move(accs);
}

Status PipelineExecutor::flush_grads(int dir) {
  Backend& be = *ctx_->be;
  auto flush = [&](model::Param* p, Tensor& grad) -> Status {
    // optim.placement=device: the sum stays on the backend, nothing is copied.
    if (p->grad_acc_dev.defined()) return be.accumulate_grad(grad, p->grad_acc_dev);
    const int64_t n = grad.numel();
    if (static_cast<int64_t>(p->grad_acc.size()) != n) p->grad_acc.assign(n, 0.0);
    if (grad.device() == Device::kCpu) {  // host memory: sum and zero in one pass
      float* g = grad.data_as<float>();
      for (int64_t i = 0; i < n; ++i) {
        p->grad_acc[i] += g[i];
        g[i] = 0.0f;
      }
      return Status::Ok();
    }
    // A device: download (synchronizes the stream), sum on the host, zero on the device.
    FP8_ASSIGN_OR_RETURN(Tensor h, be.to_host(grad));
    const float* g = h.data_as<float>();
    for (int64_t i = 0; i < n; ++i) p->grad_acc[i] += g[i];
    return be.fill_zero(grad);
  };
  if (flat_grads_.defined() && chunks_.size() == 1) {
    FP8_RETURN_IF_ERROR(be.accumulate_grad(flat_grads_, flat_accs_));
  } else {
    for (model::Param* p : chunks_[dir]->params()) FP8_RETURN_IF_ERROR(flush(p, p->grad));
  }
  for (auto [p, grad] : chunks_[dir]->extra_grads()) FP8_RETURN_IF_ERROR(flush(p, *grad));
  return Status::Ok();
}

// Tag of a message, unique within a step: (kind, stream, sender stage, micro-batch).
Result<int> PipelineExecutor::tag_of(const Instr& in) const {
  const Transfer t = transfer_of(*sched_, rank_, in);
  const int64_t tag =
      ((static_cast<int64_t>(t.grad) * sched_->streams() + t.stream) * sched_->stages() +
       t.src_stage) *
          sched_->mb_per_stream() +
      t.mb;
  if (tag > 32767) {  // the MPI standard guarantees tags up to 32767
    return FP8_INVALID("pipeline message tag {} exceeds 32767 (stages={}, microbatches={})", tag,
                       sched_->stages(), sched_->microbatches);
  }
  return static_cast<int>(tag);
}

Status PipelineExecutor::send(const Instr& in, int index) {
  auto& from = in.op == Op::kSendAct ? act_out_ : grad_out_;
  auto it = from.find({in.dir, in.mb});
  if (it == from.end() || !pp_) {
    return FP8_ERROR(Code::kInternal, "{}: nothing to send on rank {}", instr_label(in), rank_);
  }
  Tensor t = it->second;
  from.erase(it);
  if (t.device() != Device::kCpu && !pp_->device_buffers()) {  // a host-only comm (MPI)
    FP8_ASSIGN_OR_RETURN(t, ctx_->be->to_host(t));             // kept alive until sent
  }
  if (matched_) {  // posted at its plan point (run_point)
    outbox_[index] = t;
    return Status::Ok();
  }
  FP8_ASSIGN_OR_RETURN(int tag, tag_of(in));
  pending_.push_back({pp_->send(t.data(), t.numel(), DataType::kFloat32, in.peer, tag), t});
  return Status::Ok();
}

Result<PipelineExecutor::Posted> PipelineExecutor::post_recv(const Instr& in, int index,
                                                             const BatchFn& batch) {
  if (!pp_) return FP8_ERROR(Code::kInternal, "{}: no pipeline communicator", instr_label(in));
  const model::MicroBatch& b = batch(sched_->stream_of(in.dir), in.mb);
  Posted p;
  p.index = index;
  FP8_ASSIGN_OR_RETURN(p.dst, ctx_->be->empty({b.B * b.T, hidden_}, DType::kF32));
  FP8_ASSIGN_OR_RETURN(int tag, tag_of(in));
  Tensor into = p.dst;
  if (p.dst.device() != Device::kCpu && !pp_->device_buffers()) {  // a host-only comm: stage
    FP8_ASSIGN_OR_RETURN(p.host, make_cpu_backend()->empty(p.dst.shape(), DType::kF32));
    into = p.host;
    p.staged = true;
  }
  p.work = pp_->recv(into.data(), into.numel(), DataType::kFloat32, in.peer, tag);
  return p;
}

Status PipelineExecutor::finish_recv(const Instr& in, Posted p) {
  FP8_RETURN_IF_ERROR(p.work.wait());
  if (p.staged) FP8_RETURN_IF_ERROR(ctx_->be->copy(p.host, p.dst));
  (in.op == Op::kRecvAct ? act_in_ : grad_in_)[{in.dir, in.mb}] = p.dst;
  return Status::Ok();
}

Status PipelineExecutor::recv(const Instr& in, const BatchFn& batch) {
  FP8_ASSIGN_OR_RETURN(Posted p, post_recv(in, -1, batch));
  return finish_recv(in, p);
}

void PipelineExecutor::trace_comm_run() {
  if (!tracer_) return;
  const auto& list = sched_->rank_instrs[rank_];
  for (const auto& [i, t] : trace_run_) {
    const Instr& in = list[i];
    if (in.op == Op::kSendAct || in.op == Op::kSendGrad) {
      tracer_->instant(instr_label(in), "comm", t, trace_step_);
    } else {
      auto it = trace_recv_end_.find(i);
      tracer_->interval(instr_label(in), "comm", t, it == trace_recv_end_.end() ? t : it->second,
                        trace_step_);
    }
  }
  trace_run_.clear(), trace_recv_end_.clear();
}

Status PipelineExecutor::run_point(const P2pPoint& pt, const BatchFn& batch) {
  const auto& list = sched_->rank_instrs[rank_];
  std::vector<Posted> recvs;
  for (const P2pGroup& g : pt.groups) {
    if (hooks_.before_round)
      FP8_RETURN_IF_ERROR(hooks_.before_round(g.round, pt.at <= last_compute_));
    Work last;
    for (int i : g.ops) {
      const Instr& in = list[i];
      if (in.op == Op::kSendAct || in.op == Op::kSendGrad) {
        auto it = outbox_.find(i);
        if (it == outbox_.end()) {
          return FP8_ERROR(Code::kInternal, "{}: planned at instruction {} before it was produced",
                           instr_label(in), pt.at);
        }
        FP8_ASSIGN_OR_RETURN(int tag, tag_of(in));
        const Tensor t = it->second;
        outbox_.erase(it);
        last = pp_->send(t.data(), t.numel(), DataType::kFloat32, in.peer, tag);
        pending_.push_back({last, t});
      } else {
        FP8_ASSIGN_OR_RETURN(Posted p, post_recv(in, i, batch));
        last = p.work;
        recvs.push_back(std::move(p));
      }
    }
    // Issue the group now, as one group (a test is a trigger of the NCCL comm's batch; a no-op
    // for MPI): the next group must not join it (nccl_comm.h).
    last.test();
  }
  for (Posted& p : recvs) {
    const Instr& in = list[p.index];
    if (Status s = finish_recv(in, p); !s.ok())
      return s.with_context(fmt::format("pipeline rank {} at {}", rank_, instr_label(in)));
    if (tracer_) trace_recv_end_[p.index] = tracer_->now_us();
  }
  trace_comm_run();
  return Status::Ok();
}

// ---- compute instructions -----------------------------------------------------------------------
//
// Every compute instruction runs its halves (one; two for FB) on copies of the context whose
// await hook (ModelCtx::await, called at each MoE all-to-all wait) closes the current compute
// slice for the trace and, in an overlapped FB, passes the baton to the other half.
//
// FB overlap (DESIGN.md §5). The forward of one chunk and the backward of the other run as two
// fibers: two threads of which exactly one computes at a time, handing over a baton. A fiber that
// reaches an all-to-all wait passes the baton to the other one unconditionally (unless that one
// has finished), gets it back when the other reaches its own next wait or ends, and only then
// waits for its exchange, which was in flight meanwhile. The hand-over points are therefore fixed
// by the code, never by timing: F computes up to its first all-to-all, B up to its first, F
// waits for its first and computes up to its second, and so on until one half ends. The MoE posts
// the same sequence of exchanges whatever the data (counts, rows, records, gate gradients; zero
// counts included), and all ranks of an ep group sit at the same pipeline rank, so they run the
// same instruction list and post the F and B exchanges on the ep communicator in the same order,
// as collectives must. (Passing the baton only when the exchange is not done yet would make the
// order depend on timing, and ranks would post F's next exchange and B's in different orders.)
// Numerics are the sequential FB's bit for bit: the halves touch different chunks (different
// parameters, saved activations, weight caches), each op sees the same inputs, the executor's
// maps are only touched under the baton (a mutex hand-over orders the memory), and the per-half
// non-finite FP8 group counts are added back into *ctx_.

class PipelineExecutor::Baton {
 public:
  void acquire(int me) {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return turn_ == me; });
  }
  // Hands the baton to the other fiber unless it has finished; returns holding it again. False
  // when the other fiber has failed (this one should stop at its next chance).
  bool pass(int me) {
    std::unique_lock<std::mutex> lk(mu_);
    if (!finished_[1 - me]) {
      turn_ = 1 - me;
      cv_.notify_all();
      cv_.wait(lk, [&] { return turn_ == me; });
    }
    return !failed_[1 - me];
  }
  void finish(int me, bool ok) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      finished_[me] = true;
      failed_[me] = !ok;
      if (!ok && first_failed_ < 0) first_failed_ = me;
      turn_ = 1 - me;
    }
    cv_.notify_all();
  }

  // The fiber whose error came first (the other may then fail only for that reason), or -1.
  int first_failed() {
    std::lock_guard<std::mutex> lk(mu_);
    return first_failed_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int turn_ = 0;  // the forward starts, as in the sequential FB
  bool finished_[2] = {false, false};
  bool failed_[2] = {false, false};
  int first_failed_ = -1;
};

Status PipelineExecutor::run_half(const Half& h, Baton* baton, int me, int64_t* nonfinite) {
  model::ModelCtx c = *ctx_;
  c.nonfinite_groups = 0;
  const CommExpertComm* traced =
      h.dir < static_cast<int>(traced_ep_.size()) ? &traced_ep_[h.dir] : nullptr;
  if (traced) c.ep = &traced_ep_[h.dir];
  double begin = tracer_ ? tracer_->now_us() : 0;
  const auto close_slice = [&] {  // at the post of the exchange waited for: posting is comm work
    if (!tracer_) return;
    double end = tracer_->now_us();
    if (traced && traced->last_post_us() >= begin) end = std::min(end, traced->last_post_us());
    tracer_->phase(h.label, "compute", "compute", begin, end, trace_step_);
  };
  if (tracer_ || baton) {
    c.await = [&, outer = ctx_->await](const model::ExpertComm::Done& d) -> Status {
      close_slice();
      const bool other_ok = baton ? baton->pass(me) : true;
      Status s = outer ? outer(d) : d();  // the exchange was in flight during the other's slice
      if (tracer_) begin = tracer_->now_us();
      if (s.ok() && !other_ok)
        return FP8_ERROR(Code::kAborted, "the other half of the FB instruction failed");
      return s;
    };
  }
  Status s = h.work(c);
  close_slice();
  *nonfinite += c.nonfinite_groups;
  return s;
}

Status PipelineExecutor::run_fb(const Half& f, const Half& b) {
  Baton baton;
  Status st[2];
  int64_t nonfinite[2] = {0, 0};
  const Half* halves[2] = {&f, &b};
  auto fiber = [&](int me) {
    baton.acquire(me);
    st[me] = run_half(*halves[me], &baton, me, &nonfinite[me]);
    baton.finish(me, st[me].ok());
  };
  std::thread helper(fiber, 1);  // the backward; this thread runs the forward
  fiber(0);
  helper.join();
  ctx_->nonfinite_groups += nonfinite[0] + nonfinite[1];
  const int bad = baton.first_failed();
  if (bad >= 0) return st[bad].with_context(bad == 0 ? "forward half" : "backward half");
  return Status::Ok();
}

Status PipelineExecutor::compute(const Instr& in, const BatchFn& batch, float loss_scale) {
  const Half fwd{in.dir, fmt::format("F{}d{}", in.mb, in.dir),
                 [&](model::ModelCtx& c) { return forward(c, batch, in.mb, in.dir, in.stage); }};
  int64_t nonfinite = 0;
  Status s;
  switch (in.op) {
    case Op::kF:
      s = run_half(fwd, nullptr, 0, &nonfinite);
      break;
    case Op::kB:
      s = run_half({in.dir, instr_label(in),
                    [&](model::ModelCtx& c) {
                      return backward(c, in.mb, in.dir, in.stage, in.defer_w, loss_scale);
                    }},
                   nullptr, 0, &nonfinite);
      if (s.ok()) s = flush_grads(in.dir);
      break;
    case Op::kW:
      s = run_half({in.dir, instr_label(in),
                    [&](model::ModelCtx& c) { return weight(c, in.mb, in.dir, in.stage); }},
                   nullptr, 0, &nonfinite);
      if (s.ok()) s = flush_grads(in.dir);
      break;
    case Op::kFB: {
      const Half bwd{in.dir_b, fmt::format("B{}d{}", in.mb_b, in.dir_b), [&](model::ModelCtx& c) {
                       return backward(c, in.mb_b, in.dir_b, in.stage_b, false, loss_scale);
                     }};
      // Fibers when there are all-to-alls to overlap and the halves are on two chunks (always
      // so for DualPipe and DualPipeV).
      if (fb_overlap_ && ctx_->ep && in.dir != in.dir_b) {
        s = run_fb(fwd, bwd);
      } else {
        s = run_half(fwd, nullptr, 0, &nonfinite);
        if (s.ok()) s = run_half(bwd, nullptr, 1, &nonfinite);
      }
      if (s.ok()) s = flush_grads(in.dir_b);
      break;
    }
    default:
      return FP8_ERROR(Code::kInternal, "{} is not a compute instruction", instr_label(in));
  }
  ctx_->nonfinite_groups += nonfinite;
  return s;
}

Result<const P2pPlan*> PipelineExecutor::plan() {
  if (!matched_ || !pp_) return nullptr;
  if (plan_sched_ != sched_) {
    FP8_ASSIGN_OR_RETURN(plan_, plan_p2p_groups(*sched_, /*early_sends=*/true));
    plan_sched_ = sched_;
  }
  return &plan_;
}

int PipelineExecutor::last_grad_instr(const Schedule& s, int rank, int dir) {
  const auto& list = s.rank_instrs[rank];
  for (int i = static_cast<int>(list.size()) - 1; i >= 0; --i) {
    const Instr& in = list[i];
    if (((in.op == Op::kB || in.op == Op::kW) && in.dir == dir) ||
        (in.op == Op::kFB && in.dir_b == dir))
      return i;
  }
  return -1;
}

Result<ExecutorStats> PipelineExecutor::run(const BatchFn& batch, float loss_scale) {
  FP8_RETURN_IF_ERROR(env_error_);
  stats_ = {};
  ctx_->loss_scale = loss_scale;  // MoE balance-loss gradients on stages without the head
  outbox_.clear();                // a run that failed may have left some
  trace_run_.clear(), trace_recv_end_.clear();
  const std::vector<P2pPoint>* points = nullptr;
  FP8_ASSIGN_OR_RETURN(const P2pPlan* plan, this->plan());
  if (plan) points = &plan->ranks[rank_];
  const auto& list = sched_->rank_instrs[rank_];
  last_compute_ = -1;
  for (int i = 0; i < static_cast<int>(list.size()); ++i)
    if (!list[i].is_comm()) last_compute_ = i;
  std::vector<int> last_grad(chunks_.size(), -1);  // where chunk_final goes
  if (hooks_.chunk_final) {
    for (size_t d = 0; d < chunks_.size(); ++d)
      last_grad[d] = last_grad_instr(*sched_, rank_, static_cast<int>(d));
  }
  std::vector<int> first_use(chunks_.size(), -1);  // where chunk_first goes
  if (hooks_.chunk_first) {
    for (int i = static_cast<int>(list.size()) - 1; i >= 0; --i) {
      const Instr& in = list[i];
      if (in.is_comm()) continue;
      first_use[in.dir] = i;
      if (in.op == Op::kFB) first_use[in.dir_b] = i;
    }
  }
  bool computed = false;
  size_t next_point = 0;
  auto reach = [&](int i) -> Status {  // runs the plan's point at instruction i, if any
    if (!points || next_point >= points->size() || (*points)[next_point].at != i)
      return Status::Ok();
    return run_point((*points)[next_point++], batch);
  };
  for (int i = 0; i < static_cast<int>(list.size()); ++i) {
    const Instr& in = list[i];
    FP8_RETURN_IF_ERROR(reach(i));
    for (size_t d = 0; d < first_use.size(); ++d) {  // the chunk's weights land (ZeRO-1 overlap)
      if (first_use[d] != i) continue;
      const double w0 = tracer_ ? tracer_->now_us() : 0;
      Status h = hooks_.chunk_first(static_cast<int>(d), computed);
      if (!h.ok())
        return h.with_context(fmt::format("pipeline rank {} at {}", rank_, instr_label(in)));
      if (tracer_)
        tracer_->interval(fmt::format("weights {}", d), "zero1", w0, tracer_->now_us(),
                          trace_step_);
    }
    if (!in.is_comm()) computed = true;
    const double t0 = tracer_ ? tracer_->now_us() : 0;
    Status s;
    switch (in.op) {
      case Op::kF:
      case Op::kB:
      case Op::kW:
      case Op::kFB:
        s = compute(in, batch, loss_scale);
        break;
      case Op::kSendAct:
      case Op::kSendGrad:
        s = send(in, i);
        break;
      case Op::kRecvAct:
      case Op::kRecvGrad:
        if (!points) s = recv(in, batch);  // else posted and waited at its plan point
        break;
    }
    if (s.ok() && !in.is_comm() && hooks_.chunk_final) {
      for (size_t d = 0; d < last_grad.size() && s.ok(); ++d)
        if (last_grad[d] == i) s = hooks_.chunk_final(static_cast<int>(d), i < last_compute_);
    }
    if (!s.ok())
      return s.with_context(fmt::format("pipeline rank {} at {}", rank_, instr_label(in)));
    if (tracer_ && points && in.is_comm()) trace_run_.push_back({i, t0});
    if (tracer_ && (!points || !in.is_comm())) {
      // Compute ops on the compute row; a receive's wait and a send's post on comm (with matched
      // groups: recorded at the plan point, in instruction order, trace_comm_run).
      const double t1 = tracer_->now_us();
      const bool send = in.op == Op::kSendAct || in.op == Op::kSendGrad;
      if (send)
        tracer_->instant(instr_label(in), "comm", t0, trace_step_);
      else
        tracer_->interval(instr_label(in), in.is_comm() ? "comm" : "compute", t0, t1, trace_step_);
    }
  }
  FP8_RETURN_IF_ERROR(reach(static_cast<int>(list.size())));
  trace_comm_run();
  if (!outbox_.empty()) {
    outbox_.clear();
    return FP8_ERROR(Code::kInternal, "pipeline rank {}: sends left unposted by the plan", rank_);
  }
  for (auto& [w, t] : pending_) FP8_RETURN_IF_ERROR(w.wait());
  pending_.clear();
  return stats_;
}

}  // namespace fp8pipe::parallel
