// The CPU backend's model operators: shape checks on Tensors, then the kernels/cpu/ops.h loops.
// Split from cpu_backend.cc to keep one concept per file; CpuOps is mixed into CpuBackend.
#include "core/cpu_ops.h"

#include "kernels/cpu/ops.h"

namespace fp8pipe {
namespace k = kernels;

namespace {
Status need(bool ok, const char* op, const char* what, const Tensor& t) {
  if (ok) return Status::Ok();
  return FP8_INVALID("{}: {} (got {})", op, what, t.defined() ? t.describe() : "undefined");
}
Status f32(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    FP8_RETURN_IF_ERROR(need(t->dtype() == DType::kF32, op, "fp32 required", *t));
  return Status::Ok();
}
Status i32(const char* op, const Tensor& t) {
  return need(t.dtype() == DType::kI32, op, "i32 required", t);
}
Status same(const char* op, const Tensor& a, const Tensor& b) {
  return need(a.numel() == b.numel(), op, "element counts differ", b);
}
}  // namespace

Status CpuOps::embedding_fwd(const Tensor& table, const Tensor& ids, Tensor& out) {
  FP8_RETURN_IF_ERROR(f32("embedding_fwd", {&table, &out}));
  FP8_RETURN_IF_ERROR(i32("embedding_fwd", ids));
  const int64_t D = table.cols();
  FP8_RETURN_IF_ERROR(
      need(out.numel() == ids.numel() * D, "embedding_fwd", "out must be [n, D]", out));
  const int32_t* id = ids.data_as<int32_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    if (id[i] < 0 || id[i] >= table.rows()) {
      return FP8_INVALID("embedding_fwd: token id {} at position {} outside the vocabulary [0, {})",
                         id[i], i, table.rows());
    }
  }
  k::embedding_fwd(table.data_as<float>(), id, ids.numel(), D, out.data_as<float>());
  return Status::Ok();
}

Status CpuOps::embedding_bwd_acc(const Tensor& dout, const Tensor& ids, Tensor& dtable) {
  FP8_RETURN_IF_ERROR(f32("embedding_bwd", {&dout, &dtable}));
  FP8_RETURN_IF_ERROR(i32("embedding_bwd", ids));
  k::embedding_bwd_acc(dout.data_as<float>(), ids.data_as<int32_t>(), ids.numel(), dtable.cols(),
                       dtable.data_as<float>());
  return Status::Ok();
}

Status CpuOps::rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd) {
  FP8_RETURN_IF_ERROR(f32("rmsnorm_fwd", {&x, &w, &y, &rstd}));
  FP8_RETURN_IF_ERROR(
      need(w.numel() == x.cols(), "rmsnorm_fwd", "weight must have cols(x) elements", w));
  FP8_RETURN_IF_ERROR(same("rmsnorm_fwd", x, y));
  FP8_RETURN_IF_ERROR(
      need(rstd.numel() == x.rows(), "rmsnorm_fwd", "rstd must have rows(x) elements", rstd));
  k::rmsnorm_fwd(x.data_as<float>(), w.data_as<float>(), x.rows(), x.cols(), eps,
                 y.data_as<float>(), rstd.data_as<float>());
  return Status::Ok();
}

Status CpuOps::rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                           Tensor& dx, Tensor& dw_acc) {
  FP8_RETURN_IF_ERROR(f32("rmsnorm_bwd", {&dy, &x, &w, &rstd, &dx, &dw_acc}));
  FP8_RETURN_IF_ERROR(same("rmsnorm_bwd", x, dy));
  FP8_RETURN_IF_ERROR(same("rmsnorm_bwd", x, dx));
  k::rmsnorm_bwd(dy.data_as<float>(), x.data_as<float>(), w.data_as<float>(), rstd.data_as<float>(),
                 x.rows(), x.cols(), dx.data_as<float>(), dw_acc.data_as<float>());
  return Status::Ok();
}

Status CpuOps::rope(Tensor& x, const Tensor& pos, int64_t heads, float theta, bool inverse) {
  FP8_RETURN_IF_ERROR(f32("rope", {&x}));
  FP8_RETURN_IF_ERROR(i32("rope", pos));
  const int64_t d = x.cols() / heads;
  FP8_RETURN_IF_ERROR(
      need(d * heads == x.cols() && d % 2 == 0, "rope", "cols must be heads * even d", x));
  FP8_RETURN_IF_ERROR(need(pos.numel() == x.rows(), "rope", "one position per row", pos));
  k::rope(x.data_as<float>(), pos.data_as<int32_t>(), x.rows(), heads, d, theta, inverse);
  return Status::Ok();
}

