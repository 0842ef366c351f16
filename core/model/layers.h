// Small layers of the model: RMSNorm, token embedding and the SwiGLU feed-forward network
// (DeepSeek naming: w1 gate, w3 up, w2 down). Each keeps its saved activations per micro-batch;
// backward_input and backward_weight are separate so the W pass can be deferred (zero-bubble).
#pragma once

#include "core/model/linear.h"

namespace fp8pipe::model {

class RMSNorm {
 public:
  // bf16_input: x is always bf16-valued outside FP32 precision (a GEMM output, as MLA's latents
  // are), so it is held as bf16 (hold_bf16: the same values in half the bytes). residual: x is
  // the fp32 residual stream (a block's norms); under ModelCtx::bf16_norm_inputs the norm reads
  // x rounded to bf16 and holds that, so forward, recompute and backward see the same values.
  Status init(ModelCtx& c, const std::string& name, int64_t dim, float eps, uint64_t seed,
              bool bf16_input = false, bool residual = false);
  Result<Tensor> forward(ModelCtx& c, int mb, const Tensor& x);
  // dx; the weight gradient is accumulated at once (it is tiny, nothing to defer).
  Result<Tensor> backward(ModelCtx& c, int mb, const Tensor& dy);
  // The forward's output of micro-batch mb again from the kept input (train.recompute=rmsnorm):
  // the same op on the same x and weight, so the same bits.
  Result<Tensor> recompute(ModelCtx& c, int mb);
  Param& weight() { return w_; }

 private:
  struct Saved {
    Tensor x, rstd;
  };
  Param w_;
  float eps_ = 1e-6f;
  bool bf16_input_ = false, residual_ = false;
  PerMicrobatch<Saved> saved_;
};

class Embedding {
 public:
  Status init(ModelCtx& c, const std::string& name, int64_t vocab, int64_t dim, uint64_t seed,
              float std);
  Result<Tensor> forward(ModelCtx& c, int mb, const Tensor& ids);  // ids i32 [n] -> [n, dim]
  // table.grad (or *grad when given) += scatter(dy)
  Status backward(ModelCtx& c, int mb, const Tensor& dy, Tensor* grad = nullptr);
  Param& weight() { return w_; }

 private:
  Param w_;
  PerMicrobatch<Tensor> ids_;
};

class SwiGLU {
 public:
  // in_moe: the MoE's shared expert, whose g and u precision.fp8_swiglu_cache holds in FP8 (as
  // the routed experts'); a dense FFN holds them as bf16 either way (DeepSeek-V3 §3.3.3 caches
  // the MoE's SwiGLU inputs).
  Status init(ModelCtx& c, const std::string& name, int64_t dim, int64_t hidden, uint64_t seed,
              float std, bool expert = false, bool in_moe = false);
  Result<Tensor> forward(ModelCtx& c, int mb, const Tensor& x);
  Result<Tensor> backward_input(ModelCtx& c, int mb, const Tensor& dy);
  Status backward_weight(ModelCtx& c, int mb);
  // Releases and restores the input w1 and w3 keep for their weight gradients (one shared
  // operand), for a caller that recomputes x (train.recompute=rmsnorm).
  Status drop_input(int mb);
  Status restore_input(ModelCtx& c, int mb, const Tensor& x);
  std::vector<Param*> params() { return {&w1_.weight(), &w3_.weight(), &w2_.weight()}; }

 private:
  struct Saved {
    // Inputs of the SwiGLU product (recomputing h is cheap): bf16 (hold_bf16), or FP8 (hold_fp8)
    // with the cache, which then also drops w2's input h and rebuilds it in the backward.
    Tensor g, u;
  };
  bool cached(const ModelCtx& c) const {
    return in_moe_ && c.fp8_swiglu_cache && c.precision == Precision::kFP8;
  }
  Linear w1_, w3_, w2_;
  bool in_moe_ = false;
  PerMicrobatch<Saved> saved_;
};

}  // namespace fp8pipe::model
