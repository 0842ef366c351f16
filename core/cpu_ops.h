// The CPU backend's model operators (kernels/cpu/ops.h behind Tensor shape checks). CpuBackend
// (core/cpu_backend.cc) derives from this; it is a separate class only to keep files small.
#pragma once

#include "core/backend.h"

namespace fp8pipe {

class CpuOps : public Backend {
 public:
  Status embedding_fwd(const Tensor& table, const Tensor& ids, Tensor& out) override;
  Status embedding_bwd_acc(const Tensor& dout, const Tensor& ids, Tensor& dtable) override;
  Status rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd) override;
  Status rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                     Tensor& dx, Tensor& dw_acc) override;
  Status rope(Tensor& x, const Tensor& pos, int64_t heads, const kernels::RopeSpec& r,
              bool inverse) override;
  Status attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, int64_t B, int64_t T,
                       int64_t H, float scale, Tensor& o, Tensor& lse) override;
  Status attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& o, const Tensor& lse, int64_t B, int64_t T, int64_t H,
                       float scale, Tensor& dq, Tensor& dk, Tensor& dv) override;
  Status attention_cached(const Tensor& q, const Tensor& k, const Tensor& v, int64_t H, int64_t G,
                          int64_t dv, float scale, Tensor& o) override;
  Status causal_softmax(const Tensor& s, Tensor& p, Tensor& lse, bool recompute) override;
  Status softmax_bwd(const Tensor& p, const Tensor& dp, Tensor& ds) override;
  Status swiglu_fwd(const Tensor& g, const Tensor& u, Tensor& h) override;
  Status swiglu_bwd(const Tensor& dh, const Tensor& g, const Tensor& u, Tensor& dg,
                    Tensor& du) override;
  Status cross_entropy_fwd(const Tensor& logits, const Tensor& targets, Tensor& loss) override;
  Status cross_entropy_bwd(const Tensor& logits, const Tensor& targets, float row_scale,
                           Tensor& dlogits) override;
  Status router_topk(const Tensor& logits, const Tensor& bias, int64_t topk, int64_t n_groups,
                     int64_t max_groups, float route_scale, Tensor& scores, Tensor& idx,
                     Tensor& gates) override;
  Status sort_assignments(const Tensor& idx, int64_t E, Tensor& order, Tensor& rows, Tensor& slot,
                          Tensor& counts) override;
  Status router_grad(const Tensor& scores, const Tensor& idx, const Tensor& gates,
                     const Tensor& dgate, const Tensor& slot, const Tensor& f,
                     const kernels::RouterGradParams& p, Tensor& dlogits) override;
  Status balance_stats(const Tensor& scores, const Tensor& idx, int64_t B, int64_t T, float alpha,
                       Tensor& f, Tensor& loss) override;
  Status gather_rows(const Tensor& in, const Tensor& rows, Tensor& out) override;
  Status gather_rows_scaled(const Tensor& in, const Tensor& rows, const Tensor& w,
                            Tensor& out) override;
  Status scatter_add_rows(const Tensor& in, const Tensor& rows, const Tensor& w,
                          Tensor& out) override;
  Status add(const Tensor& a, const Tensor& b, Tensor& out) override;
  Status axpy(float alpha, const Tensor& x, Tensor& y) override;
  Status axpy_batch(float alpha, const Tensor& x, std::span<Tensor* const> ys) override;
  Status round_bf16(const Tensor& x, Tensor& out) override;  // emulates bf16 storage
  // The optimizer ops (core/cpu_optim_ops.cc).
  Status accumulate_grad(Tensor& grad, Tensor& acc) override;
  Status round_f64(const Tensor& acc, Tensor& out) override;
  Status row_dot(const Tensor& a, const Tensor& b, Tensor& out) override;
  Status sum_squares(std::span<const Tensor* const> gs, double* total) override;
  Status adamw(Tensor& p, const Tensor& g, Tensor& m, Tensor& v,
               const kernels::AdamWScalars& s) override;
};

}  // namespace fp8pipe