Status CpuOps::attention_fwd(const Tensor& q, const Tensor& kk, const Tensor& v, int64_t B,
                             int64_t T, int64_t H, float scale, Tensor& o, Tensor& lse) {
  FP8_RETURN_IF_ERROR(f32("attention_fwd", {&q, &kk, &v, &o, &lse}));
  const int64_t dk = q.numel() / (B * T * H), dv = v.numel() / (B * T * H);
  FP8_RETURN_IF_ERROR(need(q.numel() == B * T * H * dk && kk.numel() == q.numel(), "attention_fwd",
                           "q and k must be [B*T, H*dk]", kk));
  FP8_RETURN_IF_ERROR(need(o.numel() == v.numel() && lse.numel() == B * H * T, "attention_fwd",
                           "o must match v and lse be [B*H*T]", o));
  k::attention_fwd(q.data_as<float>(), kk.data_as<float>(), v.data_as<float>(), B, T, H, dk, dv,
                   scale, o.data_as<float>(), lse.data_as<float>());
  return Status::Ok();
}

Status CpuOps::attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& kk, const Tensor& v,
                             const Tensor& o, const Tensor& lse, int64_t B, int64_t T, int64_t H,
                             float scale, Tensor& dq, Tensor& dk, Tensor& dv) {
  FP8_RETURN_IF_ERROR(f32("attention_bwd", {&dout, &q, &kk, &v, &o, &lse, &dq, &dk, &dv}));
  const int64_t dkk = q.numel() / (B * T * H), dvv = v.numel() / (B * T * H);
  FP8_RETURN_IF_ERROR(same("attention_bwd", q, dq));
  FP8_RETURN_IF_ERROR(same("attention_bwd", kk, dk));
  FP8_RETURN_IF_ERROR(same("attention_bwd", v, dv));
  k::attention_bwd(dout.data_as<float>(), q.data_as<float>(), kk.data_as<float>(),
                   v.data_as<float>(), o.data_as<float>(), lse.data_as<float>(), B, T, H, dkk, dvv,
                   scale, dq.data_as<float>(), dk.data_as<float>(), dv.data_as<float>());
  return Status::Ok();
}

Status CpuOps::swiglu_fwd(const Tensor& g, const Tensor& u, Tensor& h) {
  FP8_RETURN_IF_ERROR(f32("swiglu_fwd", {&g, &u, &h}));
  FP8_RETURN_IF_ERROR(same("swiglu_fwd", g, u));
  FP8_RETURN_IF_ERROR(same("swiglu_fwd", g, h));
  k::swiglu_fwd(g.data_as<float>(), u.data_as<float>(), g.numel(), h.data_as<float>());
  return Status::Ok();
}

Status CpuOps::swiglu_bwd(const Tensor& dh, const Tensor& g, const Tensor& u, Tensor& dg,
                          Tensor& du) {
  FP8_RETURN_IF_ERROR(f32("swiglu_bwd", {&dh, &g, &u, &dg, &du}));
  FP8_RETURN_IF_ERROR(same("swiglu_bwd", g, dh));
  k::swiglu_bwd(dh.data_as<float>(), g.data_as<float>(), u.data_as<float>(), g.numel(),
                dg.data_as<float>(), du.data_as<float>());
  return Status::Ok();
}

Status CpuOps::cross_entropy_fwd(const Tensor& logits, const Tensor& targets, Tensor& loss) {
  FP8_RETURN_IF_ERROR(f32("cross_entropy_fwd", {&logits, &loss}));
  FP8_RETURN_IF_ERROR(i32("cross_entropy_fwd", targets));
  FP8_RETURN_IF_ERROR(need(targets.numel() == logits.rows() && loss.numel() == logits.rows(),
                           "cross_entropy_fwd", "one target and one loss per row", targets));
  const int32_t* t = targets.data_as<int32_t>();
  for (int64_t i = 0; i < targets.numel(); ++i) {
    if (t[i] >= logits.cols()) {
      return FP8_INVALID("cross_entropy_fwd: target {} at row {} >= vocab {}", t[i], i,
                         logits.cols());
    }
  }
  k::cross_entropy_fwd(logits.data_as<float>(), t, logits.rows(), logits.cols(),
                       loss.data_as<float>());
  return Status::Ok();
}

