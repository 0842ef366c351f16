// The Backend ops' shared argument checks (see core/op_checks.h).
#include "core/op_checks.h"

#include <fmt/format.h>

#include <algorithm>

namespace fp8pipe::checks {

// ---- generic rules

Status need(bool ok, const char* op, const char* what, const Tensor& t) {
  if (ok) return Status::Ok();
  return FP8_INVALID("{}: {} (got {})", op, what, t.defined() ? t.describe() : "undefined");
}

Status f32(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    FP8_RETURN_IF_ERROR(need(t->defined() && t->dtype() == DType::kF32, op, "fp32 required", *t));
  return Status::Ok();
}

Status i32(const char* op, const Tensor& t) {
  return need(t.defined() && t.dtype() == DType::kI32, op, "i32 required", t);
}

Status same(const char* op, const Tensor& a, const Tensor& b) {
  return need(a.numel() == b.numel(), op, "element counts differ", b);
}

Status float_input(const char* op, const Tensor& x) {
  if (x.dtype() != DType::kF32 && x.dtype() != DType::kBF16) {
    return FP8_INVALID("{}: input must be fp32 or bf16, got {}", op, x.describe());
  }
  if (x.rank() < 1) return FP8_INVALID("{}: input must have rank >= 1, got a scalar", op);
  return Status::Ok();
}

Status fp8(const char* op, const Tensor& q) {
  if (!is_fp8(q.dtype()) || !q.scale()) {
    return FP8_INVALID("{}: expected an FP8 tensor with scales, got {}", op, q.describe());
  }
  return Status::Ok();
}

// ---- memory

Status empty(const Shape& shape) {
  for (int64_t d : shape) {
    if (d < 0) return FP8_INVALID("negative dimension in shape {}", shape_str(shape));
  }
  return Status::Ok();
}

Status copy(const Tensor& src, const Tensor& dst) {
  if (src.dtype() != dst.dtype() || src.numel() != dst.numel()) {
    return FP8_INVALID("copy: {} -> {}: dtype and element count must match", src.describe(),
                       dst.describe());
  }
  return Status::Ok();
}

Status adamw_run(const Tensor& p, const Tensor& g, const Tensor& m, const Tensor& v,
                 const AdamWRun& r) {
  if (p.rank() != 1 || g.rank() != 1 || m.rank() != 1 || v.rank() != 1 ||
      p.dtype() != DType::kF32 || g.dtype() != DType::kF32 || m.dtype() != DType::kBF16 ||
      v.dtype() != DType::kBF16 || g.numel() != p.numel() || v.numel() != m.numel()) {
    return FP8_INVALID(
        "adamw_runs: p, g must be 1-D fp32 of one length and m, v 1-D bf16 of one length; got {}, "
        "{}, {}, {}",
        p.describe(), g.describe(), m.describe(), v.describe());
  }
  if (r.begin < 0 || r.end < r.begin || r.end > p.numel() || r.moment < 0 ||
      r.moment + (r.end - r.begin) > m.numel()) {
    return FP8_INVALID(
        "adamw_runs: run [{}, {}) with moments from {} is outside {} weights / {} "
        "moments",
        r.begin, r.end, r.moment, p.numel(), m.numel());
  }
  return Status::Ok();
}

Status copy_range(const CopyRange& r) {
  if (!r.src.defined() || !r.dst.defined() || r.src.dtype() != r.dst.dtype() ||
      dtype_size(r.src.dtype()) == 0) {
    return FP8_INVALID(
        "copy_ranges: source {} and destination {} must be defined, of one unpacked dtype",
        r.src.describe(), r.dst.describe());
  }
  if (r.n < 0 || r.src_off < 0 || r.dst_off < 0 || r.src_off + r.n > r.src.numel() ||
      r.dst_off + r.n > r.dst.numel()) {
    return FP8_INVALID("copy_ranges: {} elements from {} of {} to {} of {} are out of range", r.n,
                       r.src_off, r.src.describe(), r.dst_off, r.dst.describe());
  }
  return Status::Ok();
}

// ---- FP8 numerics and the fp32 GEMM

Status quantize(const Tensor& x) { return float_input("quantize", x); }

Status quantize_transposed(const Tensor& x) { return float_input("quantize_transposed", x); }

Status transpose_fp8(const Tensor& q) {
  FP8_RETURN_IF_ERROR(fp8("transpose_fp8", q));
  if (q.granularity() != Granularity::k128x128 || q.rank() != 2) {
    return FP8_INVALID("transpose_fp8: needs a 2-D 128x128-quantized tensor, got {}", q.describe());
  }
  return Status::Ok();
}

Status quantize_e5m6(const Tensor& x) { return float_input("quantize_e5m6", x); }

Status dequantize(const Tensor& q, const Tensor& out) {
  if (q.dtype() == DType::kE5M6) {
    if (!q.scale() || q.granularity() != Granularity::k1x128) {
      return FP8_INVALID("dequantize: an E5M6 tensor needs its 1x128 scales, got {}", q.describe());
    }
  } else {
    FP8_RETURN_IF_ERROR(fp8("dequantize", q));
  }
  if (out.dtype() != DType::kF32 || out.numel() != q.numel()) {
    return FP8_INVALID("dequantize: output must be fp32 with {} elements, got {}", q.numel(),
                       out.describe());
  }
  return Status::Ok();
}

// Operand scales as cuBLASLt takes them (kernels/cpu/fp8_gemm.h): 1x128, 128x128 or per-tensor,
// never 128x128 on both sides.
Status grouped_input(const char* op, const Tensor& x, const RowGroups& groups) {
  if (groups.count() < 1 || !groups.dev.defined()) {
    return FP8_INVALID("{}: row groups must come from make_row_groups", op);
  }
  return need(
      x.defined() && x.dtype() == DType::kF32 && x.rank() == 2 && x.rows() == groups.total_rows(),
      op, fmt::format("fp32 [{}, K] required (the groups' rows)", groups.total_rows()).c_str(), x);
}

Status quantize_blocks_batch(std::span<const Tensor* const> ws) {
  const char* op = "quantize_blocks_batch";
  if (ws.empty()) return FP8_INVALID("{}: no tensors", op);
  for (const Tensor* w : ws) {
    FP8_RETURN_IF_ERROR(need(
        w->defined() && w->dtype() == DType::kF32 && w->rank() == 2 && w->shape() == ws[0]->shape(),
        op, "fp32 2-D tensors of one shape required", *w));
  }
  return Status::Ok();
}

Status transpose_fp8_batch(const GroupedFp8& q) {
  const char* op = "transpose_fp8_batch";
  if (q.group.empty()) return FP8_INVALID("{}: no tensors", op);
  const Tensor& g0 = q.group[0];
  FP8_RETURN_IF_ERROR(fp8(op, g0));
  FP8_RETURN_IF_ERROR(need(g0.granularity() == Granularity::k128x128 && g0.rank() == 2, op,
                           "128x128-quantized 2-D groups required", g0));
  return need(q.codes.numel() == static_cast<int64_t>(q.group.size()) * g0.numel() &&
                  q.scales.numel() == static_cast<int64_t>(q.group.size()) * g0.scale()->numel(),
              op, "a quantize_blocks_batch result required", q.codes);
}

Status dequantize_groups(const GroupedFp8& q, const RowGroups& groups, const Tensor& out) {
  const char* op = "dequantize_groups";
  FP8_RETURN_IF_ERROR(grouped_input(op, out, groups));
  if (!is_fp8(q.codes.dtype()) || q.codes.numel() != out.numel() ||
      q.scales.numel() != groups.total_rows() * kernels::ceil_div(out.cols(), 128) ||
      static_cast<int64_t>(q.group.size()) != groups.count()) {
    return FP8_INVALID("{}: codes {} and scales {} are not quantize_groups of {}", op,
                       q.codes.describe(), q.scales.describe(), out.describe());
  }
  return Status::Ok();
}

Status gather_fp8_groups(const Tensor& codes, const Tensor& scales, const RowGroups& in_groups,
                         const Tensor& rows, const Tensor& pad, const RowGroups& groups) {
  const char* op = "gather_fp8_groups";
  FP8_RETURN_IF_ERROR(need(codes.defined() && is_fp8(codes.dtype()) && codes.rank() == 2 &&
                               codes.rows() == in_groups.total_rows(),
                           op, "codes must be FP8 [in_groups' rows, K]", codes));
  FP8_RETURN_IF_ERROR(f32(op, {&scales}));
  FP8_RETURN_IF_ERROR(need(scales.numel() == codes.rows() * kernels::ceil_div(codes.cols(), 128),
                           op, "scales must hold one per row and 128 columns of codes", scales));
  FP8_RETURN_IF_ERROR(i32(op, rows));
  const int64_t M = groups.total_rows();
  if (pad.defined()) {
    FP8_RETURN_IF_ERROR(i32(op, pad));
    return need(pad.numel() == M, op, "pad must have one entry per output row", pad);
  }
  return need(rows.numel() == M, op, "rows must have one entry per output row", rows);
}

Status requantize_transposed(const Tensor& q) {
  FP8_RETURN_IF_ERROR(fp8("requantize_transposed", q));
  return need(q.rank() == 2 && q.granularity() == Granularity::k1x128, "requantize_transposed",
              "a 1x128-quantized 2-D tensor is required", q);
}

Status requantize_transposed_groups(const GroupedFp8& q, const RowGroups& groups) {
  const char* op = "requantize_transposed_groups";
  FP8_RETURN_IF_ERROR(need(q.codes.defined() && is_fp8(q.codes.dtype()) && q.codes.rank() == 2 &&
                               q.codes.rows() == groups.total_rows(),
                           op, "codes must be a quantize_groups result [total_rows, K]", q.codes));
  if (q.scales.numel() != groups.total_rows() * kernels::ceil_div(q.codes.cols(), 128) ||
      static_cast<int64_t>(q.group.size()) != groups.count()) {
    return FP8_INVALID("{}: scales {} are not quantize_groups' of codes {}", op,
                       q.scales.describe(), q.codes.describe());
  }
  return Status::Ok();
}

Status gemm_fp8(const Tensor& a, const Tensor& b, const Tensor& out) {
  FP8_RETURN_IF_ERROR(fp8("gemm_fp8 A", a));
  FP8_RETURN_IF_ERROR(fp8("gemm_fp8 B", b));
  const int64_t M = a.rows(), N = b.rows(), K = a.cols();
  if (b.cols() != K) {
    return FP8_INVALID("gemm_fp8: reduction dims differ: A {} vs B {} (out = A . B^T)",
                       a.describe(), b.describe());
  }
  if (out.numel() != M * N || (out.dtype() != DType::kF32 && out.dtype() != DType::kBF16)) {
    return FP8_INVALID("gemm_fp8: output must be fp32 or bf16 with {}x{} elements, got {}", M, N,
                       out.describe());
  }
  const auto operand_gran = [](Granularity g) {
    return g == Granularity::k1x128 || g == Granularity::k128x128 || g == Granularity::kPerTensor;
  };
  if (!operand_gran(a.granularity()) || !operand_gran(b.granularity()) ||
      (a.granularity() == Granularity::k128x128 && b.granularity() == Granularity::k128x128)) {
    return FP8_INVALID(
        "gemm_fp8: unsupported scale pair {} x {} (128x128 x 128x128 has no "
        "kernel, as in cuBLASLt)",
        granularity_name(a.granularity()), granularity_name(b.granularity()));
  }
  return Status::Ok();
}

Status gemm(const Tensor& a, bool ta, const Tensor& b, bool tb, const Tensor& c) {
  for (const Tensor* t : {&a, &b, &c}) {
    const bool operand = t != &c;
    if (!t->defined() || !(t->dtype() == DType::kF32 ||
                           (operand && t->dtype() == DType::kBF16 && a.dtype() == b.dtype()))) {
      return FP8_INVALID("gemm: fp32 required{}, got {}", operand ? " (or bf16 A and B)" : " for C",
                         t->defined() ? t->describe() : "undefined");
    }
  }
  const int64_t M = ta ? a.cols() : a.rows(), K = ta ? a.rows() : a.cols();
  const int64_t Kb = tb ? b.cols() : b.rows(), N = tb ? b.rows() : b.cols();
  if (K != Kb || c.rows() != M || c.cols() != N) {
    return FP8_INVALID("gemm: shapes do not chain: op(A) {}x{}, op(B) {}x{}, C {}", M, K, Kb, N,
                       c.describe());
  }
  return Status::Ok();
}

Status grouped_gemm_outputs(const char* op, std::span<const std::vector<const Tensor*>> gemms) {
  struct Range {
    uintptr_t lo, hi;
    size_t gemm;
    const Tensor* t;
  };
  std::vector<Range> outs, ins;
  auto add = [](std::vector<Range>& v, const Tensor& t, size_t i) {
    if (t.defined() && t.nbytes() > 0) {
      const auto lo = reinterpret_cast<uintptr_t>(t.data());
      v.push_back({lo, lo + t.nbytes(), i, &t});
    }
  };
  for (size_t i = 0; i < gemms.size(); ++i) {
    for (size_t j = 0; j < gemms[i].size(); ++j) {
      const Tensor& t = *gemms[i][j];
      add(j == 0 ? outs : ins, t, i);
      if (j > 0 && t.scale()) add(ins, *t.scale(), i);
    }
  }
  std::sort(outs.begin(), outs.end(), [](const Range& a, const Range& b) { return a.lo < b.lo; });
  for (size_t k = 1; k < outs.size(); ++k) {
    if (outs[k].lo < outs[k - 1].hi) {
      return FP8_INVALID(
          "{}: the outputs of GEMMs {} and {} overlap (they may run concurrently; "
          "got {} and {})",
          op, outs[k - 1].gemm, outs[k].gemm, outs[k - 1].t->describe(), outs[k].t->describe());
    }
  }
  // Outputs are sorted and disjoint, so their ends are sorted too: the last output starting
  // below an input's end is the only one that can reach into it.
  for (const Range& in : ins) {
    auto it = std::lower_bound(outs.begin(), outs.end(), in.hi,
                               [](const Range& o, uintptr_t v) { return o.lo < v; });
    if (it == outs.begin()) continue;
    --it;
    if (it->hi > in.lo) {
      return FP8_INVALID(
          "{}: GEMM {}'s output overlaps an input of GEMM {} (they may run "
          "concurrently; got output {}, input {})",
          op, it->gemm, in.gemm, it->t->describe(), in.t->describe());
    }
  }
  return Status::Ok();
}

Status gemm_fp8_grouped(std::span<const Fp8GemmArgs> gs) {
  std::vector<std::vector<const Tensor*>> ts;
  for (const Fp8GemmArgs& g : gs) {
    FP8_RETURN_IF_ERROR(gemm_fp8(g.a, g.b, g.out));
    ts.push_back({&g.out, &g.a, &g.b});
  }
  return grouped_gemm_outputs("gemm_fp8_grouped", ts);
}

Status gemm_grouped(std::span<const GemmArgs> gs) {
  std::vector<std::vector<const Tensor*>> ts;
  for (const GemmArgs& g : gs) {
    FP8_RETURN_IF_ERROR(gemm(g.a, g.trans_a, g.b, g.trans_b, g.c));
    ts.push_back({&g.c, &g.a, &g.b});
  }
  return grouped_gemm_outputs("gemm_grouped", ts);
}

Status cast(const Tensor& src, const Tensor& dst) {
  const bool ok = src.defined() && dst.defined() &&
                  ((src.dtype() == DType::kF32 && dst.dtype() == DType::kBF16) ||
                   (src.dtype() == DType::kBF16 && dst.dtype() == DType::kF32));
  FP8_RETURN_IF_ERROR(need(ok, "cast", "fp32 -> bf16 or bf16 -> fp32 required", dst));
  return same("cast", src, dst);
}

// Every view of every batch item lies inside its tensor.
Status gemm_batched(const Tensor& a, const Tensor& b, const Tensor& c, const GemmBatch& g) {
  FP8_RETURN_IF_ERROR(f32("gemm_batched", {&c}));
  const bool fp32 =
      a.defined() && b.defined() && a.dtype() == DType::kF32 && b.dtype() == DType::kF32;
  const bool bf16 =
      a.defined() && b.defined() && a.dtype() == DType::kBF16 && b.dtype() == DType::kBF16;
  FP8_RETURN_IF_ERROR(need(fp32 || bf16, "gemm_batched", "A and B both fp32 or both bf16", b));
  if (g.batch < 0 || g.M < 0 || g.N < 0 || g.K < 0 || g.offset_a < 0 || g.offset_b < 0 ||
      g.offset_c < 0 || g.stride_a < 0 || g.stride_b < 0 || g.stride_c < 0) {
    return FP8_INVALID("gemm_batched: negative size, offset or stride (batch {}, {}x{}x{})",
                       g.batch, g.M, g.N, g.K);
  }
  if (g.batch == 0 || g.M == 0 || g.N == 0) return Status::Ok();
  auto fits = [&](const char* name, const Tensor& t, int64_t rows, int64_t cols, int64_t ld,
                  int64_t offset, int64_t stride) -> Status {
    if (rows == 0 || cols == 0) return Status::Ok();
    const int64_t last = offset + (g.batch - 1) * stride + (rows - 1) * ld + cols;
    if (ld < cols || last > t.numel()) {
      return FP8_INVALID(
          "gemm_batched: {} views of {}x{} (ld {}, offset {}, stride {}) x {} exceed {} "
          "({} elements) or ld < cols",
          name, rows, cols, ld, offset, stride, g.batch, t.describe(), t.numel());
    }
    return Status::Ok();
  };
  FP8_RETURN_IF_ERROR(
      fits("A", a, g.trans_a ? g.K : g.M, g.trans_a ? g.M : g.K, g.lda, g.offset_a, g.stride_a));
  FP8_RETURN_IF_ERROR(
      fits("B", b, g.trans_b ? g.N : g.K, g.trans_b ? g.K : g.N, g.ldb, g.offset_b, g.stride_b));
  return fits("C", c, g.M, g.N, g.ldc, g.offset_c, g.stride_c);
}

Status causal_softmax(const Tensor& s, const Tensor& p, const Tensor& lse) {
  FP8_RETURN_IF_ERROR(f32("causal_softmax", {&s, &p, &lse}));
  FP8_RETURN_IF_ERROR(same("causal_softmax", s, p));
  return need(lse.numel() == s.rows(), "causal_softmax", "lse must have rows(s) elements", lse);
}

Status softmax_bwd(const Tensor& p, const Tensor& dp, const Tensor& ds) {
  FP8_RETURN_IF_ERROR(f32("softmax_bwd", {&p, &dp, &ds}));
  FP8_RETURN_IF_ERROR(same("softmax_bwd", p, dp));
  return same("softmax_bwd", p, ds);
}

// ---- model operators

Status embedding_fwd(const Tensor& table, const Tensor& ids, const Tensor& out) {
  FP8_RETURN_IF_ERROR(f32("embedding_fwd", {&table, &out}));
  FP8_RETURN_IF_ERROR(i32("embedding_fwd", ids));
  return need(out.numel() == ids.numel() * table.cols(), "embedding_fwd", "out must be [n, D]",
              out);
}

Status embedding_bwd_acc(const Tensor& dout, const Tensor& ids, const Tensor& dtable) {
  FP8_RETURN_IF_ERROR(f32("embedding_bwd", {&dout, &dtable}));
  return i32("embedding_bwd", ids);
}

Status rmsnorm_fwd(const Tensor& x, const Tensor& w, const Tensor& y, const Tensor& rstd) {
  FP8_RETURN_IF_ERROR(f32("rmsnorm_fwd", {&x, &w, &y, &rstd}));
  FP8_RETURN_IF_ERROR(
      need(w.numel() == x.cols(), "rmsnorm_fwd", "weight must have cols(x) elements", w));
  FP8_RETURN_IF_ERROR(same("rmsnorm_fwd", x, y));
  return need(rstd.numel() == x.rows(), "rmsnorm_fwd", "rstd must have rows(x) elements", rstd);
}

Status rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                   const Tensor& dx, const Tensor& dw_acc) {
  FP8_RETURN_IF_ERROR(f32("rmsnorm_bwd", {&dy, &x, &w, &rstd, &dx, &dw_acc}));
  FP8_RETURN_IF_ERROR(same("rmsnorm_bwd", x, dy));
  return same("rmsnorm_bwd", x, dx);
}

