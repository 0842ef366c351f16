#include "launch/flops.h"

namespace fp8pipe {

FlopBreakdown flops_per_token(const config::Model& m, int64_t seq_len) {
  FlopBreakdown f;
  const double d = m.hidden(), H = m.heads();
  double dqk = 0, dv = 0;
  if (m.attention() == config::Model::MLA) {
    const auto& a = m.mla();
    dqk = a.qk_nope_head_dim() + a.qk_rope_head_dim();
    dv = a.v_head_dim();
    const double q =
        a.q_lora_rank() > 0 ? d * a.q_lora_rank() + a.q_lora_rank() * H * dqk : d * H * dqk;
    const double kv = d * (a.kv_lora_rank() + a.qk_rope_head_dim()) +
                      a.kv_lora_rank() * H * (a.qk_nope_head_dim() + dv);
    f.attn_proj = 2 * (q + kv + H * dv * d);
  } else {
    dqk = dv = m.head_dim();
    f.attn_proj = 2 * 4 * d * H * dqk;
  }
  f.attn_core = 2 * (seq_len / 2.0) * H * (dqk + dv);
  f.dense_ffn = 2 * 3 * d * m.ffn_hidden();
  const auto& e = m.moe();
  if (e.routed_experts() > 0) {
    f.moe_ffn = 2 * (d * e.routed_experts() +
                     (e.topk() + e.shared_experts()) * 3.0 * d * e.expert_hidden());
  }
  f.head = 2 * d * m.vocab_size();
  const bool moe = e.routed_experts() > 0;
  const int dense = moe ? m.dense_layers() : m.layers();
  const double block_attn = f.attn_proj + f.attn_core;
  f.forward =
      m.layers() * block_attn + dense * f.dense_ffn + (m.layers() - dense) * f.moe_ffn + f.head;
  // Each MTP depth: the 2d -> d projection, one block (MoE when the model has MoE), the head.
  const double mtp_block = block_attn + (moe ? f.moe_ffn : f.dense_ffn);
  f.forward += m.mtp_depth() * (2 * 2 * d * d + mtp_block + f.head);
  return f;
}

}  // namespace fp8pipe
