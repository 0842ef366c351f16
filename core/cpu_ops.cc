// The CPU backend's model operators: the shared shape checks (core/op_checks.h), the host-side
// index range checks, then the kernels/cpu/ops.h loops. Split from cpu_backend.cc to keep one
// concept per file; CpuOps is mixed into CpuBackend.
#include "core/cpu_ops.h"

#include "core/op_checks.h"
#include "kernels/cpu/ops.h"

namespace fp8pipe {
namespace k = kernels;

Status CpuOps::embedding_fwd(const Tensor& table, const Tensor& ids, Tensor& out) {
  FP8_RETURN_IF_ERROR(checks::embedding_fwd(table, ids, out));
  const int32_t* id = ids.data_as<int32_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    if (id[i] < 0 || id[i] >= table.rows()) return checks::bad_token_id(i, id[i], table.rows());
  }
  k::embedding_fwd(table.data_as<float>(), id, ids.numel(), table.cols(), out.data_as<float>());
  return Status::Ok();
}

Status CpuOps::embedding_bwd_acc(const Tensor& dout, const Tensor& ids, Tensor& dtable) {
  FP8_RETURN_IF_ERROR(checks::embedding_bwd_acc(dout, ids, dtable));
  k::embedding_bwd_acc(dout.data_as<float>(), ids.data_as<int32_t>(), ids.numel(), dtable.cols(),
                       dtable.data_as<float>());
  return Status::Ok();
}

Status CpuOps::rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd) {
  FP8_RETURN_IF_ERROR(checks::rmsnorm_fwd(x, w, y, rstd));
  k::rmsnorm_fwd(x.data_as<float>(), w.data_as<float>(), x.rows(), x.cols(), eps,
                 y.data_as<float>(), rstd.data_as<float>());
  return Status::Ok();
}

Status CpuOps::rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                           Tensor& dx, Tensor& dw_acc) {
  FP8_RETURN_IF_ERROR(checks::rmsnorm_bwd(dy, x, w, rstd, dx, dw_acc));
  k::rmsnorm_bwd(dy.data_as<float>(), x.data_as<float>(), w.data_as<float>(), rstd.data_as<float>(),
                 x.rows(), x.cols(), dx.data_as<float>(), dw_acc.data_as<float>());
  return Status::Ok();
}

Status CpuOps::rope(Tensor& x, const Tensor& pos, int64_t heads, const k::RopeSpec& r,
                    bool inverse) {
  FP8_RETURN_IF_ERROR(checks::rope(x, pos, heads));
  const int64_t d = x.cols() / heads;
  const std::vector<double> freq = k::rope_frequencies(r, d);
  k::rope(x.data_as<float>(), pos.data_as<int32_t>(), x.rows(), heads, d, freq.data(),
          k::rope_magnitude(r), inverse);
  return Status::Ok();
}

Status CpuOps::attention_fwd(const Tensor& q, const Tensor& kk, const Tensor& v, int64_t B,
                             int64_t T, int64_t H, float scale, Tensor& o, Tensor& lse) {
  FP8_RETURN_IF_ERROR(checks::attention_fwd(q, kk, v, B, T, H, o, lse));
  if (B * T * H == 0) return Status::Ok();
  const int64_t dk = q.numel() / (B * T * H), dv = v.numel() / (B * T * H);
  k::attention_fwd(q.data_as<float>(), kk.data_as<float>(), v.data_as<float>(), B, T, H, dk, dv,
                   scale, o.data_as<float>(), lse.data_as<float>());
  return Status::Ok();
}

Status CpuOps::attention_cached(const Tensor& q, const Tensor& kk, const Tensor& v, int64_t H,
                                int64_t G, int64_t dv, float scale, Tensor& o) {
  FP8_RETURN_IF_ERROR(checks::attention_cached(q, kk, v, H, G, dv, o));
  if (q.rows() == 0) return Status::Ok();
  if (kk.dtype() == DType::kBF16) {
    k::attention_cached(q.data_as<float>(), kk.data_as<uint16_t>(), v.data_as<uint16_t>(), q.rows(),
                        kk.rows(), H, G, q.cols() / H, dv, v.cols(), scale, o.data_as<float>());
  } else {
    k::attention_cached(q.data_as<float>(), kk.data_as<float>(), v.data_as<float>(), q.rows(),
                        kk.rows(), H, G, q.cols() / H, dv, v.cols(), scale, o.data_as<float>());
  }
  return Status::Ok();
}

Status CpuOps::attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& kk, const Tensor& v,
                             const Tensor& o, const Tensor& lse, int64_t B, int64_t T, int64_t H,
                             float scale, Tensor& dq, Tensor& dk, Tensor& dv) {
  FP8_RETURN_IF_ERROR(checks::attention_bwd(dout, q, kk, v, o, lse, B, T, H, dq, dk, dv));
  if (B * T * H == 0) return Status::Ok();
  const int64_t dkk = q.numel() / (B * T * H), dvv = v.numel() / (B * T * H);
  k::attention_bwd(dout.data_as<float>(), q.data_as<float>(), kk.data_as<float>(),
                   v.data_as<float>(), o.data_as<float>(), lse.data_as<float>(), B, T, H, dkk, dvv,
                   scale, dq.data_as<float>(), dk.data_as<float>(), dv.data_as<float>());
  return Status::Ok();
}