Status rope(const Tensor& x, const Tensor& pos, int64_t heads) {
  FP8_RETURN_IF_ERROR(f32("rope", {&x}));
  FP8_RETURN_IF_ERROR(i32("rope", pos));
  const int64_t d = heads > 0 ? x.cols() / heads : 0;
  FP8_RETURN_IF_ERROR(need(heads > 0 && d * heads == x.cols() && d % 2 == 0, "rope",
                           "cols must be heads * even d", x));
  return need(pos.numel() == x.rows(), "rope", "one position per row", pos);
}

Status attention_cached(const Tensor& q, const Tensor& k, const Tensor& v, int64_t H, int64_t G,
                        int64_t dv, const Tensor& o) {
  constexpr const char* op = "attention_cached";
  FP8_RETURN_IF_ERROR(f32(op, {&q, &o}));
  FP8_RETURN_IF_ERROR(need(k.defined() && v.defined() && k.dtype() == v.dtype() &&
                               (k.dtype() == DType::kF32 || k.dtype() == DType::kBF16),
                           op, "k and v must be both fp32 or both bf16", v));
  FP8_RETURN_IF_ERROR(need(H > 0 && G > 0 && H % G == 0 && dv > 0 && q.cols() % H == 0, op,
                           fmt::format("heads {} must be a multiple of kv heads {}, dividing q's "
                                       "columns, and dv {} > 0",
                                       H, G, dv)
                               .c_str(),
                           q));
  const int64_t dk = q.cols() / H;
  FP8_RETURN_IF_ERROR(need(k.cols() == G * dk && q.rows() <= k.rows(), op,
                           "k must be [L, G*dk] with L >= rows(q)", k));
  FP8_RETURN_IF_ERROR(
      need(v.rows() == k.rows() && v.cols() >= G * dv, op, "v must be [L, >= G*dv]", v));
  return need(o.rows() == q.rows() && o.cols() == H * dv, op, "o must be [rows(q), H*dv]", o);
}

