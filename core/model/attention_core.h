// The causal attention core, o = softmax(scale * q k^T) v per (sequence, head), in one of two
// implementations with the same inputs, outputs and saved state (o and lse [B*H*T]):
//   fused: Backend::attention_fwd / attention_bwd (one kernel; O(T) memory);
//   gemm:  batched GEMMs (Backend::gemm_batched, per sequence over its heads) around the causal
//          softmax ops, one sequence at a time: its [H*T, T] scores once forward, twice backward
//          (P recomputed from lse, then dP). On a GPU these are cuBLAS calls, far faster than the
//          fused fp32 kernel, at O(H*T^2) memory (precision.attention; auto: gemm on a GPU).
// Both compute in fp32; they agree within fp32 summation-order differences.
#pragma once

#include "core/model/module.h"

namespace fp8pipe::model {

struct AttnShape {
  int64_t B = 0, T = 0, H = 0;
  float scale = 1.0f;
};

// q, k [B*T, H*dk], v [B*T, H*dv] -> o [B*T, H*dv], lse [B*H*T].
Status attention_core_fwd(ModelCtx& c, const Tensor& q, const Tensor& k, const Tensor& v,
                          const AttnShape& a, Tensor& o, Tensor& lse);
// dq, dk, dv written (same shapes as q, k, v).
Status attention_core_bwd(ModelCtx& c, const Tensor& dout, const Tensor& q, const Tensor& k,
                          const Tensor& v, const Tensor& o, const Tensor& lse, const AttnShape& a,
                          Tensor& dq, Tensor& dk, Tensor& dv);

}  // namespace fp8pipe::model
