// Self-attention of a block: MLA (DeepSeek-V3 multi-head latent attention: low-rank compressed Q
// and KV with RMSNorms on the latents, per-head no-RoPE parts, one decoupled RoPE key shared by
// all heads, causal softmax) or plain MHA (config choice for small tests). The projections are FP8
// Linears under FP8 precision; the attention core stays fp32 (FP8.md §1.1).
#pragma once

#include <span>

#include "configs/fp8pipe.pb.h"
#include "core/model/layers.h"

namespace fp8pipe::model {

// RoPE of the model's attention: model.rope_theta, with YaRN when model.rope_scaling.factor > 1.
kernels::RopeSpec rope_spec(const config::Model& m);

// Keys and values of one attention layer for the positions decoded so far (inference:
// Attention::forward_cached, core/model/decode.h), [capacity, width] each, allocated at first use.
//   latent (MLA, DeepSeek-V3's inference form): k holds [kv_norm(c_kv) | RoPE(k_rope)] per
//     position (kv_lora_rank + rope dims, v unused); queries are absorbed through wkv_b's key part
//     and the output through its value part, so every head attends to one shared latent head.
//   heads (MHA; MLA with latent = false): k [.., H*dk] and v [.., H*vdim] per position, exactly
//     the training forward's keys and values.
// Held as fp32 or bf16 (`dtype`; rounded to nearest even as appended, widened exactly as read).
struct AttnCache {
  int64_t capacity = 0;
  bool latent = true;
  DType dtype = DType::kF32;
  Tensor k, v;
  int64_t bytes_per_position() const;  // 0 before first use
};

// One sequence's rows of a decoding call (Attention::forward_cached).
struct CachedSeq {
  AttnCache* cache = nullptr;
  int64_t past = 0, rows = 0;
};

class Attention {
 public:
  // prefix e.g. "layers.3.attn"; parameter names follow DeepSeek-V3's checkpoint
  // (wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo; MHA: wq, wk, wv, wo).
  Status init(ModelCtx& c, const std::string& prefix, const config::Model& m, uint64_t seed);
  // x [B*T, hidden] -> [B*T, hidden]; the position of row r is r % T.
  Result<Tensor> forward(ModelCtx& c, int mb, const Tensor& x, int64_t B, int64_t T);
  Result<Tensor> backward_input(ModelCtx& c, int mb, const Tensor& dy);
  Status backward_weight(ModelCtx& c, int mb);
  std::vector<Param*> params();
  // Inference: the rows of x [n, hidden] are the sequences' in order, each `rows` positions
  // past..past+rows-1 of a sequence whose earlier keys and values are in its cache; appends theirs
  // and returns the attention output [n, hidden]. The projections run once over all rows, the
  // core per sequence. Keeps no state for a backward (mb: the inference key, kInferenceMb).
  Result<Tensor> forward_cached(ModelCtx& c, int mb, const Tensor& x,
                                std::span<const CachedSeq> seqs);
  // Releases and restores the input the projections reading x keep for their weight gradients
  // (one shared operand), for a caller that recomputes x (train.recompute=rmsnorm). Restore
  // before backward_input: without a q latent, mla_up_proj's recompute reads it.
  Status drop_input(int mb);
  Status restore_input(ModelCtx& c, int mb, const Tensor& x);

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace fp8pipe::model