Status attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, int64_t B, int64_t T,
                     int64_t H, const Tensor& o, const Tensor& lse) {
  FP8_RETURN_IF_ERROR(f32("attention_fwd", {&q, &k, &v, &o, &lse}));
  if (B * T * H == 0) return Status::Ok();
  const int64_t dk = q.numel() / (B * T * H);
  FP8_RETURN_IF_ERROR(need(q.numel() == B * T * H * dk && k.numel() == q.numel(), "attention_fwd",
                           "q and k must be [B*T, H*dk]", k));
  return need(o.numel() == v.numel() && lse.numel() == B * H * T, "attention_fwd",
              "o must match v and lse be [B*H*T]", o);
}

Status attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& o, const Tensor& lse, int64_t B, int64_t T, int64_t H,
                     const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  FP8_RETURN_IF_ERROR(f32("attention_bwd", {&dout, &q, &k, &v, &o, &lse, &dq, &dk, &dv}));
  if (B * T * H == 0) return Status::Ok();
  FP8_RETURN_IF_ERROR(same("attention_bwd", q, dq));
  FP8_RETURN_IF_ERROR(same("attention_bwd", k, dk));
  FP8_RETURN_IF_ERROR(same("attention_bwd", v, dv));
  return need(dout.numel() == v.numel() && o.numel() == v.numel() && lse.numel() == B * H * T,
              "attention_bwd", "dout and o must match v, lse be [B*H*T]", dout);
}

