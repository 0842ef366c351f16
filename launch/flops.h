// FLOPs of the model per token, written out so the logged TFLOP/s, the benchmark and (later) the
// simulator's cost model agree. Forward = 2 x active weights touched per token + causal attention
// (average T/2 keys per query); a training step costs 3 x forward (dgrad and wgrad each repeat the
// forward's GEMMs; the attention core's backward is twice its forward).
#pragma once

#include <cstdint>

#include "configs/fp8pipe.pb.h"

namespace fp8pipe {

struct FlopBreakdown {
  double attn_proj = 0;  // attention projections (per token, forward, one block)
  double attn_core = 0;  // QK^T and PV (per token, forward, one block, causal)
  double dense_ffn = 0;  // dense SwiGLU (per token, forward, one block)
  double moe_ffn = 0;    // router + top-k routed + shared experts (per token, forward, one block)
  double head = 0;       // output head (per prediction, forward)
  double forward = 0;    // whole model incl. MTP, per token, forward
  double train() const { return 3 * forward; }
};

FlopBreakdown flops_per_token(const config::Model& m, int64_t seq_len);

}  // namespace fp8pipe
