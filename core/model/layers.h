// Small layers of the model: RMSNorm, token embedding and the SwiGLU feed-forward network
// (DeepSeek naming: w1 gate, w3 up, w2 down). Each keeps its saved activations per micro-batch;
// backward_input and backward_weight are separate so the W pass can be deferred (zero-bubble).
#pragma once

#include "core/model/linear.h"

namespace fp8pipe::model {

class RMSNorm {
 public:
  Status init(ModelCtx& c, const std::string& name, int64_t dim, float eps, uint64_t seed);
  Result<Tensor> forward(ModelCtx& c, int mb, const Tensor& x);
  // dx; the weight gradient is accumulated at once (it is tiny, nothing to defer).
  Result<Tensor> backward(ModelCtx& c, int mb, const Tensor& dy);
  Param& weight() { return w_; }

 private:
  struct Saved {
    Tensor x, rstd;
  };
  Param w_;
  float eps_ = 1e-6f;
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
  Status init(ModelCtx& c, const std::string& name, int64_t dim, int64_t hidden, uint64_t seed,
              float std, bool expert = false);
  Result<Tensor> forward(ModelCtx& c, int mb, const Tensor& x);
  Result<Tensor> backward_input(ModelCtx& c, int mb, const Tensor& dy);
  Status backward_weight(ModelCtx& c, int mb);
  std::vector<Param*> params() { return {&w1_.weight(), &w3_.weight(), &w2_.weight()}; }

 private:
  struct Saved {
    Tensor g, u;  // inputs of the SwiGLU product (recomputing h is cheap), bf16 (hold_bf16)
  };
  Linear w1_, w3_, w2_;
  PerMicrobatch<Saved> saved_;
};

}  // namespace fp8pipe::model
