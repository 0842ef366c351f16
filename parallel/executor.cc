#include "parallel/executor.h"

#include <fmt/format.h>

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
                                   int64_t hidden)
    : sched_(s), rank_(pp_rank), pp_(pp), chunks_(std::move(chunks)), ctx_(ctx), hidden_(hidden) {}

int PipelineExecutor::local_next_dir(int stream, int stage, int step) const {
  const int next = stage + step;
  if (next < 0 || next >= sched_.stages()) return -1;
  const int d = sched_.dir_of(stream, next);
  return sched_.rank_of(d, next) == rank_ ? d : -1;
}

Status PipelineExecutor::forward(const BatchFn& batch, int mb, int dir, int stage) {
  model::Model& m = *chunks_[dir];
  const int stream = sched_.stream_of(dir);
  const model::MicroBatch& b = batch(stream, mb);
  Tensor x;
  if (stage == 0) {
    FP8_ASSIGN_OR_RETURN(x, m.embed_forward(*ctx_, mb, b));
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
    FP8_ASSIGN_OR_RETURN(x, m.block(i).forward(*ctx_, mb, x, b.B, b.T));
  }
  if (is_last(stage)) {
    FP8_ASSIGN_OR_RETURN(auto lp, m.head_forward(*ctx_, mb, x, b));
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

Status PipelineExecutor::backward(int mb, int dir, int stage, bool defer_w, float loss_scale) {
  model::Model& m = *chunks_[dir];
  Tensor d;
  if (is_last(stage)) {
    FP8_ASSIGN_OR_RETURN(d, m.head_backward_input(*ctx_, mb, loss_scale));
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
    FP8_ASSIGN_OR_RETURN(d, m.block(i).backward_input(*ctx_, mb, d));
  }
  if (!defer_w) FP8_RETURN_IF_ERROR(weight(mb, dir, stage));
  if (stage == 0) return m.embed_backward(*ctx_, mb, d);
  const int pd = local_next_dir(sched_.stream_of(dir), stage, -1);
  if (pd >= 0)
    grad_in_[{pd, mb}] = d;
  else
    grad_out_[{dir, mb}] = d;
  return Status::Ok();
}

Status PipelineExecutor::weight(int mb, int dir, int stage) {
  model::Model& m = *chunks_[dir];
  if (is_last(stage)) FP8_RETURN_IF_ERROR(m.head_backward_weight(*ctx_, mb));
  for (int i = m.num_blocks() - 1; i >= 0; --i) {
    FP8_RETURN_IF_ERROR(m.block(i).backward_weight(*ctx_, mb));
  }
  return Status::Ok();
}

void PipelineExecutor::flush_grads(int dir) {
  auto flush = [](model::Param* p, Tensor& grad) {
    float* g = grad.data_as<float>();  // host memory (the CPU backend)
    const int64_t n = grad.numel();
    if (static_cast<int64_t>(p->grad_acc.size()) != n) p->grad_acc.assign(n, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      p->grad_acc[i] += g[i];
      g[i] = 0.0f;
    }
  };
  for (model::Param* p : chunks_[dir]->params()) flush(p, p->grad);
  for (auto [p, grad] : chunks_[dir]->extra_grads()) flush(p, *grad);
}

// Tag of a message, unique within a step: (kind, stream, sender stage, micro-batch).
Result<int> PipelineExecutor::tag_of(const Instr& in) const {
  const Transfer t = transfer_of(sched_, rank_, in);
  const int64_t tag =
      ((static_cast<int64_t>(t.grad) * sched_.streams() + t.stream) * sched_.stages() +
       t.src_stage) *
          sched_.mb_per_stream() +
      t.mb;
  if (tag > 32767) {  // the MPI standard guarantees tags up to 32767
    return FP8_INVALID("pipeline message tag {} exceeds 32767 (stages={}, microbatches={})", tag,
                       sched_.stages(), sched_.microbatches);
  }
  return static_cast<int>(tag);
}

Status PipelineExecutor::send(const Instr& in) {
  auto& from = in.op == Op::kSendAct ? act_out_ : grad_out_;
  auto it = from.find({in.dir, in.mb});
  if (it == from.end() || !pp_) {
    return FP8_ERROR(Code::kInternal, "{}: nothing to send on rank {}", instr_label(in), rank_);
  }
  FP8_ASSIGN_OR_RETURN(int tag, tag_of(in));
  Tensor t = it->second;
  from.erase(it);
  pending_.push_back({pp_->send(t.data(), t.numel(), DataType::kFloat32, in.peer, tag), t});
  return Status::Ok();
}

Status PipelineExecutor::recv(const Instr& in, const BatchFn& batch) {
  if (!pp_) return FP8_ERROR(Code::kInternal, "{}: no pipeline communicator", instr_label(in));
  const model::MicroBatch& b = batch(sched_.stream_of(in.dir), in.mb);
  FP8_ASSIGN_OR_RETURN(Tensor t, ctx_->be->empty({b.B * b.T, hidden_}, DType::kF32));
  FP8_ASSIGN_OR_RETURN(int tag, tag_of(in));
  FP8_RETURN_IF_ERROR(pp_->recv(t.data(), t.numel(), DataType::kFloat32, in.peer, tag).wait());
  (in.op == Op::kRecvAct ? act_in_ : grad_in_)[{in.dir, in.mb}] = t;
  return Status::Ok();
}

Result<ExecutorStats> PipelineExecutor::run(const BatchFn& batch, float loss_scale) {
  stats_ = {};
  ctx_->loss_scale = loss_scale;  // MoE balance-loss gradients on stages without the head
  for (const Instr& in : sched_.rank_instrs[rank_]) {
    const double t0 = tracer_ ? tracer_->now_us() : 0;
    Status s;
    switch (in.op) {
      case Op::kF:
        s = forward(batch, in.mb, in.dir, in.stage);
        break;
      case Op::kB:
        s = backward(in.mb, in.dir, in.stage, in.defer_w, loss_scale);
        flush_grads(in.dir);
        break;
      case Op::kW:
        s = weight(in.mb, in.dir, in.stage);
        flush_grads(in.dir);
        break;
      case Op::kFB:
        s = forward(batch, in.mb, in.dir, in.stage);
        if (s.ok()) s = backward(in.mb_b, in.dir_b, in.stage_b, false, loss_scale);
        flush_grads(in.dir_b);
        break;
      case Op::kSendAct:
      case Op::kSendGrad:
        s = send(in);
        break;
      case Op::kRecvAct:
      case Op::kRecvGrad:
        s = recv(in, batch);
        break;
    }
    if (!s.ok())
      return s.with_context(fmt::format("pipeline rank {} at {}", rank_, instr_label(in)));
    if (tracer_) {  // compute ops on the compute row; a receive's wait and a send's post on comm
      const double t1 = tracer_->now_us();
      const bool send = in.op == Op::kSendAct || in.op == Op::kSendGrad;
      if (send)
        tracer_->instant(instr_label(in), "comm", t0, trace_step_);
      else
        tracer_->interval(instr_label(in), in.is_comm() ? "comm" : "compute", t0, t1, trace_step_);
    }
  }
  for (auto& [w, t] : pending_) FP8_RETURN_IF_ERROR(w.wait());
  pending_.clear();
  return stats_;
}

}  // namespace fp8pipe::parallel