Status swiglu_fwd(const Tensor& g, const Tensor& u, const Tensor& h) {
  FP8_RETURN_IF_ERROR(f32("swiglu_fwd", {&g, &u, &h}));
  FP8_RETURN_IF_ERROR(same("swiglu_fwd", g, u));
  return same("swiglu_fwd", g, h);
}

Status swiglu_bwd(const Tensor& dh, const Tensor& g, const Tensor& u, const Tensor& dg,
                  const Tensor& du) {
  FP8_RETURN_IF_ERROR(f32("swiglu_bwd", {&dh, &g, &u, &dg, &du}));
  for (const Tensor* t : {&dh, &u, &dg, &du}) FP8_RETURN_IF_ERROR(same("swiglu_bwd", g, *t));
  return Status::Ok();
}

Status cross_entropy_fwd(const Tensor& logits, const Tensor& targets, const Tensor& loss) {
  FP8_RETURN_IF_ERROR(f32("cross_entropy_fwd", {&logits, &loss}));
  FP8_RETURN_IF_ERROR(i32("cross_entropy_fwd", targets));
  return need(targets.numel() == logits.rows() && loss.numel() == logits.rows(),
              "cross_entropy_fwd", "one target and one loss per row", targets);
}

Status cross_entropy_bwd(const Tensor& logits, const Tensor& targets, const Tensor& dlogits) {
  FP8_RETURN_IF_ERROR(f32("cross_entropy_bwd", {&logits, &dlogits}));
  FP8_RETURN_IF_ERROR(i32("cross_entropy_bwd", targets));
  FP8_RETURN_IF_ERROR(same("cross_entropy_bwd", logits, dlogits));
  return need(targets.numel() == logits.rows(), "cross_entropy_bwd", "one target per row", targets);
}

