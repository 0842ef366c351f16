#include "core/model/linear.h"

namespace fp8pipe::model {

Status Linear::init(ModelCtx& c, const std::string& name, int64_t in, int64_t out, uint64_t seed,
                    float std, bool fp8, bool expert) {
  in_ = in;
  out_ = out;
  fp8_ = fp8;
  w_.expert = expert;
  return init_param(*c.be, w_, name, {out, in}, seed, std);
}

Status Linear::refresh_weight_cache(ModelCtx& c) {
  if (cached_version_ == c.weight_version && (wq_.defined() || wb_.defined())) {
    return Status::Ok();
  }
  if (use_fp8(c)) {
    int64_t bad = 0;
    FP8_ASSIGN_OR_RETURN(wq_, c.be->quantize(w_.value, Granularity::k128x128, c.qp,
                                             c.count_nonfinite ? &bad : nullptr));
    FP8_ASSIGN_OR_RETURN(wq_t_, c.be->transpose_fp8(wq_));
    c.nonfinite_groups += bad;
  } else if (bf16_path(c)) {
    FP8_ASSIGN_OR_RETURN(wb_, c.be->empty({out_, in_}, DType::kBF16));
    FP8_RETURN_IF_ERROR(c.be->cast(w_.value, wb_));
  }
  cached_version_ = c.weight_version;
  return Status::Ok();
}

Result<Tensor> Linear::weight_operand(ModelCtx& c, bool dgrad) {
  FP8_RETURN_IF_ERROR(refresh_weight_cache(c));
  if (use_fp8(c)) return dgrad ? wq_t_ : wq_;
  return bf16_path(c) ? wb_ : w_.value;
}

namespace {

// A GEMM operand's fp32 values: FP8 dequantized, bf16 widened, fp32 itself.
Result<Tensor> operand_f32(ModelCtx& c, const Tensor& t) {
  if (t.dtype() == DType::kF32) return t;
  FP8_ASSIGN_OR_RETURN(Tensor f, new_f32(c, t.rows(), t.cols()));
  FP8_RETURN_IF_ERROR(is_fp8(t.dtype()) ? c.be->dequantize(t, f) : c.be->cast(t, f));
  return f;
}

}  // namespace

Result<Tensor> Linear::forward_weight_f32(ModelCtx& c) {
  FP8_ASSIGN_OR_RETURN(Tensor w, weight_operand(c, false));
  return operand_f32(c, w);
}

Result<Tensor> Linear::input_values_f32(ModelCtx& c, const Tensor& x) {
  FP8_ASSIGN_OR_RETURN(Tensor p, prepare_input(c, x));
  return operand_f32(c, p);
}

// GEMM of a [n, k] with b ([m, k] when trans_b, else [k, m]), both fp32 or both bf16, into fp32;
// the result rounded to bf16 values unless FP32.
Result<Tensor> Linear::gemm_out(ModelCtx& c, const Tensor& a, const Tensor& b, bool trans_b) {
  const int64_t m = trans_b ? b.rows() : b.cols();
  FP8_ASSIGN_OR_RETURN(Tensor y, new_f32(c, a.rows(), m));
  FP8_RETURN_IF_ERROR(c.be->gemm(a, false, b, trans_b, y));
  if (c.precision != Precision::kFP32) FP8_RETURN_IF_ERROR(c.be->round_bf16(y, y));
  return y;
}

Result<Tensor> Linear::prepare_input(ModelCtx& c, const Tensor& x) {
  if (x.cols() != in_) {
    return FP8_INVALID("{}: input has {} features, layer expects {}", w_.name, x.cols(), in_);
  }
  if (use_fp8(c)) {
    int64_t bad = 0;
    FP8_ASSIGN_OR_RETURN(Tensor xq, c.be->quantize(x, Granularity::k1x128, c.qp,
                                                   c.count_nonfinite ? &bad : nullptr));
    c.nonfinite_groups += bad;
    return xq;
  }
  if (bf16_path(c)) {  // bf16 operands (half the saved bytes), fp32 accumulation
    FP8_ASSIGN_OR_RETURN(Tensor xb, c.be->empty({x.rows(), in_}, DType::kBF16));
    FP8_RETURN_IF_ERROR(c.be->cast(x, xb));
    return xb;
  }
  return x;  // activations are not modified in place by callers
}

Result<Tensor> Linear::forward(ModelCtx& c, int mb, const Tensor& x) {
  FP8_ASSIGN_OR_RETURN(Tensor p, prepare_input(c, x));
  return forward_prepared(c, mb, x, p);
}

Result<Tensor> Linear::forward_prepared(ModelCtx& c, int mb, const Tensor& x,
                                        const Tensor& prepared) {
  if (x.cols() != in_ || prepared.rows() != x.rows()) {
    return FP8_INVALID("{}: input {} / prepared {} do not fit a layer of {} features", w_.name,
                       x.describe(), prepared.describe(), in_);
  }
  FP8_RETURN_IF_ERROR(refresh_weight_cache(c));
  Saved& s = saved_.put(mb);
  s = Saved{};
  (use_fp8(c) ? s.xq : s.x) = prepared;
  s.version = c.weight_version;
  return output(c, s);
}

Result<Tensor> Linear::output(ModelCtx& c, const Saved& s) {
  if (use_fp8(c)) {
    FP8_ASSIGN_OR_RETURN(Tensor y, new_f32(c, s.xq.rows(), out_));
    FP8_RETURN_IF_ERROR(c.be->gemm_fp8(s.xq, wq_, y, c.gemm));
    FP8_RETURN_IF_ERROR(c.be->round_bf16(y, y));
    return y;
  }
  return gemm_out(c, s.x, bf16_path(c) ? wb_ : w_.value, true);
}

Result<Tensor> Linear::recompute(ModelCtx& c, int mb) {
  FP8_ASSIGN_OR_RETURN(Saved * s, saved_.get(mb, w_.name.c_str()));
  if (s->version != c.weight_version) {
    return FP8_ERROR(Code::kInternal,
                     "{}: recompute of micro-batch {} after a weight update (version {} -> {})",
                     w_.name, mb, s->version, c.weight_version);
  }
  FP8_RETURN_IF_ERROR(refresh_weight_cache(c));
  return output(c, *s);
}

Status Linear::drop_input(int mb) {
  FP8_ASSIGN_OR_RETURN(Saved * s, saved_.get(mb, w_.name.c_str()));
  s->x = s->xq = s->xt = Tensor();
  return Status::Ok();
}

Status Linear::restore_input(ModelCtx& c, int mb, const Tensor& x) {
  FP8_ASSIGN_OR_RETURN(Tensor p, prepare_input(c, x));
  return restore_prepared(mb, p);
}

Status Linear::restore_prepared(int mb, const Tensor& prepared) {
  FP8_ASSIGN_OR_RETURN(Saved * s, saved_.get(mb, w_.name.c_str()));
  (is_fp8(prepared.dtype()) ? s->xq : s->x) = prepared;  // as forward_prepared keeps it
  return Status::Ok();
}

Status Linear::restore_wgrad_operand(ModelCtx& c, int mb, const Tensor& x) {
  if (!use_fp8(c)) return restore_input(c, mb, x);
  FP8_ASSIGN_OR_RETURN(Saved * s, saved_.get(mb, w_.name.c_str()));
  int64_t bad = 0;
  FP8_ASSIGN_OR_RETURN(s->xt,
                       c.be->quantize_transposed(x, c.qp, c.count_nonfinite ? &bad : nullptr));
  c.nonfinite_groups += bad;
  s->x = s->xq = Tensor();
  return Status::Ok();
}

Result<Tensor> Linear::held_fp8_input(int mb) {
  FP8_ASSIGN_OR_RETURN(Saved * s, saved_.get(mb, w_.name.c_str()));
  return s->xq;
}

Result<Tensor> Linear::apply(ModelCtx& c, const Tensor& x) {
  constexpr int kScratch = -1;
  FP8_ASSIGN_OR_RETURN(Tensor y, forward(c, kScratch, x));
  saved_.erase(kScratch);
  return y;
}

Result<Tensor> Linear::backward_input(ModelCtx& c, int mb, const Tensor& dy) {
  FP8_ASSIGN_OR_RETURN(Saved * s, saved_.get(mb, w_.name.c_str()));
  FP8_RETURN_IF_ERROR(refresh_weight_cache(c));
  s->dy = dy;
  if (use_fp8(c)) {
    int64_t bad = 0;
    FP8_ASSIGN_OR_RETURN(Tensor dyq, c.be->quantize(dy, Granularity::k1x128, c.qp,
                                                    c.count_nonfinite ? &bad : nullptr));
    c.nonfinite_groups += bad;
    FP8_ASSIGN_OR_RETURN(Tensor dx, new_f32(c, dy.rows(), in_));
    FP8_RETURN_IF_ERROR(c.be->gemm_fp8(dyq, wq_t_, dx, c.gemm));
    FP8_RETURN_IF_ERROR(c.be->round_bf16(dx, dx));
    return dx;
  }
  if (bf16_path(c)) {
    FP8_ASSIGN_OR_RETURN(Tensor dyb, c.be->empty({dy.rows(), out_}, DType::kBF16));
    FP8_RETURN_IF_ERROR(c.be->cast(dy, dyb));
    s->dy = dyb;
    return gemm_out(c, dyb, wb_, false);
  }
  return gemm_out(c, dy, w_.value, false);
}

Result<Tensor> Linear::weight_grad_input(ModelCtx& c, int mb) {
  FP8_ASSIGN_OR_RETURN(Saved * s, saved_.get(mb, w_.name.c_str()));
  if (!use_fp8(c)) return s->x;
  if (s->xt.defined()) return s->xt;  // restore_wgrad_operand
  // DeepSeek: dequantize the cached 1x128 X, re-quantize as 128x1 (written transposed), in one
  // pass on a device (Backend::requantize_transposed).
  int64_t bad = 0;
  FP8_ASSIGN_OR_RETURN(
      Tensor xt, c.be->requantize_transposed(s->xq, c.qp, c.count_nonfinite ? &bad : nullptr));
  c.nonfinite_groups += bad;
  return xt;
}

Status Linear::backward_weight(ModelCtx& c, int mb) {
  FP8_ASSIGN_OR_RETURN(Tensor xo, weight_grad_input(c, mb));
  return backward_weight(c, mb, xo);
}

Status Linear::backward_weight(ModelCtx& c, int mb, const Tensor& x_operand) {
  FP8_ASSIGN_OR_RETURN(Saved * s, saved_.get(mb, w_.name.c_str()));
  if (!s->dy.defined()) {
    return FP8_ERROR(Code::kInternal, "{}: backward_weight before backward_input (mb {})", w_.name,
                     mb);
  }
  if (use_fp8(c)) {
    int64_t bad = 0;
    FP8_ASSIGN_OR_RETURN(
        Tensor dyt, c.be->quantize_transposed(s->dy, c.qp, c.count_nonfinite ? &bad : nullptr));
    c.nonfinite_groups += bad;
    FP8_ASSIGN_OR_RETURN(Tensor dw, new_f32(c, out_, in_));
    FP8_RETURN_IF_ERROR(c.be->gemm_fp8(dyt, x_operand, dw, c.gemm));
    FP8_RETURN_IF_ERROR(c.be->axpy(1.0f, dw, w_.grad));
  } else {
    // grad += dY^T X (fp32 accumulation straight into the main gradient).
    FP8_RETURN_IF_ERROR(c.be->gemm(s->dy, true, x_operand, false, w_.grad, 1.0f, 1.0f));
  }
  saved_.erase(mb);
  return Status::Ok();
}

}  // namespace fp8pipe::model
