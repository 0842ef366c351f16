// RoutedExperts (experts.h): SwiGLU.forward / backward_input / backward_weight and Linear's GEMM
// recipe, restated over row groups. Every step below is the per-expert one applied to all rows at
// once (row-wise ops) or per group (GEMMs), so the bits are unchanged.
#include "core/model/experts.h"

#include <numeric>

namespace fp8pipe::model {

Status RoutedExperts::init(ModelCtx& c, const std::string& prefix, int64_t first, int64_t count,
                           int64_t dim, int64_t hidden, uint64_t seed, float std) {
  dim_ = dim;
  hidden_ = hidden;
  w1_.resize(count);
  w3_.resize(count);
  w2_.resize(count);
  for (int64_t e = 0; e < count; ++e) {
    const std::string name = prefix + ".experts." + std::to_string(first + e);
    FP8_RETURN_IF_ERROR(w1_[e].init(c, name + ".w1.weight", dim, hidden, seed, std, true, true));
    FP8_RETURN_IF_ERROR(w3_[e].init(c, name + ".w3.weight", dim, hidden, seed, std, true, true));
    FP8_RETURN_IF_ERROR(w2_[e].init(c, name + ".w2.weight", hidden, dim, seed, std, true, true));
  }
  return Status::Ok();
}

std::vector<Param*> RoutedExperts::params() {
  std::vector<Param*> ps;
  for (size_t e = 0; e < w1_.size(); ++e) {
    ps.push_back(&w1_[e].weight());
    ps.push_back(&w3_[e].weight());
    ps.push_back(&w2_[e].weight());
  }
  return ps;
}

// Linear::prepare_input over the groups: FP8 1x128 quantization (grouped), a bf16 copy on the
// bf16 path, the tensor itself in FP32.
Result<RoutedExperts::Operand> RoutedExperts::operand(ModelCtx& c, const Tensor& x,
                                                      const RowGroups& groups) {
  Operand o;
  if (c.precision == Precision::kFP8) {
    FP8_ASSIGN_OR_RETURN(o.q, c.be->quantize_groups(x, groups, c.qp));
  } else if (c.precision == Precision::kBF16) {
    FP8_ASSIGN_OR_RETURN(o.t, c.be->empty(x.shape(), DType::kBF16));
    FP8_RETURN_IF_ERROR(c.be->cast(x, o.t));
  } else {
    o.t = x;
  }
  return o;
}

Status RoutedExperts::refresh_fp8_weights(ModelCtx& c) {
  if (wq_version_ == c.weight_version && wq_[0].codes.defined()) return Status::Ok();
  for (int kind = 0; kind < 3; ++kind) {
    std::vector<const Tensor*> ws;
    for (Linear& l : weights(kind)) ws.push_back(&l.weight().value);
    int64_t bad = 0;
    FP8_ASSIGN_OR_RETURN(wq_[kind],
                         c.be->quantize_blocks_batch(ws, c.qp, c.count_nonfinite ? &bad : nullptr));
    c.nonfinite_groups += bad;
    FP8_ASSIGN_OR_RETURN(wq_t_[kind], c.be->transpose_fp8_batch(wq_[kind]));
  }
  wq_version_ = c.weight_version;
  return Status::Ok();
}

// out[r] = 0 + w[r] * x[r]: Backend::gather_rows_scaled over the identity rows.
Result<Tensor> RoutedExperts::scale_rows(ModelCtx& c, const Tensor& x, const Tensor& w) {
  const int64_t rows = x.rows();
  FP8_ASSIGN_OR_RETURN(Tensor out, new_f32(c, rows, x.cols()));
  if (rows == 0) return out;
  if (!iota_.defined() || iota_.numel() < rows) {
    std::vector<int32_t> ids(std::max<int64_t>(rows, 2 * (iota_.defined() ? iota_.numel() : 0)));
    std::iota(ids.begin(), ids.end(), 0);
    FP8_ASSIGN_OR_RETURN(iota_, upload_i32(c, ids));
  }
  FP8_RETURN_IF_ERROR(c.be->gather_rows_scaled(x, iota_.slice_rows(0, rows), w, out));
  return out;
}

Result<Tensor> RoutedExperts::gemm(ModelCtx& c, const Operand& a, const RowGroups& groups, int kind,
                                   bool dgrad, int64_t n, const Tensor& row_w) {
  const Product p{&a, kind};
  FP8_ASSIGN_OR_RETURN(std::vector<Tensor> out, gemms(c, {&p, 1}, groups, dgrad, n, row_w));
  return out[0];
}

Result<std::vector<Tensor>> RoutedExperts::gemms(ModelCtx& c, std::span<const Product> ps,
                                                 const RowGroups& groups, bool dgrad, int64_t n,
                                                 const Tensor& row_w) {
  const bool fp8 = c.precision == Precision::kFP8;
  if (fp8) FP8_RETURN_IF_ERROR(refresh_fp8_weights(c));
  // The experts' GEMMs write disjoint row slices of the outputs: one grouped call
  // (Backend::gemm_fp8_grouped), which a backend may run concurrently.
  std::vector<Tensor> outs;
  std::vector<Fp8GemmArgs> f8;
  std::vector<GemmArgs> gs;
  for (const Product& p : ps) {
    FP8_ASSIGN_OR_RETURN(Tensor out, new_f32(c, groups.total_rows(), n));
    for (int64_t e = 0; e < groups.count(); ++e) {
      const int64_t lo = groups.offsets[e], hi = groups.offsets[e + 1];
      if (lo == hi) continue;
      Tensor dst = out.slice_rows(lo, hi);
      if (fp8) {
        f8.push_back({p.a->q.group[e], dgrad ? wq_t_[p.kind].group[e] : wq_[p.kind].group[e], dst});
      } else {  // forward x . W^T, dgrad dy . W
        FP8_ASSIGN_OR_RETURN(Tensor wop, weights(p.kind)[e].weight_operand(c, dgrad));
        gs.push_back({p.a->t.slice_rows(lo, hi), false, wop, !dgrad, dst});
      }
    }
    outs.push_back(out);
  }
  FP8_RETURN_IF_ERROR(fp8 ? c.be->gemm_fp8_grouped(f8, c.gemm) : c.be->gemm_grouped(gs));
  if (row_w.defined()) {
    for (Tensor& out : outs) {
      FP8_ASSIGN_OR_RETURN(out, scale_rows(c, out, row_w));
    }
  }
  if (c.precision != Precision::kFP32) {
    for (Tensor& out : outs) FP8_RETURN_IF_ERROR(c.be->round_bf16(out, out));
  }
  return outs;
}

Result<Tensor> RoutedExperts::forward(ModelCtx& c, int mb, const Tensor& x,
                                      const RowGroups& groups) {
  if (x.rank() != 2 || x.cols() != dim_ || x.rows() != groups.total_rows() ||
      groups.count() != count()) {
    return FP8_INVALID("experts: input {} is not [{} rows of {} groups, {}]", x.describe(),
                       groups.total_rows(), count(), dim_);
  }
  Saved& s = saved_.put(mb);
  s = Saved{};
  s.groups = groups;
  // w1 and w3 read the same x: one operand for both (SwiGLU::forward)
  FP8_ASSIGN_OR_RETURN(s.x, operand(c, x, groups));
  return forward_from(c, s, x.rows());
}

bool RoutedExperts::xq_shape_bad(const GroupedFp8& q, int64_t rows) const {
  return q.codes.rank() != 2 || q.codes.rows() != rows || q.codes.cols() != dim_ ||
         static_cast<int64_t>(q.group.size()) != count();
}

Result<Tensor> RoutedExperts::forward(ModelCtx& c, int mb, GroupedFp8 xq, const RowGroups& groups) {
  const int64_t M = groups.total_rows();
  if (c.precision != Precision::kFP8 || groups.count() != count() || xq_shape_bad(xq, M)) {
    return FP8_INVALID(
        "experts: an FP8 input {} is not quantize_groups of [{} rows of {} groups, "
        "{}] (or the precision is not FP8)",
        xq.codes.describe(), M, count(), dim_);
  }
  Saved& s = saved_.put(mb);
  s = Saved{};
  s.groups = groups;
  s.x.q = std::move(xq);
  return forward_from(c, s, M);
}

Result<Tensor> RoutedExperts::forward_from(ModelCtx& c, Saved& s, int64_t rows) {
  const RowGroups& groups = s.groups;
  const Product gu[] = {{&s.x, 0}, {&s.x, 1}};
  FP8_ASSIGN_OR_RETURN(std::vector<Tensor> out, gemms(c, gu, groups, false, hidden_));
  s.g = out[0];
  s.u = out[1];
  FP8_ASSIGN_OR_RETURN(Tensor h, new_f32(c, rows, hidden_));
  FP8_RETURN_IF_ERROR(c.be->swiglu_fwd(s.g, s.u, h));
  if (c.precision != Precision::kFP32) FP8_RETURN_IF_ERROR(c.be->round_bf16(h, h));
  FP8_ASSIGN_OR_RETURN(Operand hop, operand(c, h, groups));
  if (swiglu_cached(c) && rows > 0) {  // g and u as FP8 until the backward, which recomputes h
    FP8_ASSIGN_OR_RETURN(s.g, hold_fp8(c, s.g));
    FP8_ASSIGN_OR_RETURN(s.u, hold_fp8(c, s.u));
    return gemm(c, hop, groups, 2, false, dim_);
  }
  FP8_ASSIGN_OR_RETURN(s.g, hold_bf16(c, s.g));  // held as bf16 until the backward
  FP8_ASSIGN_OR_RETURN(s.u, hold_bf16(c, s.u));
  s.h = std::move(hop);
  return gemm(c, s.h, groups, 2, false, dim_);
}

bool RoutedExperts::swiglu_cached(const ModelCtx& c) const {
  return c.fp8_swiglu_cache && c.precision == Precision::kFP8;
}

Result<Tensor> RoutedExperts::backward_input(ModelCtx& c, int mb, const Tensor& dy) {
  FP8_ASSIGN_OR_RETURN(Saved * s, saved_.get(mb, "experts"));
  const RowGroups& gr = s->groups;
  if (dy.rows() != gr.total_rows() || dy.cols() != dim_) {
    return FP8_INVALID("experts: output gradient {} is not [{}, {}]", dy.describe(),
                       gr.total_rows(), dim_);
  }
  FP8_ASSIGN_OR_RETURN(Operand dyo, grad_operand(c, dy, gr, s->dy));
  FP8_ASSIGN_OR_RETURN(Tensor dh, gemm(c, dyo, gr, 2, true, hidden_));
  return backward_from(c, *s, dh);
}

Result<Tensor> RoutedExperts::backward_input(ModelCtx& c, int mb, GroupedFp8 dyq, const Tensor& w,
                                             const Tensor& dy_deq) {
  FP8_ASSIGN_OR_RETURN(Saved * s, saved_.get(mb, "experts"));
  const RowGroups& gr = s->groups;
  const int64_t M = gr.total_rows();
  if (c.precision != Precision::kFP8 || xq_shape_bad(dyq, M) || w.numel() != M ||
      w.dtype() != DType::kF32 || dy_deq.rows() != M || dy_deq.cols() != dim_ ||
      dy_deq.dtype() != DType::kF32) {
    return FP8_INVALID(
        "experts: an FP8 output gradient {} with row weights {} and values {} is not [{} rows "
        "of {} groups, {}] (or the precision is not FP8)",
        dyq.codes.describe(), w.describe(), dy_deq.describe(), M, count(), dim_);
  }
  FP8_ASSIGN_OR_RETURN(s->dy, scale_rows(c, dy_deq, w));  // w2's wgrad: the weighted gradient
  Operand dyo;
  dyo.q = std::move(dyq);
  FP8_ASSIGN_OR_RETURN(Tensor dh, gemm(c, dyo, gr, 2, true, hidden_, w));
  return backward_from(c, *s, dh);
}

// An output gradient's GEMM operand, and what the W pass keeps of it (Linear::backward_input: the
// fp32 gradient in FP8 and FP32, its bf16 copy on the bf16 path).
Result<RoutedExperts::Operand> RoutedExperts::grad_operand(ModelCtx& c, const Tensor& d,
                                                           const RowGroups& groups, Tensor& keep) {
  FP8_ASSIGN_OR_RETURN(Operand o, operand(c, d, groups));
  keep = c.precision == Precision::kBF16 ? o.t : d;
  return o;
}

Result<Tensor> RoutedExperts::backward_from(ModelCtx& c, Saved& s, const Tensor& dh) {
  const RowGroups& gr = s.groups;
  // Peak bytes (as SwiGLU::backward_input): the held g, u go once widened, and the cache's fp32 h
  // once it is an operand, before dg and du exist.
  FP8_ASSIGN_OR_RETURN(Tensor g, held_f32(c, s.g));  // bf16 widened or FP8 dequantized
  FP8_ASSIGN_OR_RETURN(Tensor u, held_f32(c, s.u));
  const bool cached = is_fp8(s.g.dtype());
  s.g = Tensor();
  s.u = Tensor();
  if (cached) {  // w2's weight gradient reads h, recomputed from the cached g, u
    FP8_ASSIGN_OR_RETURN(Tensor h, new_f32(c, g.rows(), g.cols()));
    FP8_RETURN_IF_ERROR(c.be->swiglu_fwd(g, u, h));
    FP8_RETURN_IF_ERROR(c.be->round_bf16(h, h));
    FP8_ASSIGN_OR_RETURN(s.h, operand(c, h, gr));
  }
  FP8_ASSIGN_OR_RETURN(Tensor dg, new_f32(c, dh.rows(), hidden_));
  FP8_ASSIGN_OR_RETURN(Tensor du, new_f32(c, dh.rows(), hidden_));
  FP8_RETURN_IF_ERROR(c.be->swiglu_bwd(dh, g, u, dg, du));
  g = Tensor();
  u = Tensor();
  if (c.precision != Precision::kFP32) {
    FP8_RETURN_IF_ERROR(c.be->round_bf16(dg, dg));
    FP8_RETURN_IF_ERROR(c.be->round_bf16(du, du));
  }
  FP8_ASSIGN_OR_RETURN(Operand dgo, grad_operand(c, dg, gr, s.dg));
  FP8_ASSIGN_OR_RETURN(Operand duo, grad_operand(c, du, gr, s.du));
  const Product dgu[] = {{&dgo, 0}, {&duo, 1}};
  FP8_ASSIGN_OR_RETURN(std::vector<Tensor> dx, gemms(c, dgu, gr, true, dim_));
  FP8_RETURN_IF_ERROR(c.be->axpy(1.0f, dx[1], dx[0]));
  return dx[0];
}

Status RoutedExperts::weight_grads(ModelCtx& c, const RowGroups& groups,
                                   std::span<const Wgrad> kinds) {
  if (c.precision != Precision::kFP8) {  // grad += dY^T X, fp32 accumulation into the gradient
    std::vector<GemmArgs> gs;
    for (const Wgrad& k : kinds) {
      for (int64_t e = 0; e < groups.count(); ++e) {
        const int64_t lo = groups.offsets[e], hi = groups.offsets[e + 1];
        if (lo == hi) continue;
        gs.push_back({k.dy->slice_rows(lo, hi), true, k.x->t.slice_rows(lo, hi), false,
                      (*k.w)[e].weight().grad, 1.0f, 1.0f});
      }
    }
    return c.be->gemm_grouped(gs);
  }
  // FP8: dY^T and X^T both 128x1 along the tokens of each expert; each expert's fp32 result into
  // its slot of one stacked scratch per kind, then every grad += its slot in one call per kind.
  std::vector<int64_t> active;
  for (int64_t e = 0; e < groups.count(); ++e)
    if (groups.rows(e) > 0) active.push_back(e);
  if (active.empty()) return Status::Ok();
  std::vector<GroupedFp8> dyts;  // alive until the grouped call
  std::vector<Tensor> dws;
  std::vector<std::vector<Tensor*>> grads(kinds.size());
  std::vector<Fp8GemmArgs> f8;
  for (size_t ki = 0; ki < kinds.size(); ++ki) {
    const Wgrad& k = kinds[ki];
    FP8_ASSIGN_OR_RETURN(GroupedFp8 dyt, c.be->quantize_transposed_groups(*k.dy, groups, c.qp));
    const Tensor& g0 = (*k.w)[active[0]].weight().grad;
    const int64_t rows = g0.rows();
    if (g0.numel() % 4 != 0) {  // slots would break the GEMM output's 16-byte alignment
      FP8_ASSIGN_OR_RETURN(Tensor one, new_f32(c, rows, g0.cols()));
      for (int64_t e : active) {
        FP8_RETURN_IF_ERROR(c.be->gemm_fp8(dyt.group[e], k.x_t->group[e], one, c.gemm));
        FP8_RETURN_IF_ERROR(c.be->axpy(1.0f, one, (*k.w)[e].weight().grad));
      }
      dws.emplace_back();
      continue;
    }
    FP8_ASSIGN_OR_RETURN(Tensor dw,
                         new_f32(c, static_cast<int64_t>(active.size()) * rows, g0.cols()));
    for (size_t i = 0; i < active.size(); ++i) {
      const int64_t e = active[i];
      Tensor slot =
          dw.slice_rows(static_cast<int64_t>(i) * rows, static_cast<int64_t>(i + 1) * rows);
      f8.push_back({dyt.group[e], k.x_t->group[e], slot});
      grads[ki].push_back(&(*k.w)[e].weight().grad);
    }
    dws.push_back(dw);
    dyts.push_back(std::move(dyt));
  }
  FP8_RETURN_IF_ERROR(c.be->gemm_fp8_grouped(f8, c.gemm));
  for (size_t ki = 0; ki < kinds.size(); ++ki) {
    if (dws[ki].defined()) FP8_RETURN_IF_ERROR(c.be->axpy_batch(1.0f, dws[ki], grads[ki]));
  }
  return Status::Ok();
}

Status RoutedExperts::backward_weight(ModelCtx& c, int mb) {
  FP8_ASSIGN_OR_RETURN(Saved * s, saved_.get(mb, "experts"));
  const RowGroups& gr = s->groups;
  if (!s->dy.defined() && gr.total_rows() > 0) {
    return FP8_ERROR(Code::kInternal, "experts: backward_weight before backward_input (mb {})", mb);
  }
  if (gr.total_rows() > 0) {
    // FP8 (DeepSeek): the cached 1x128 inputs dequantized and re-quantized 128x1, transposed;
    // w1 and w3 share theirs (SwiGLU::backward_weight).
    GroupedFp8 xt, ht;
    if (c.precision == Precision::kFP8) {
      FP8_ASSIGN_OR_RETURN(xt, c.be->requantize_transposed_groups(s->x.q, gr, c.qp));
      FP8_ASSIGN_OR_RETURN(ht, c.be->requantize_transposed_groups(s->h.q, gr, c.qp));
    }
    const Wgrad kinds[] = {
        {&s->dg, &s->x, &xt, &w1_}, {&s->du, &s->x, &xt, &w3_}, {&s->dy, &s->h, &ht, &w2_}};
    FP8_RETURN_IF_ERROR(weight_grads(c, gr, kinds));
  }
  saved_.erase(mb);
  return Status::Ok();
}

}  // namespace fp8pipe::model
