// One transformer block: x + Attn(RMSNorm(x)), then + FFN(RMSNorm(.)) where the FFN is a dense
// SwiGLU (the first dense_layers blocks) or the MoE. The residual stream stays fp32.
#pragma once

#include <memory>

#include "core/model/attention.h"
#include "core/model/moe.h"

namespace fp8pipe::model {

class Block {
 public:
  // moe = use the MoE FFN (else a dense SwiGLU of ffn_hidden).
  Status init(ModelCtx& c, const std::string& prefix, const config::Model& m, bool moe,
              uint64_t seed);
  Result<Tensor> forward(ModelCtx& c, int mb, const Tensor& x, int64_t B, int64_t T);
  // Inference: the sequences' rows of x [n, hidden] over their caches (Attention::forward_cached);
  // the MoE routes the n rows as one batch (per-token, so the same result).
  Result<Tensor> forward_cached(ModelCtx& c, int mb, const Tensor& x,
                                std::span<const CachedSeq> seqs);
  Result<Tensor> backward_input(ModelCtx& c, int mb, const Tensor& dy);
  Status backward_weight(ModelCtx& c, int mb);
  std::vector<Param*> params();
  MoE* moe() { return moe_.get(); }  // null for dense blocks

 private:
  // x + a, then + FFN(RMSNorm(x + a)): the block's second half after the attention output a.
  Result<Tensor> ffn_half(ModelCtx& c, int mb, const Tensor& x, const Tensor& a, int64_t B,
                          int64_t T);
  RMSNorm attn_norm_, ffn_norm_;
  Attention attn_;
  std::unique_ptr<SwiGLU> dense_;
  std::unique_ptr<MoE> moe_;
};

}  // namespace fp8pipe::model
