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
  // Inference: x [n, hidden] at positions past..past+n-1 with the earlier keys and values in
  // `cache` (Attention::forward_cached); a MoE sees the n rows as one sequence.
  Result<Tensor> forward_cached(ModelCtx& c, int mb, const Tensor& x, AttnCache& cache,
                                int64_t past);
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