Status router_topk(const Tensor& logits, const Tensor& bias, int64_t topk, int64_t n_groups,
                   int64_t max_groups, const Tensor& scores, const Tensor& idx,
                   const Tensor& gates) {
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
  return Status::Ok();
}

Status sort_assignments(const Tensor& idx, int64_t E, const Tensor& order, const Tensor& rows,
                        const Tensor& slot, const Tensor& counts) {
  const char* op = "sort_assignments";
  for (const Tensor* t : {&idx, &order, &rows, &slot, &counts}) FP8_RETURN_IF_ERROR(i32(op, *t));
  const int64_t nk = idx.numel();
  FP8_RETURN_IF_ERROR(need(nk < (int64_t{1} << 31), op, "fewer than 2^31 assignments", idx));
  for (const Tensor* t : {&order, &rows, &slot})
    FP8_RETURN_IF_ERROR(need(t->numel() == nk, op, "order, rows and slot need idx's count", *t));
  return need(E >= 1 && counts.numel() == E, op, "counts must be [E], E >= 1", counts);
}

Status router_grad(const Tensor& scores, const Tensor& idx, const Tensor& gates,
                   const Tensor& dgate, const Tensor& slot, const Tensor& f,
                   const kernels::RouterGradParams& p, const Tensor& dlogits) {
  const char* op = "router_grad";
  FP8_RETURN_IF_ERROR(f32(op, {&scores, &gates, &dlogits}));
  FP8_RETURN_IF_ERROR(i32(op, idx));
  const int64_t n = p.B * p.T, nk = n * p.K;
  FP8_RETURN_IF_ERROR(
      need(p.E >= 1 && p.K >= 1 && scores.numel() == n * p.E && dlogits.numel() == n * p.E, op,
           "scores and dlogits must be [B*T, E]", dlogits));
  FP8_RETURN_IF_ERROR(
      need(idx.numel() == nk && gates.numel() == nk, op, "idx and gates must be [B*T, K]", idx));
  FP8_RETURN_IF_ERROR(
      need(dgate.defined() && dgate.dtype() == DType::kF64, op, "dgate must be f64", dgate));
  if (slot.defined()) {
    FP8_RETURN_IF_ERROR(i32(op, slot));
    FP8_RETURN_IF_ERROR(need(slot.numel() == nk, op, "slot must be [B*T*K]", slot));
  } else {
    FP8_RETURN_IF_ERROR(need(dgate.numel() == nk, op, "dgate must be [B*T*K] without slot", dgate));
  }
  if (p.alpha == 0.0f) return Status::Ok();
  return need(f.defined() && f.dtype() == DType::kF64 && f.numel() == p.B * p.E, op,
              "balance counts f must be f64 [B, E] when alpha != 0", f);
}