Status CpuOps::causal_softmax(const Tensor& s, Tensor& p, Tensor& lse, bool recompute) {
  FP8_RETURN_IF_ERROR(checks::causal_softmax(s, p, lse));
  k::causal_softmax(s.data_as<float>(), s.rows(), s.cols(), p.data_as<float>(),
                    lse.data_as<float>(), recompute);
  return Status::Ok();
}

Status CpuOps::softmax_bwd(const Tensor& p, const Tensor& dp, Tensor& ds) {
  FP8_RETURN_IF_ERROR(checks::softmax_bwd(p, dp, ds));
  k::softmax_bwd(p.data_as<float>(), dp.data_as<float>(), p.rows(), p.cols(), ds.data_as<float>());
  return Status::Ok();
}

Status CpuOps::swiglu_fwd(const Tensor& g, const Tensor& u, Tensor& h) {
  FP8_RETURN_IF_ERROR(checks::swiglu_fwd(g, u, h));
  k::swiglu_fwd(g.data_as<float>(), u.data_as<float>(), g.numel(), h.data_as<float>());
  return Status::Ok();
}

Status CpuOps::swiglu_bwd(const Tensor& dh, const Tensor& g, const Tensor& u, Tensor& dg,
                          Tensor& du) {
  FP8_RETURN_IF_ERROR(checks::swiglu_bwd(dh, g, u, dg, du));
  k::swiglu_bwd(dh.data_as<float>(), g.data_as<float>(), u.data_as<float>(), g.numel(),
                dg.data_as<float>(), du.data_as<float>());
  return Status::Ok();
}

Status CpuOps::cross_entropy_fwd(const Tensor& logits, const Tensor& targets, Tensor& loss) {
  FP8_RETURN_IF_ERROR(checks::cross_entropy_fwd(logits, targets, loss));
  const int32_t* t = targets.data_as<int32_t>();
  for (int64_t i = 0; i < targets.numel(); ++i) {
    if (t[i] >= logits.cols()) return checks::bad_target(i, t[i], logits.cols());
  }
  k::cross_entropy_fwd(logits.data_as<float>(), t, logits.rows(), logits.cols(),
                       loss.data_as<float>());
  return Status::Ok();
}

Status CpuOps::cross_entropy_bwd(const Tensor& logits, const Tensor& targets, float row_scale,
                                 Tensor& dlogits) {
  FP8_RETURN_IF_ERROR(checks::cross_entropy_bwd(logits, targets, dlogits));
  k::cross_entropy_bwd(logits.data_as<float>(), targets.data_as<int32_t>(), logits.rows(),
                       logits.cols(), row_scale, dlogits.data_as<float>());
  return Status::Ok();
}

Status CpuOps::router_topk(const Tensor& logits, const Tensor& bias, int64_t topk, int64_t n_groups,
                           int64_t max_groups, float route_scale, Tensor& scores, Tensor& idx,
                           Tensor& gates) {
  FP8_RETURN_IF_ERROR(
      checks::router_topk(logits, bias, topk, n_groups, max_groups, scores, idx, gates));
  k::router_topk(logits.data_as<float>(), bias.data_as<float>(), logits.rows(), logits.cols(), topk,
                 n_groups, max_groups, route_scale, scores.data_as<float>(), idx.data_as<int32_t>(),
                 gates.data_as<float>());
  return Status::Ok();
}

Status CpuOps::sort_assignments(const Tensor& idx, int64_t E, Tensor& order, Tensor& rows,
                                Tensor& slot, Tensor& counts) {
  FP8_RETURN_IF_ERROR(checks::sort_assignments(idx, E, order, rows, slot, counts));
  const int32_t* id = idx.data_as<int32_t>();
  for (int64_t a = 0; a < idx.numel(); ++a) {
    if (id[a] < 0 || id[a] >= E) {
      return FP8_INVALID("sort_assignments: assignment {} names expert {} (experts: 0..{})", a,
                         id[a], E - 1);
    }
  }
  k::sort_assignments(id, idx.rows(), idx.cols(), E, order.data_as<int32_t>(),
                      rows.data_as<int32_t>(), slot.data_as<int32_t>(), counts.data_as<int32_t>());
  return Status::Ok();
}

