#include "core/model/block.h"

namespace fp8pipe::model {

Status Block::init(ModelCtx& c, const std::string& prefix, const config::Model& m, bool moe,
                   uint64_t seed) {
  FP8_RETURN_IF_ERROR(attn_norm_.init(c, prefix + ".attn_norm.weight", m.hidden(), m.norm_eps(),
                                      seed, /*bf16_input=*/false, /*residual=*/true));
  FP8_RETURN_IF_ERROR(ffn_norm_.init(c, prefix + ".ffn_norm.weight", m.hidden(), m.norm_eps(), seed,
                                     /*bf16_input=*/false, /*residual=*/true));
  FP8_RETURN_IF_ERROR(attn_.init(c, prefix + ".attn", m, seed));
  if (moe) {
    moe_ = std::make_unique<MoE>();
    return moe_->init(c, prefix + ".ffn", m, seed);
  }
  dense_ = std::make_unique<SwiGLU>();
  return dense_->init(c, prefix + ".ffn", m.hidden(), m.ffn_hidden(), seed, m.init_std());
}

Result<Tensor> Block::forward(ModelCtx& c, int mb, const Tensor& x, int64_t B, int64_t T) {
  FP8_ASSIGN_OR_RETURN(Tensor xn, attn_norm_.forward(c, mb, x));
  FP8_ASSIGN_OR_RETURN(Tensor a, attn_.forward(c, mb, xn, B, T));
  if (c.recompute_norm) FP8_RETURN_IF_ERROR(attn_.drop_input(mb));  // rebuilt from x in B
  return ffn_half(c, mb, x, a, B, T);
}

Result<Tensor> Block::forward_cached(ModelCtx& c, int mb, const Tensor& x,
                                     std::span<const CachedSeq> seqs) {
  FP8_ASSIGN_OR_RETURN(Tensor xn, attn_norm_.forward(c, mb, x));
  FP8_ASSIGN_OR_RETURN(Tensor a, attn_.forward_cached(c, mb, xn, seqs));
  return ffn_half(c, mb, x, a, 1, x.rows());
}

Result<Tensor> Block::ffn_half(ModelCtx& c, int mb, const Tensor& x, const Tensor& a, int64_t B,
                               int64_t T) {
  FP8_ASSIGN_OR_RETURN(Tensor h, new_f32(c, x.rows(), x.cols()));
  FP8_RETURN_IF_ERROR(c.be->add(x, a, h));
  FP8_ASSIGN_OR_RETURN(Tensor hn, ffn_norm_.forward(c, mb, h));
  Tensor f;
  if (moe_) {
    FP8_ASSIGN_OR_RETURN(f, moe_->forward(c, mb, hn, B, T));
  } else {
    FP8_ASSIGN_OR_RETURN(f, dense_->forward(c, mb, hn));
  }
  if (c.recompute_norm) {  // rebuilt from h in B
    FP8_RETURN_IF_ERROR(moe_ ? moe_->drop_input(mb) : dense_->drop_input(mb));
  }
  FP8_ASSIGN_OR_RETURN(Tensor out, new_f32(c, x.rows(), x.cols()));
  FP8_RETURN_IF_ERROR(c.be->add(h, f, out));
  return out;
}

Result<Tensor> Block::backward_input(ModelCtx& c, int mb, const Tensor& dy) {
  // out = h + ffn(norm(h)): dh = dy + norm'(ffn'(dy)); h = x + attn(norm(x)): dx likewise.
  if (c.recompute_norm) {  // the FFN's normed input again, before its backward reads it
    FP8_ASSIGN_OR_RETURN(Tensor hn, ffn_norm_.recompute(c, mb));
    FP8_RETURN_IF_ERROR(moe_ ? moe_->restore_input(c, mb, hn) : dense_->restore_input(c, mb, hn));
  }
  Tensor df;
  if (moe_) {
    FP8_ASSIGN_OR_RETURN(df, moe_->backward_input(c, mb, dy));
  } else {
    FP8_ASSIGN_OR_RETURN(df, dense_->backward_input(c, mb, dy));
  }
  FP8_ASSIGN_OR_RETURN(Tensor dh, ffn_norm_.backward(c, mb, df));
  FP8_RETURN_IF_ERROR(c.be->axpy(1.0f, dy, dh));
  if (c.recompute_norm) {
    FP8_ASSIGN_OR_RETURN(Tensor xn, attn_norm_.recompute(c, mb));
    FP8_RETURN_IF_ERROR(attn_.restore_input(c, mb, xn));
  }
  FP8_ASSIGN_OR_RETURN(Tensor da, attn_.backward_input(c, mb, dh));
  FP8_ASSIGN_OR_RETURN(Tensor dx, attn_norm_.backward(c, mb, da));
  FP8_RETURN_IF_ERROR(c.be->axpy(1.0f, dh, dx));
  return dx;
}

Status Block::backward_weight(ModelCtx& c, int mb) {
  FP8_RETURN_IF_ERROR(attn_.backward_weight(c, mb));
  return moe_ ? moe_->backward_weight(c, mb) : dense_->backward_weight(c, mb);
}

std::vector<Param*> Block::params() {
  std::vector<Param*> ps = {&attn_norm_.weight(), &ffn_norm_.weight()};
  for (Param* p : attn_.params()) ps.push_back(p);
  for (Param* p : moe_ ? moe_->params() : dense_->params()) ps.push_back(p);
  return ps;
}

}  // namespace fp8pipe::model