Status balance_stats(const Tensor& scores, const Tensor& idx, int64_t B, int64_t T, const Tensor& f,
                     const Tensor& loss) {
  const char* op = "balance_stats";
  FP8_RETURN_IF_ERROR(f32(op, {&scores}));
  FP8_RETURN_IF_ERROR(i32(op, idx));
  const int64_t E = scores.cols();
  FP8_RETURN_IF_ERROR(need(B >= 1 && T >= 1 && scores.rows() == B * T && idx.rows() == B * T, op,
                           "scores and idx must have B*T rows", scores));
  FP8_RETURN_IF_ERROR(need(f.defined() && f.dtype() == DType::kF64 && f.numel() == B * E, op,
                           "f must be f64 [B, E]", f));
  return need(loss.defined() && loss.dtype() == DType::kF64 && loss.numel() == 1, op,
              "loss must be f64 [1]", loss);
}

Status gather_rows(const Tensor& in, const Tensor& rows, const Tensor& out) {
  FP8_RETURN_IF_ERROR(f32("gather_rows", {&in, &out}));
  FP8_RETURN_IF_ERROR(i32("gather_rows", rows));
  return need(out.numel() == rows.numel() * in.cols(), "gather_rows",
              "out must be [len(rows), cols(in)]", out);
}