Status CpuOps::router_grad(const Tensor& scores, const Tensor& idx, const Tensor& gates,
                           const Tensor& dgate, const Tensor& slot, const Tensor& f,
                           const kernels::RouterGradParams& p, Tensor& dlogits) {
  FP8_RETURN_IF_ERROR(checks::router_grad(scores, idx, gates, dgate, slot, f, p, dlogits));
  const double* dg = dgate.data_as<double>();
  const int32_t* sl = slot.defined() ? slot.data_as<int32_t>() : nullptr;
  for (int64_t t = 0; t < p.B * p.T; ++t) {
    const int64_t a0 = t * p.K;
    auto dgate_at = [&](int64_t k) { return dg[sl ? sl[a0 + k] : a0 + k]; };
    k::router_grad_row(scores.data_as<float>() + t * p.E, idx.data_as<int32_t>() + a0,
                       gates.data_as<float>() + a0, dgate_at,
                       p.alpha != 0.0f ? f.data_as<double>() + (t / p.T) * p.E : nullptr, p,
                       dlogits.data_as<float>() + t * p.E);
  }
  return Status::Ok();
}

Status CpuOps::balance_stats(const Tensor& scores, const Tensor& idx, int64_t B, int64_t T,
                             float alpha, Tensor& f, Tensor& loss) {
  FP8_RETURN_IF_ERROR(checks::balance_stats(scores, idx, B, T, f, loss));
  const int64_t E = scores.cols(), K = idx.cols();
  const float* s = scores.data_as<float>();
  double* fo = f.data_as<double>();
  std::vector<double> S(B * T), P(B * E);
  for (int64_t t = 0; t < B * T; ++t) S[t] = k::score_sum(s + t * E, E);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t e = 0; e < E; ++e) {
      fo[b * E + e] = k::balance_count(idx.data_as<int32_t>() + b * T * K, T, K, E, e);
      P[b * E + e] = k::balance_share(s + b * T * E, S.data() + b * T, T, E, e);
    }
  }
  loss.data_as<double>()[0] += k::balance_value(fo, P.data(), B, E, alpha);
  return Status::Ok();
}

Status CpuOps::gather_rows(const Tensor& in, const Tensor& rows, Tensor& out) {
  FP8_RETURN_IF_ERROR(checks::gather_rows(in, rows, out));
  FP8_RETURN_IF_ERROR(checks::row_indices("gather_rows", "rows", rows, 0, in.rows()));
  k::gather_rows(in.data_as<float>(), rows.data_as<int32_t>(), rows.numel(), in.cols(),
                 out.data_as<float>());
  return Status::Ok();
}

Status CpuOps::gather_rows_scaled(const Tensor& in, const Tensor& rows, const Tensor& w,
                                  Tensor& out) {
  FP8_RETURN_IF_ERROR(checks::gather_rows_scaled(in, rows, w, out));
  FP8_RETURN_IF_ERROR(checks::row_indices("gather_rows_scaled", "rows", rows, -1, in.rows()));
  k::gather_rows_scaled(in.data_as<float>(), rows.data_as<int32_t>(),
                        w.defined() ? w.data_as<float>() : nullptr, rows.numel(), in.cols(),
                        out.data_as<float>());
  return Status::Ok();
}

Status CpuOps::scatter_add_rows(const Tensor& in, const Tensor& rows, const Tensor& w,
                                Tensor& out) {
  FP8_RETURN_IF_ERROR(checks::scatter_add_rows(in, rows, w, out));
  FP8_RETURN_IF_ERROR(checks::row_indices("scatter_add_rows", "rows", rows, 0, out.rows()));
  k::scatter_add_rows(in.data_as<float>(), rows.data_as<int32_t>(),
                      w.defined() ? w.data_as<float>() : nullptr, rows.numel(), out.cols(),
                      out.data_as<float>());
  return Status::Ok();
}

Status CpuOps::add(const Tensor& a, const Tensor& b, Tensor& out) {
  FP8_RETURN_IF_ERROR(checks::add(a, b, out));
  if (a.dtype() == DType::kF64) {
    k::add(a.data_as<double>(), b.data_as<double>(), a.numel(), out.data_as<double>());
  } else {
    k::add(a.data_as<float>(), b.data_as<float>(), a.numel(), out.data_as<float>());
  }
  return Status::Ok();
}

Status CpuOps::axpy(float alpha, const Tensor& x, Tensor& y) {
  FP8_RETURN_IF_ERROR(checks::axpy(x, y));
  k::axpy(alpha, x.data_as<float>(), x.numel(), y.data_as<float>());
  return Status::Ok();
}

Status CpuOps::axpy_batch(float alpha, const Tensor& x, std::span<Tensor* const> ys) {
  FP8_RETURN_IF_ERROR(checks::axpy_batch(x, ys));
  const int64_t n = ys[0]->numel();
  for (size_t z = 0; z < ys.size(); ++z) {
    k::axpy(alpha, x.data_as<float>() + z * n, n, ys[z]->data_as<float>());
  }
  return Status::Ok();
}

Status CpuOps::round_bf16(const Tensor& x, Tensor& out) {
  FP8_RETURN_IF_ERROR(checks::round_bf16(x, out));
  k::round_bf16(x.data_as<float>(), x.numel(), out.data_as<float>());
  return Status::Ok();
}

}  // namespace fp8pipe
