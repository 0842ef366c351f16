#include "core/model/layers.h"

namespace fp8pipe::model {

Status RMSNorm::init(ModelCtx& c, const std::string& name, int64_t dim, float eps, uint64_t seed,
                     bool bf16_input, bool residual) {
  eps_ = eps;
  bf16_input_ = bf16_input;
  residual_ = residual;
  w_.decay = false;
  return init_param(*c.be, w_, name, {dim}, seed, 0.0f, 1.0f);
}

Result<Tensor> RMSNorm::forward(ModelCtx& c, int mb, const Tensor& x) {
  Saved& s = saved_.put(mb);
  Tensor in = x;  // what the norm reads
  if (bf16_input_) {
    FP8_ASSIGN_OR_RETURN(s.x, hold_bf16(c, x));  // the same values
  } else if (residual_ && c.bf16_norm_inputs) {
    FP8_ASSIGN_OR_RETURN(s.x, hold_bf16(c, x));  // rounded: read as such too
    FP8_ASSIGN_OR_RETURN(in, held_f32(c, s.x));
  } else {
    s.x = x;
  }
  FP8_ASSIGN_OR_RETURN(s.rstd, c.be->empty({x.rows()}, DType::kF32));
  FP8_ASSIGN_OR_RETURN(Tensor y, new_f32(c, x.rows(), x.cols()));
  FP8_RETURN_IF_ERROR(c.be->rmsnorm_fwd(in, w_.value, eps_, y, s.rstd));
  return y;
}

Result<Tensor> RMSNorm::recompute(ModelCtx& c, int mb) {
  FP8_ASSIGN_OR_RETURN(Saved * s, saved_.get(mb, w_.name.c_str()));
  FP8_ASSIGN_OR_RETURN(Tensor x, held_f32(c, s->x));
  FP8_ASSIGN_OR_RETURN(Tensor rstd, c.be->empty({x.rows()}, DType::kF32));
  FP8_ASSIGN_OR_RETURN(Tensor y, new_f32(c, x.rows(), x.cols()));
  FP8_RETURN_IF_ERROR(c.be->rmsnorm_fwd(x, w_.value, eps_, y, rstd));
  return y;
}

Result<Tensor> RMSNorm::backward(ModelCtx& c, int mb, const Tensor& dy) {
  FP8_ASSIGN_OR_RETURN(Saved * s, saved_.get(mb, w_.name.c_str()));
  FP8_ASSIGN_OR_RETURN(Tensor x, held_f32(c, s->x));
  FP8_ASSIGN_OR_RETURN(Tensor dx, new_f32(c, dy.rows(), dy.cols()));
  FP8_RETURN_IF_ERROR(c.be->rmsnorm_bwd(dy, x, w_.value, s->rstd, dx, w_.grad));
  saved_.erase(mb);
  return dx;
}

Status Embedding::init(ModelCtx& c, const std::string& name, int64_t vocab, int64_t dim,
                       uint64_t seed, float std) {
  w_.decay = true;
  return init_param(*c.be, w_, name, {vocab, dim}, seed, std);
}

Result<Tensor> Embedding::forward(ModelCtx& c, int mb, const Tensor& ids) {
  ids_.put(mb) = ids;
  FP8_ASSIGN_OR_RETURN(Tensor y, new_f32(c, ids.numel(), w_.value.cols()));
  FP8_RETURN_IF_ERROR(c.be->embedding_fwd(w_.value, ids, y));
  return y;
}

Status Embedding::backward(ModelCtx& c, int mb, const Tensor& dy, Tensor* grad) {
  FP8_ASSIGN_OR_RETURN(Tensor * ids, ids_.get(mb, w_.name.c_str()));
  FP8_RETURN_IF_ERROR(c.be->embedding_bwd_acc(dy, *ids, grad ? *grad : w_.grad));
  ids_.erase(mb);
  return Status::Ok();
}

Status SwiGLU::init(ModelCtx& c, const std::string& name, int64_t dim, int64_t hidden,
                    uint64_t seed, float std, bool expert, bool in_moe) {
  in_moe_ = in_moe;
  FP8_RETURN_IF_ERROR(w1_.init(c, name + ".w1.weight", dim, hidden, seed, std, true, expert));
  FP8_RETURN_IF_ERROR(w3_.init(c, name + ".w3.weight", dim, hidden, seed, std, true, expert));
  return w2_.init(c, name + ".w2.weight", hidden, dim, seed, std, true, expert);
}

Result<Tensor> SwiGLU::forward(ModelCtx& c, int mb, const Tensor& x) {
  Saved& s = saved_.put(mb);
  // w1 and w3 read the same x: one quantization (or bf16 rounding) for both
  FP8_ASSIGN_OR_RETURN(Tensor xp, w1_.prepare_input(c, x));
  FP8_ASSIGN_OR_RETURN(s.g, w1_.forward_prepared(c, mb, x, xp));
  FP8_ASSIGN_OR_RETURN(s.u, w3_.forward_prepared(c, mb, x, xp));
  FP8_ASSIGN_OR_RETURN(Tensor h, new_f32(c, x.rows(), s.g.cols()));
  FP8_RETURN_IF_ERROR(c.be->swiglu_fwd(s.g, s.u, h));
  if (c.precision != Precision::kFP32) FP8_RETURN_IF_ERROR(c.be->round_bf16(h, h));
  if (cached(c)) {  // g and u as FP8 until the backward, which recomputes h for w2's gradient
    FP8_ASSIGN_OR_RETURN(s.g, hold_fp8(c, s.g));
    FP8_ASSIGN_OR_RETURN(s.u, hold_fp8(c, s.u));
    FP8_ASSIGN_OR_RETURN(Tensor y, w2_.forward(c, mb, h));
    FP8_RETURN_IF_ERROR(w2_.drop_input(mb));
    return y;
  }
  FP8_ASSIGN_OR_RETURN(s.g, hold_bf16(c, s.g));  // held as bf16 until the backward
  FP8_ASSIGN_OR_RETURN(s.u, hold_bf16(c, s.u));
  return w2_.forward(c, mb, h);
}

Result<Tensor> SwiGLU::backward_input(ModelCtx& c, int mb, const Tensor& dy) {
  FP8_ASSIGN_OR_RETURN(Saved * s, saved_.get(mb, "swiglu"));
  FP8_ASSIGN_OR_RETURN(Tensor dh, w2_.backward_input(c, mb, dy));
  // Peak bytes: the held g, u go once widened, and the cache's fp32 h once quantized, before
  // dg and du exist.
  FP8_ASSIGN_OR_RETURN(Tensor g, held_f32(c, s->g));
  FP8_ASSIGN_OR_RETURN(Tensor u, held_f32(c, s->u));
  const bool cached = is_fp8(s->g.dtype());
  s->g = Tensor();
  s->u = Tensor();
  if (cached) {  // w2's input again, from the FP8 values of g and u
    FP8_ASSIGN_OR_RETURN(Tensor h, new_f32(c, g.rows(), g.cols()));
    FP8_RETURN_IF_ERROR(c.be->swiglu_fwd(g, u, h));
    FP8_RETURN_IF_ERROR(c.be->round_bf16(h, h));
    FP8_RETURN_IF_ERROR(w2_.restore_input(c, mb, h));
  }
  FP8_ASSIGN_OR_RETURN(Tensor dg, new_f32(c, dh.rows(), dh.cols()));
  FP8_ASSIGN_OR_RETURN(Tensor du, new_f32(c, dh.rows(), dh.cols()));
  FP8_RETURN_IF_ERROR(c.be->swiglu_bwd(dh, g, u, dg, du));
  g = Tensor();
  u = Tensor();
  if (c.precision != Precision::kFP32) {
    FP8_RETURN_IF_ERROR(c.be->round_bf16(dg, dg));
    FP8_RETURN_IF_ERROR(c.be->round_bf16(du, du));
  }
  FP8_ASSIGN_OR_RETURN(Tensor dx, w1_.backward_input(c, mb, dg));
  FP8_ASSIGN_OR_RETURN(Tensor dx3, w3_.backward_input(c, mb, du));
  FP8_RETURN_IF_ERROR(c.be->axpy(1.0f, dx3, dx));
  saved_.erase(mb);
  return dx;
}

Status SwiGLU::drop_input(int mb) {
  FP8_RETURN_IF_ERROR(w1_.drop_input(mb));
  return w3_.drop_input(mb);
}

Status SwiGLU::restore_input(ModelCtx& c, int mb, const Tensor& x) {
  FP8_ASSIGN_OR_RETURN(Tensor xp, w1_.prepare_input(c, x));
  FP8_RETURN_IF_ERROR(w1_.restore_prepared(mb, xp));
  return w3_.restore_prepared(mb, xp);
}

Status SwiGLU::backward_weight(ModelCtx& c, int mb) {
  // w1 and w3 saved the same input: one weight-gradient operand (FP8: 128x1 re-quantization)
  FP8_ASSIGN_OR_RETURN(Tensor xo, w1_.weight_grad_input(c, mb));
  FP8_RETURN_IF_ERROR(w1_.backward_weight(c, mb, xo));
  FP8_RETURN_IF_ERROR(w3_.backward_weight(c, mb, xo));
  return w2_.backward_weight(c, mb);
}

}  // namespace fp8pipe::model