Status gather_rows_scaled(const Tensor& in, const Tensor& rows, const Tensor& w,
                          const Tensor& out) {
  const char* op = "gather_rows_scaled";
  FP8_RETURN_IF_ERROR(f32(op, {&in, &out}));
  FP8_RETURN_IF_ERROR(i32(op, rows));
  if (w.defined()) {  // optional per-row weights
    FP8_RETURN_IF_ERROR(f32(op, {&w}));
    FP8_RETURN_IF_ERROR(same(op, rows, w));
  }
  return need(out.numel() == rows.numel() * in.cols(), op, "out must be [len(rows), cols(in)]",
              out);
}

Status scatter_add_rows(const Tensor& in, const Tensor& rows, const Tensor& w, const Tensor& out) {
  FP8_RETURN_IF_ERROR(f32("scatter_add_rows", {&in, &out}));
  FP8_RETURN_IF_ERROR(i32("scatter_add_rows", rows));
  if (w.defined()) {  // optional per-row weights
    FP8_RETURN_IF_ERROR(f32("scatter_add_rows", {&w}));
    FP8_RETURN_IF_ERROR(same("scatter_add_rows", rows, w));
  }
  return need(in.numel() == rows.numel() * out.cols(), "scatter_add_rows",
              "in must be [len(rows), cols(out)]", in);
}