Status CpuOps::cross_entropy_bwd(const Tensor& logits, const Tensor& targets, float row_scale,
                                 Tensor& dlogits) {
  FP8_RETURN_IF_ERROR(f32("cross_entropy_bwd", {&logits, &dlogits}));
  FP8_RETURN_IF_ERROR(i32("cross_entropy_bwd", targets));
  FP8_RETURN_IF_ERROR(same("cross_entropy_bwd", logits, dlogits));
  k::cross_entropy_bwd(logits.data_as<float>(), targets.data_as<int32_t>(), logits.rows(),
                       logits.cols(), row_scale, dlogits.data_as<float>());
  return Status::Ok();
}

Status CpuOps::router_topk(const Tensor& logits, const Tensor& bias, int64_t topk, int64_t n_groups,
                           int64_t max_groups, float route_scale, Tensor& scores, Tensor& idx,
                           Tensor& gates) {
  FP8_RETURN_IF_ERROR(f32("router_topk", {&logits, &bias, &scores, &gates}));
  FP8_RETURN_IF_ERROR(i32("router_topk", idx));
  const int64_t n = logits.rows(), E = logits.cols();
  FP8_RETURN_IF_ERROR(need(bias.numel() == E && scores.numel() == n * E, "router_topk",
                           "bias [E] and scores [n, E] required", scores));
  FP8_RETURN_IF_ERROR(need(idx.numel() == n * topk && gates.numel() == n * topk, "router_topk",
                           "idx and gates must be [n, topk]", idx));
  if (n_groups < 1 || E % n_groups || max_groups < 1 || max_groups > n_groups ||
      topk > (E / n_groups) * max_groups) {
    return FP8_INVALID(
        "router_topk: experts={} groups={} max_groups={} topk={}: need groups | "
        "experts, 1 <= max_groups <= groups, topk <= experts/groups * max_groups",
        E, n_groups, max_groups, topk);
  }
  k::router_topk(logits.data_as<float>(), bias.data_as<float>(), n, E, topk, n_groups, max_groups,
                 route_scale, scores.data_as<float>(), idx.data_as<int32_t>(),
                 gates.data_as<float>());
  return Status::Ok();
}

Status CpuOps::gather_rows(const Tensor& in, const Tensor& rows, Tensor& out) {
  FP8_RETURN_IF_ERROR(f32("gather_rows", {&in, &out}));
  FP8_RETURN_IF_ERROR(i32("gather_rows", rows));
  FP8_RETURN_IF_ERROR(need(out.numel() == rows.numel() * in.cols(), "gather_rows",
                           "out must be [len(rows), cols(in)]", out));
  k::gather_rows(in.data_as<float>(), rows.data_as<int32_t>(), rows.numel(), in.cols(),
                 out.data_as<float>());
  return Status::Ok();
}

Status CpuOps::scatter_add_rows(const Tensor& in, const Tensor& rows, const Tensor& w,
                                Tensor& out) {
  FP8_RETURN_IF_ERROR(f32("scatter_add_rows", {&in, &out}));
  FP8_RETURN_IF_ERROR(i32("scatter_add_rows", rows));
  FP8_RETURN_IF_ERROR(need(in.numel() == rows.numel() * out.cols(), "scatter_add_rows",
                           "in must be [len(rows), cols(out)]", in));
  k::scatter_add_rows(in.data_as<float>(), rows.data_as<int32_t>(),
                      w.defined() ? w.data_as<float>() : nullptr, rows.numel(), out.cols(),
                      out.data_as<float>());
  return Status::Ok();
}

Status CpuOps::add(const Tensor& a, const Tensor& b, Tensor& out) {
  FP8_RETURN_IF_ERROR(f32("add", {&a, &b, &out}));
  FP8_RETURN_IF_ERROR(same("add", a, b));
  FP8_RETURN_IF_ERROR(same("add", a, out));
  k::add(a.data_as<float>(), b.data_as<float>(), a.numel(), out.data_as<float>());
  return Status::Ok();
}

Status CpuOps::axpy(float alpha, const Tensor& x, Tensor& y) {
  FP8_RETURN_IF_ERROR(f32("axpy", {&x, &y}));
  FP8_RETURN_IF_ERROR(same("axpy", x, y));
  k::axpy(alpha, x.data_as<float>(), x.numel(), y.data_as<float>());
  return Status::Ok();
}

Status CpuOps::round_bf16(const Tensor& x, Tensor& out) {
  FP8_RETURN_IF_ERROR(f32("round_bf16", {&x, &out}));
  FP8_RETURN_IF_ERROR(same("round_bf16", x, out));
  k::round_bf16(x.data_as<float>(), x.numel(), out.data_as<float>());
  return Status::Ok();
}

}  // namespace fp8pipe
