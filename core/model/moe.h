// DeepSeek-V3 mixture of experts: shared experts (always on) + routed experts chosen per token by
// sigmoid affinity + balancing bias among node-limited expert groups; gates normalised over the
// selected experts times route_scale; optional sequence-wise balance loss; optional capacity
// factor with counted drops. Phases: route, dispatch (all-to-all to the experts' owners over
// ModelCtx::ep, flat or two-level), experts, combine (the transpose); each wait on an exchange
// goes through ModelCtx::wait so an FB pair can compute the other chunk meanwhile (DESIGN.md §5).
// With expert parallelism a rank holds only its routed experts (params() lists those).
#pragma once

#include <array>

#include "configs/fp8pipe.pb.h"
#include "core/model/layers.h"

namespace fp8pipe::model {

struct MoeStepStats {
  std::vector<int64_t> load;    // tokens routed to each expert since reset (after drops)
  int64_t dropped = 0;          // token-expert assignments dropped by the capacity factor
  double aux_loss = 0;          // sum of sequence-wise balance losses added to the loss
  int64_t tokens = 0;           // token rows this rank dispatched
  int64_t cross_node_rows = 0;  // token rows this rank sent to another node (dispatch only)
  // The ep all-to-all's token rows this rank sent to other ep ranks, and their bytes (codes and
  // scales for FP8 rows; not the routing records or counts), by leg: forward dispatch and
  // combine, then the backward's output gradient (to the experts) and input gradient (back).
  enum Leg { kDispatch, kCombine, kGradDispatch, kGradCombine, kLegs };
  std::array<int64_t, kLegs> a2a_rows{}, a2a_bytes{};
};

class MoE {
 public:
  Status init(ModelCtx& c, const std::string& prefix, const config::Model& m, uint64_t seed);
  // x [B*T, hidden] -> [B*T, hidden]. The balance loss (if alpha > 0) is part of the objective:
  // its gradient is added inside backward_input; its value is reported in stats().
  Result<Tensor> forward(ModelCtx& c, int mb, const Tensor& x, int64_t B, int64_t T);
  Result<Tensor> backward_input(ModelCtx& c, int mb, const Tensor& dy);
  Status backward_weight(ModelCtx& c, int mb);
  // Releases and restores what the router and the shared experts keep of x for their weight
  // gradients, for a caller that recomputes x (train.recompute=rmsnorm). The routed experts
  // keep their own dispatched rows.
  Status drop_input(int mb);
  Status restore_input(ModelCtx& c, int mb, const Tensor& x);
  std::vector<Param*> params();  // router, shared and routed experts (not the bias)
  Param& bias();                 // e_score_correction_bias [E]: updated by the balancing rule
  MoeStepStats& stats();
  void reset_stats();

 private:
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

}  // namespace fp8pipe::model