Status add(const Tensor& a, const Tensor& b, const Tensor& out) {
  if (!a.defined() || a.dtype() != DType::kF64) {
    FP8_RETURN_IF_ERROR(f32("add", {&a, &b, &out}));
  } else {  // fp64: the gradient sums' reductions (parallel/grad_sync.h)
    for (const Tensor* t : {&b, &out})
      FP8_RETURN_IF_ERROR(need(t->dtype() == DType::kF64, "add", "fp64 like a required", *t));
  }
  FP8_RETURN_IF_ERROR(same("add", a, b));
  return same("add", a, out);
}

Status axpy(const Tensor& x, const Tensor& y) {
  FP8_RETURN_IF_ERROR(f32("axpy", {&x, &y}));
  return same("axpy", x, y);
}

Status axpy_batch(const Tensor& x, std::span<Tensor* const> ys) {
  const char* op = "axpy_batch";
  FP8_RETURN_IF_ERROR(f32(op, {&x}));
  if (ys.empty()) return FP8_INVALID("{}: no outputs", op);
  for (Tensor* y : ys) {
    FP8_RETURN_IF_ERROR(f32(op, {y}));
    FP8_RETURN_IF_ERROR(need(y->numel() == ys[0]->numel(), op, "outputs of one size required", *y));
  }
  return need(x.numel() == static_cast<int64_t>(ys.size()) * ys[0]->numel(), op,
              "x must hold one output's worth per output", x);
}

Status round_bf16(const Tensor& x, const Tensor& out) {
  FP8_RETURN_IF_ERROR(f32("round_bf16", {&x, &out}));
  return same("round_bf16", x, out);
}

// ---- data-dependent errors

Status bad_token_id(int64_t position, int32_t id, int64_t vocab) {
  return FP8_INVALID("embedding_fwd: token id {} at position {} outside the vocabulary [0, {})", id,
                     position, vocab);
}

Status row_indices(const char* op, const char* name, const Tensor& idx, int64_t lo, int64_t limit) {
  const int32_t* v = idx.data_as<int32_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    if (v[i] < lo || v[i] >= limit) {
      return FP8_INVALID("{}: {}[{}] = {} is outside [{}, {})", op, name, i, v[i], lo, limit);
    }
  }
  return Status::Ok();
}

Status bad_target(int64_t row, int32_t target, int64_t vocab) {
  return FP8_INVALID("cross_entropy_fwd: target {} at row {} >= vocab {}", target, row, vocab);
}

// ---- optimizer ops

namespace {
Status want(const char* op, const Tensor& t, DType d, int64_t n) {
  if (t.defined() && t.dtype() == d && t.numel() == n) return Status::Ok();
  return FP8_INVALID("{}: {} with {} elements required (got {})", op, dtype_name(d), n,
                     t.defined() ? t.describe() : "undefined");
}
}  // namespace

Status accumulate_grad(const Tensor& grad, const Tensor& acc) {
  FP8_RETURN_IF_ERROR(f32("accumulate_grad", {&grad}));
  return want("accumulate_grad", acc, DType::kF64, grad.numel());
}

Status row_dot(const Tensor& a, const Tensor& b, const Tensor& out) {
  FP8_RETURN_IF_ERROR(f32("row_dot", {&a, &b}));
  FP8_RETURN_IF_ERROR(need(a.shape() == b.shape(), "row_dot", "a and b must have one shape", b));
  return want("row_dot", out, DType::kF64, a.rows());
}

Status round_f64(const Tensor& acc, const Tensor& out) {
  FP8_RETURN_IF_ERROR(
      need(acc.defined() && acc.dtype() == DType::kF64, "round_f64", "f64 required", acc));
  return want("round_f64", out, DType::kF32, acc.numel());
}

Status sum_squares(std::span<const Tensor* const> gs, const double* total) {
  if (!total) return FP8_INVALID("sum_squares: null total");
  for (const Tensor* g : gs) {
    if (!g) return FP8_INVALID("sum_squares: null tensor");
    FP8_RETURN_IF_ERROR(f32("sum_squares", {g}));
  }
  return Status::Ok();
}

Status adamw(const Tensor& p, const Tensor& g, const Tensor& m, const Tensor& v) {
  FP8_RETURN_IF_ERROR(f32("adamw", {&p}));
  const int64_t n = p.numel();
  FP8_RETURN_IF_ERROR(want("adamw", g, DType::kF32, n));
  FP8_RETURN_IF_ERROR(want("adamw", m, DType::kBF16, n));
  return want("adamw", v, DType::kBF16, n);
}

}  // namespace fp8pipe::checks
