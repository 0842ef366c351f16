#include "core/model/attention_core.h"

namespace fp8pipe::model {
namespace {

// An operand of the per-head GEMMs of one sequence b: an activation [B*T, H*d] (the (b, h) view is
// T x d with row stride H*d at b*T*H*d + h*d) or the sequence's scores [H*T, T] (h's view is the
// T x T block at h*T*T). One sequence at a time bounds the scores to H*T*T floats.
struct Operand {
  int64_t d = 0;  // head width; 0: the scores
};
constexpr Operand kScores{};

// C_h = alpha op(A_h) op(B_h) for every head h of sequence b: one batched call.
Status per_head(ModelCtx& c, const AttnShape& a, int64_t b, const Tensor& A, Operand oa, bool ta,
                const Tensor& Bm, Operand ob, bool tb, Tensor& C, Operand oc, int64_t M, int64_t N,
                int64_t K, float alpha) {
  auto set = [&](Operand o, int64_t& ld, int64_t& stride, int64_t& offset) {
    if (o.d == 0) {
      ld = a.T, stride = a.T * a.T, offset = 0;
    } else {
      ld = a.H * o.d, stride = o.d, offset = b * a.T * a.H * o.d;
    }
  };
  GemmBatch g;
  g.batch = a.H, g.M = M, g.N = N, g.K = K, g.trans_a = ta, g.trans_b = tb;
  set(oa, g.lda, g.stride_a, g.offset_a);
  set(ob, g.ldb, g.stride_b, g.offset_b);
  set(oc, g.ldc, g.stride_c, g.offset_c);
  return c.be->gemm_batched(A, Bm, C, g, alpha, 0.0f);
}

// S = scale * Q K^T of sequence b into s [H*T, T].
Status scores(ModelCtx& c, const Tensor& q, const Tensor& k, const AttnShape& a, int64_t b,
              int64_t dk, Tensor& s) {
  return per_head(c, a, b, q, {dk}, false, k, {dk}, true, s, kScores, a.T, a.T, dk, a.scale);
}

// A GEMM operand of the core: x itself, or (ModelCtx::attention_bf16) its bf16 rounding.
Result<Tensor> operand(ModelCtx& c, const Tensor& x) {
  if (!c.attention_bf16) return x;
  FP8_ASSIGN_OR_RETURN(Tensor y, c.be->empty(x.shape(), DType::kBF16));
  FP8_RETURN_IF_ERROR(c.be->cast(x, y));
  return y;
}

// The scores-shaped fp32 `s` as a GEMM operand: itself, or rounded into the bf16 buffer `s16`.
Result<Tensor> narrowed(ModelCtx& c, const Tensor& s, Tensor& s16) {
  if (!c.attention_bf16) return s;
  FP8_RETURN_IF_ERROR(c.be->cast(s, s16));
  return s16;
}

Status check(const Tensor& q, const Tensor& v, const AttnShape& a) {
  if (a.H <= 0 || q.cols() % a.H != 0 || v.cols() % a.H != 0) {
    return FP8_INVALID("attention (gemm): {} heads do not divide q {} / v {}", a.H, q.describe(),
                       v.describe());
  }
  return Status::Ok();
}

}  // namespace

Status attention_core_fwd(ModelCtx& c, const Tensor& q, const Tensor& k, const Tensor& v,
                          const AttnShape& a, Tensor& o, Tensor& lse) {
  if (!c.attention_gemm) {
    return c.be->attention_fwd(q, k, v, a.B, a.T, a.H, a.scale, o, lse);
  }
  FP8_RETURN_IF_ERROR(check(q, v, a));
  const int64_t dk = q.cols() / a.H, dv = v.cols() / a.H, R = a.H * a.T;
  FP8_ASSIGN_OR_RETURN(Tensor qg, operand(c, q));
  FP8_ASSIGN_OR_RETURN(Tensor kg, operand(c, k));
  FP8_ASSIGN_OR_RETURN(Tensor vg, operand(c, v));
  FP8_ASSIGN_OR_RETURN(Tensor s, c.be->empty({R, a.T}, DType::kF32));
  Tensor p16;
  if (c.attention_bf16) {
    FP8_ASSIGN_OR_RETURN(p16, c.be->empty({R, a.T}, DType::kBF16));
  }
  for (int64_t b = 0; b < a.B; ++b) {
    FP8_RETURN_IF_ERROR(scores(c, qg, kg, a, b, dk, s));
    Tensor lse_b = lse.slice_rows(b * R, (b + 1) * R);
    FP8_RETURN_IF_ERROR(c.be->causal_softmax(s, s, lse_b, /*recompute=*/false));
    FP8_ASSIGN_OR_RETURN(Tensor pg, narrowed(c, s, p16));
    FP8_RETURN_IF_ERROR(  // O = P V
        per_head(c, a, b, pg, kScores, false, vg, {dv}, false, o, {dv}, a.T, dv, a.T, 1.0f));
  }
  return Status::Ok();
}

Status attention_core_bwd(ModelCtx& c, const Tensor& dout, const Tensor& q, const Tensor& k,
                          const Tensor& v, const Tensor& o, const Tensor& lse, const AttnShape& a,
                          Tensor& dq, Tensor& dk, Tensor& dv) {
  if (!c.attention_gemm) {
    return c.be->attention_bwd(dout, q, k, v, o, lse, a.B, a.T, a.H, a.scale, dq, dk, dv);
  }
  (void)o;  // the gemm path recomputes P from lse; D_i comes from P and dP
  FP8_RETURN_IF_ERROR(check(q, v, a));
  const int64_t dkk = q.cols() / a.H, dvv = v.cols() / a.H, R = a.H * a.T;
  const Operand K{dkk}, V{dvv};
  FP8_ASSIGN_OR_RETURN(Tensor qg, operand(c, q));
  FP8_ASSIGN_OR_RETURN(Tensor kg, operand(c, k));
  FP8_ASSIGN_OR_RETURN(Tensor vg, operand(c, v));
  FP8_ASSIGN_OR_RETURN(Tensor dog, operand(c, dout));
  FP8_ASSIGN_OR_RETURN(Tensor p, c.be->empty({R, a.T}, DType::kF32));
  FP8_ASSIGN_OR_RETURN(Tensor ds, c.be->empty({R, a.T}, DType::kF32));
  Tensor s16;  // bf16 copy of P, then of dS
  if (c.attention_bf16) {
    FP8_ASSIGN_OR_RETURN(s16, c.be->empty({R, a.T}, DType::kBF16));
  }
  for (int64_t b = 0; b < a.B; ++b) {
    FP8_RETURN_IF_ERROR(scores(c, qg, kg, a, b, dkk, p));
    Tensor lse_b = lse.slice_rows(b * R, (b + 1) * R);  // read only (recompute)
    FP8_RETURN_IF_ERROR(c.be->causal_softmax(p, p, lse_b, /*recompute=*/true));
    // dV = P^T dO
    FP8_ASSIGN_OR_RETURN(Tensor pg, narrowed(c, p, s16));
    FP8_RETURN_IF_ERROR(
        per_head(c, a, b, pg, kScores, true, dog, V, false, dv, V, a.T, dvv, a.T, 1.0f));
    // dP = dO V^T, then dS = P * (dP - rowsum(P * dP)) in place
    FP8_RETURN_IF_ERROR(
        per_head(c, a, b, dog, V, false, vg, V, true, ds, kScores, a.T, a.T, dvv, 1.0f));
    FP8_RETURN_IF_ERROR(c.be->softmax_bwd(p, ds, ds));
    // dQ = scale dS K;  dK = scale dS^T Q
    FP8_ASSIGN_OR_RETURN(Tensor dsg, narrowed(c, ds, s16));
    FP8_RETURN_IF_ERROR(
        per_head(c, a, b, dsg, kScores, false, kg, K, false, dq, K, a.T, dkk, a.T, a.scale));
    FP8_RETURN_IF_ERROR(
        per_head(c, a, b, dsg, kScores, true, qg, K, false, dk, K, a.T, dkk, a.T, a.scale));
  }
  return Status::Ok();
}

}  // namespace fp8pipe::model
