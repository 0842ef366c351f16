// The CPU backend: host memory, inline compute stream, worker-thread side streams, and the FP8
// numerics of kernels/cpu (bit-exact quantization; fast or exact FP8 GEMM; OpenBLAS sgemm).
#include <cblas.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

#include "core/backend.h"
#include "core/cpu_ops.h"
#include "core/cpu_stream.h"
#include "core/op_checks.h"
#include "kernels/cpu/fp8_gemm.h"
#include "kernels/cpu/quantize.h"

namespace fp8pipe {
namespace {

namespace k = kernels;

k::Fp8Operand operand(const Tensor& t) {
  return k::Fp8Operand{t.data_as<uint8_t>(), t.scale()->data_as<float>(), t.granularity(),
                       fp8_format(t.dtype())};
}

class CpuBackend final : public CpuOps {
 public:
  CpuBackend() : compute_("compute", /*inline_exec=*/true) {}
  Device device() const override { return Device::kCpu; }
  std::string name() const override { return "cpu"; }

  Result<Tensor> empty(const Shape& shape, DType dtype) override {
    FP8_RETURN_IF_ERROR(checks::empty(shape));
    auto buf = std::make_shared<Buffer>();
    buf->bytes = dtype_bytes(dtype, numel(shape));
    // 64-byte alignment for vector loads; aligned_alloc needs a size multiple of the alignment.
    const size_t alloc = (buf->bytes + 63) / 64 * 64;
    buf->ptr = alloc ? std::aligned_alloc(64, alloc) : nullptr;
    if (alloc && !buf->ptr) {
      return FP8_ERROR(Code::kInternal, "out of host memory allocating {} bytes", alloc);
    }
    buf->device = Device::kCpu;
    buf->release = [](void* p) { std::free(p); };
    MemoryCounter::track(memory_, *buf);
    return Tensor(shape, dtype, std::move(buf));
  }
  MemoryUse memory() const override { return memory_->read(); }
  void reset_peak_memory() override { memory_->reset_peak(); }

  Status fill_zero(Tensor& t) override {
    if (t.nbytes()) std::memset(t.data(), 0, t.nbytes());
    return Status::Ok();
  }

  Status copy(const Tensor& src, Tensor& dst) override {
    FP8_RETURN_IF_ERROR(checks::copy(src, dst));
    if (src.device() != Device::kCpu || dst.device() != Device::kCpu) {
      return FP8_INVALID("copy: the CPU backend cannot reach device memory ({} -> {})",
                         src.describe(), dst.describe());
    }
    if (src.nbytes()) std::memmove(dst.data(), src.data(), src.nbytes());
    return Status::Ok();
  }

  Stream& compute() override { return compute_; }
  std::unique_ptr<Stream> create_stream(const std::string& name) override {
    return std::make_unique<CpuStream>(name, /*inline_exec=*/false);
  }

  Result<Tensor> quantize(const Tensor& x, Granularity g, QuantParams p,
                          int64_t* nonfinite) override {
    FP8_RETURN_IF_ERROR(checks::quantize(x));
    const int64_t R = x.rows(), C = x.cols();
    FP8_ASSIGN_OR_RETURN(Tensor q, empty(x.shape(), fp8_dtype(p)));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({k::scale_count(g, R, C)}, DType::kF32));
    const int64_t bad =
        x.dtype() == DType::kF32
            ? k::quantize(x.data_as<float>(), R, C, g, p, q.data_as<uint8_t>(), s.data_as<float>())
            : k::quantize_bf16(x.data_as<uint16_t>(), R, C, g, p, q.data_as<uint8_t>(),
                               s.data_as<float>());
    if (nonfinite) *nonfinite = bad;
    q.set_scale(std::make_shared<Tensor>(std::move(s)), g, p.pow2);
    return q;
  }

  Result<Tensor> quantize_e5m6(const Tensor& x, int64_t* nonfinite) override {
    FP8_RETURN_IF_ERROR(checks::quantize_e5m6(x));
    const int64_t R = x.rows(), C = x.cols();
    FP8_ASSIGN_OR_RETURN(Tensor q, empty(x.shape(), DType::kE5M6));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({k::scale_count(Granularity::k1x128, R, C)}, DType::kF32));
    const int64_t bad =
        x.dtype() == DType::kF32
            ? k::quantize_e5m6(x.data_as<float>(), R, C, q.data_as<uint8_t>(), s.data_as<float>())
            : k::quantize_e5m6_bf16(x.data_as<uint16_t>(), R, C, q.data_as<uint8_t>(),
                                    s.data_as<float>());
    if (nonfinite) *nonfinite = bad;
    q.set_scale(std::make_shared<Tensor>(std::move(s)), Granularity::k1x128, /*pow2=*/true);
    return q;
  }

  Result<Tensor> quantize_transposed(const Tensor& x, QuantParams p, int64_t* nonfinite) override {
    FP8_RETURN_IF_ERROR(checks::quantize_transposed(x));
    if (x.dtype() != DType::kF32) {  // the CPU kernel has no bf16 variant
      return FP8_INVALID("quantize_transposed: fp32 input required, got {}", x.describe());
    }
    const int64_t R = x.rows(), C = x.cols();
    FP8_ASSIGN_OR_RETURN(Tensor q, empty({C, R}, fp8_dtype(p)));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({k::scale_count(Granularity::k128x1, R, C)}, DType::kF32));
    const int64_t bad = k::quantize_128x1_transposed(x.data_as<float>(), R, C, p,
                                                     q.data_as<uint8_t>(), s.data_as<float>());
    if (nonfinite) *nonfinite = bad;
    // The 128x1 scale array of X is the 1x128 scale array of X^T.
    q.set_scale(std::make_shared<Tensor>(std::move(s)), Granularity::k1x128, p.pow2);
    return q;
  }

  Result<Tensor> transpose_fp8(const Tensor& q) override {
    FP8_RETURN_IF_ERROR(checks::transpose_fp8(q));
    const int64_t R = q.dim(0), C = q.dim(1);
    FP8_ASSIGN_OR_RETURN(Tensor t, empty({C, R}, q.dtype()));
    FP8_ASSIGN_OR_RETURN(Tensor s,
                         empty({k::scale_count(Granularity::k128x128, C, R)}, DType::kF32));
    k::transpose_128x128(q.data_as<uint8_t>(), q.scale()->data_as<float>(), R, C,
                         t.data_as<uint8_t>(), s.data_as<float>());
    t.set_scale(std::make_shared<Tensor>(std::move(s)), Granularity::k128x128, q.pow2_scales());
    return t;
  }

  Status dequantize(const Tensor& q, Tensor& out) override {
    FP8_RETURN_IF_ERROR(checks::dequantize(q, out));
    if (q.dtype() == DType::kE5M6) {
      k::dequantize_e5m6(q.data_as<uint8_t>(), q.scale()->data_as<float>(), q.rows(), q.cols(),
                         out.data_as<float>());
      return Status::Ok();
    }
    k::dequantize(q.data_as<uint8_t>(), q.scale()->data_as<float>(), q.rows(), q.cols(),
                  q.granularity(), fp8_format(q.dtype()), out.data_as<float>());
    return Status::Ok();
  }

  // The grouped ops run the ungrouped kernels on each group's rows, writing into its slots.
  Result<GroupedFp8> quantize_groups(const Tensor& x, const RowGroups& groups,
                                     QuantParams p) override {
    FP8_RETURN_IF_ERROR(checks::grouped_input("quantize_groups", x, groups));
    const int64_t M = x.rows(), K = x.cols(), KB = k::ceil_div(K, 128);
    FP8_ASSIGN_OR_RETURN(Tensor q, empty({M, K}, fp8_dtype(p)));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({M * KB}, DType::kF32));
    for (int64_t g = 0; g < groups.count(); ++g) {
      const int64_t lo = groups.offsets[g];
      k::quantize(x.data_as<float>() + lo * K, groups.rows(g), K, Granularity::k1x128, p,
                  q.data_as<uint8_t>() + lo * K, s.data_as<float>() + lo * KB);
    }
    return group_views(std::move(q), std::move(s), groups, K, /*transposed=*/false, p.pow2);
  }

  Result<GroupedFp8> quantize_transposed_groups(const Tensor& x, const RowGroups& groups,
                                                QuantParams p) override {
    FP8_RETURN_IF_ERROR(checks::grouped_input("quantize_transposed_groups", x, groups));
    const int64_t M = x.rows(), K = x.cols();
    FP8_ASSIGN_OR_RETURN(Tensor q, empty({K * M}, fp8_dtype(p)));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({K * groups.tiles.back()}, DType::kF32));
    for (int64_t g = 0; g < groups.count(); ++g) {
      const int64_t lo = groups.offsets[g];
      k::quantize_128x1_transposed(x.data_as<float>() + lo * K, groups.rows(g), K, p,
                                   q.data_as<uint8_t>() + lo * K,
                                   s.data_as<float>() + K * groups.tiles[g]);
    }
    return group_views(std::move(q), std::move(s), groups, K, /*transposed=*/true, p.pow2);
  }

  Result<GroupedFp8> gather_fp8_groups(const Tensor& codes, const Tensor& scales,
                                       const RowGroups& in_groups, bool pow2, const Tensor& rows,
                                       const Tensor& pad, const RowGroups& groups) override {
    FP8_RETURN_IF_ERROR(checks::gather_fp8_groups(codes, scales, in_groups, rows, pad, groups));
    FP8_RETURN_IF_ERROR(checks::row_indices("gather_fp8_groups", "rows", rows, -1, codes.rows()));
    if (pad.defined()) {
      FP8_RETURN_IF_ERROR(checks::row_indices("gather_fp8_groups", "pad", pad, -1, rows.numel()));
    }
    const int64_t K = codes.cols(), KB = k::ceil_div(K, 128), M = groups.total_rows();
    FP8_ASSIGN_OR_RETURN(Tensor out, empty({M, K}, codes.dtype()));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({M * KB}, DType::kF32));
    float zero_scale = 0, inv = 0;
    k::compute_scale(0.0f, {fp8_format(codes.dtype()), pow2}, &zero_scale, &inv);
    const uint8_t* qc = codes.data_as<uint8_t>();
    const float* qs = scales.data_as<float>();
    const int32_t* rv = rows.data_as<int32_t>();
    const int32_t* pv = pad.defined() ? pad.data_as<int32_t>() : nullptr;
    const std::vector<int64_t>& io = in_groups.offsets;
    for (int64_t g = 0; g < groups.count(); ++g) {
      const int64_t lo = groups.offsets[g], ng = groups.rows(g);
      for (int64_t r = lo; r < lo + ng; ++r) {
        const int64_t i = pv ? pv[r] : r;
        const int64_t src = i < 0 ? -1 : rv[i];
        uint8_t* dst = out.data_as<uint8_t>() + r * K;
        float* srow = s.data_as<float>() + lo * KB + (r - lo);  // + kb * ng
        if (src < 0) {
          std::memset(dst, 0, static_cast<size_t>(K));
          for (int64_t kb = 0; kb < KB; ++kb) srow[kb * ng] = zero_scale;
          continue;
        }
        std::memcpy(dst, qc + src * K, static_cast<size_t>(K));
        // src's group in the input: the last with io[h] <= src (an empty group is never it)
        const int64_t h = std::upper_bound(io.begin(), io.end(), src) - io.begin() - 1;
        const int64_t o = io[h], nh = io[h + 1] - o;
        for (int64_t kb = 0; kb < KB; ++kb) srow[kb * ng] = qs[o * KB + kb * nh + (src - o)];
      }
    }
    return group_views(std::move(out), std::move(s), groups, K, /*transposed=*/false, pow2);
  }

  Status dequantize_groups(const GroupedFp8& q, const RowGroups& groups, Tensor& out) override {
    FP8_RETURN_IF_ERROR(checks::dequantize_groups(q, groups, out));
    const int64_t K = out.cols(), KB = k::ceil_div(K, 128);
    for (int64_t g = 0; g < groups.count(); ++g) {
      const int64_t lo = groups.offsets[g];
      k::dequantize(q.codes.data_as<uint8_t>() + lo * K, q.scales.data_as<float>() + lo * KB,
                    groups.rows(g), K, Granularity::k1x128, fp8_format(q.codes.dtype()),
                    out.data_as<float>() + lo * K);
    }
    return Status::Ok();
  }

  Result<GroupedFp8> quantize_blocks_batch(std::span<const Tensor* const> ws, QuantParams p,
                                           int64_t* nonfinite) override {
    FP8_RETURN_IF_ERROR(checks::quantize_blocks_batch(ws));
    const int64_t n = static_cast<int64_t>(ws.size()), R = ws[0]->rows(), C = ws[0]->cols();
    const int64_t sc = k::scale_count(Granularity::k128x128, R, C);
    FP8_ASSIGN_OR_RETURN(Tensor q, empty({n * R, C}, fp8_dtype(p)));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({n * sc}, DType::kF32));
    int64_t bad = 0;
    for (int64_t z = 0; z < n; ++z) {
      bad += k::quantize(ws[z]->data_as<float>(), R, C, Granularity::k128x128, p,
                         q.data_as<uint8_t>() + z * R * C, s.data_as<float>() + z * sc);
    }
    if (nonfinite) *nonfinite = bad;
    return stacked_block_views(std::move(q), std::move(s), n, R, C, p.pow2);
  }

  Result<GroupedFp8> transpose_fp8_batch(const GroupedFp8& q) override {
    FP8_RETURN_IF_ERROR(checks::transpose_fp8_batch(q));
    const int64_t n = static_cast<int64_t>(q.group.size());
    const int64_t R = q.group[0].rows(), C = q.group[0].cols();
    const int64_t sc = q.group[0].scale()->numel(),
                  st = k::scale_count(Granularity::k128x128, C, R);
    FP8_ASSIGN_OR_RETURN(Tensor t, empty({n * C, R}, q.codes.dtype()));
    FP8_ASSIGN_OR_RETURN(Tensor s, empty({n * st}, DType::kF32));
    for (int64_t z = 0; z < n; ++z) {
      k::transpose_128x128(q.codes.data_as<uint8_t>() + z * R * C,
                           q.scales.data_as<float>() + z * sc, R, C,
                           t.data_as<uint8_t>() + z * R * C, s.data_as<float>() + z * st);
    }
    return stacked_block_views(std::move(t), std::move(s), n, C, R, q.group[0].pow2_scales());
  }

  Status gemm_fp8(const Tensor& a, const Tensor& b, Tensor& out, GemmMode mode) override {
    FP8_RETURN_IF_ERROR(checks::gemm_fp8(a, b, out));
    const int64_t M = a.rows(), N = b.rows(), K = a.cols();
    const bool ok = k::fp8_gemm(operand(a), operand(b), M, N, K, mode,
                                out.dtype() == DType::kF32 ? out.data_as<float>() : nullptr,
                                out.dtype() == DType::kBF16 ? out.data_as<uint16_t>() : nullptr);
    if (!ok) {  // checks::gemm_fp8 let through what the kernel refuses
      return FP8_ERROR(Code::kInternal, "gemm_fp8: the CPU kernel refused {} x {} -> {}",
                       a.describe(), b.describe(), out.describe());
    }
    return Status::Ok();
  }

  // A GEMM operand as fp32: itself, or a bf16 tensor widened exactly (so a bf16 GEMM gives the
  // fp32 GEMM of the same values).
  Result<Tensor> widened(const Tensor& x) {
    if (x.dtype() != DType::kBF16) return x;
    FP8_ASSIGN_OR_RETURN(Tensor w, empty(x.shape(), DType::kF32));
    FP8_RETURN_IF_ERROR(cast(x, w));
    return w;
  }

  Status gemm(const Tensor& a, bool ta, const Tensor& b, bool tb, Tensor& c, float alpha,
              float beta) override {
    FP8_RETURN_IF_ERROR(checks::gemm(a, ta, b, tb, c));
    const int64_t M = ta ? a.cols() : a.rows(), K = ta ? a.rows() : a.cols();
    const int64_t N = tb ? b.rows() : b.cols();
    FP8_ASSIGN_OR_RETURN(Tensor aw, widened(a));
    FP8_ASSIGN_OR_RETURN(Tensor bw, widened(b));
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), alpha,
                aw.data_as<float>(), static_cast<int>(a.cols()), bw.data_as<float>(),
                static_cast<int>(b.cols()), beta, c.data_as<float>(), static_cast<int>(N));
    return Status::Ok();
  }

  Status gemm_batched(const Tensor& a, const Tensor& b, Tensor& c, const GemmBatch& g, float alpha,
                      float beta) override {
    FP8_RETURN_IF_ERROR(checks::gemm_batched(a, b, c, g));
    if (g.batch == 0 || g.M == 0 || g.N == 0) return Status::Ok();
    FP8_ASSIGN_OR_RETURN(Tensor aw, widened(a));
    FP8_ASSIGN_OR_RETURN(Tensor bw, widened(b));
    for (int64_t i = 0; i < g.batch; ++i) {
      cblas_sgemm(CblasRowMajor, g.trans_a ? CblasTrans : CblasNoTrans,
                  g.trans_b ? CblasTrans : CblasNoTrans, static_cast<int>(g.M),
                  static_cast<int>(g.N), static_cast<int>(g.K), alpha,
                  aw.data_as<float>() + g.offset_a + i * g.stride_a, static_cast<int>(g.lda),
                  bw.data_as<float>() + g.offset_b + i * g.stride_b, static_cast<int>(g.ldb), beta,
                  c.data_as<float>() + g.offset_c + i * g.stride_c, static_cast<int>(g.ldc));
    }
    return Status::Ok();
  }

  Status cast(const Tensor& src, Tensor& dst) override {
    FP8_RETURN_IF_ERROR(checks::cast(src, dst));
    const int64_t n = src.numel();
    if (src.dtype() == DType::kF32) {
      const float* s = src.data_as<float>();
      uint16_t* d = dst.data_as<uint16_t>();
      for (int64_t i = 0; i < n; ++i) d[i] = k::float_to_bf16(s[i]);
    } else {
      const uint16_t* s = src.data_as<uint16_t>();
      float* d = dst.data_as<float>();
      for (int64_t i = 0; i < n; ++i) d[i] = k::bf16_to_float(s[i]);
    }
    return Status::Ok();
  }

 private:
  static DType fp8_dtype(QuantParams p) {
    return p.fmt == k::Fp8Format::kE4M3 ? DType::kE4M3 : DType::kE5M2;
  }
  CpuStream compute_;
  std::shared_ptr<MemoryCounter> memory_ = std::make_shared<MemoryCounter>();
};

}  // namespace

Result<Tensor> Backend::zeros(const Shape& shape, DType dtype) {
  FP8_ASSIGN_OR_RETURN(Tensor t, empty(shape, dtype));
  FP8_RETURN_IF_ERROR(fill_zero(t));
  return t;
}

// The definitions: dequantize, then quantize 128x1 transposed.
Result<Tensor> Backend::requantize_transposed(const Tensor& q, QuantParams p, int64_t* nonfinite) {
  FP8_RETURN_IF_ERROR(checks::requantize_transposed(q));
  FP8_ASSIGN_OR_RETURN(Tensor x, empty(q.shape(), DType::kF32));
  FP8_RETURN_IF_ERROR(dequantize(q, x));
  return quantize_transposed(x, p, nonfinite);
}

Result<GroupedFp8> Backend::requantize_transposed_groups(const GroupedFp8& q,
                                                         const RowGroups& groups, QuantParams p) {
  FP8_RETURN_IF_ERROR(checks::requantize_transposed_groups(q, groups));
  FP8_ASSIGN_OR_RETURN(Tensor x, empty({q.codes.rows(), q.codes.cols()}, DType::kF32));
  FP8_RETURN_IF_ERROR(dequantize_groups(q, groups, x));
  return quantize_transposed_groups(x, groups, p);
}

// The reference: one copy() per range, over flat views.
Status Backend::copy_ranges(std::span<const CopyRange> rs) {
  for (const CopyRange& r : rs) {
    FP8_RETURN_IF_ERROR(checks::copy_range(r));
    if (r.n == 0) continue;
    FP8_ASSIGN_OR_RETURN(Tensor src, r.src.reshape({r.src.numel()}));
    FP8_ASSIGN_OR_RETURN(Tensor dst, r.dst.reshape({r.dst.numel()}));
    Tensor to = dst.slice_rows(r.dst_off, r.dst_off + r.n);
    FP8_RETURN_IF_ERROR(copy(src.slice_rows(r.src_off, r.src_off + r.n), to));
  }
  return Status::Ok();
}

// The reference: one adamw per run, over views of the flat buffers.
Status Backend::adamw_runs(Tensor& p, const Tensor& g, Tensor& m, Tensor& v,
                           std::span<const AdamWRun> runs, const kernels::AdamWScalars s[2]) {
  for (const AdamWRun& r : runs) {
    FP8_RETURN_IF_ERROR(checks::adamw_run(p, g, m, v, r));
    if (r.end == r.begin) continue;
    Tensor pv = p.slice_rows(r.begin, r.end),
           mv = m.slice_rows(r.moment, r.moment + r.end - r.begin),
           vv = v.slice_rows(r.moment, r.moment + r.end - r.begin);
    FP8_RETURN_IF_ERROR(adamw(pv, g.slice_rows(r.begin, r.end), mv, vv, s[r.weight_decay ? 1 : 0]));
  }
  return Status::Ok();
}

// The grouped GEMMs' reference: one call after another.
Status Backend::gemm_fp8_grouped(std::span<const Fp8GemmArgs> gs, GemmMode mode) {
  FP8_RETURN_IF_ERROR(checks::gemm_fp8_grouped(gs));
  for (const Fp8GemmArgs& g : gs) {
    Tensor out = g.out;
    FP8_RETURN_IF_ERROR(gemm_fp8(g.a, g.b, out, mode));
  }
  return Status::Ok();
}

Status Backend::gemm_grouped(std::span<const GemmArgs> gs) {
  FP8_RETURN_IF_ERROR(checks::gemm_grouped(gs));
  for (const GemmArgs& g : gs) {
    Tensor c = g.c;
    FP8_RETURN_IF_ERROR(gemm(g.a, g.trans_a, g.b, g.trans_b, c, g.alpha, g.beta));
  }
  return Status::Ok();
}

Result<RowGroups> make_row_groups(Backend& be, std::vector<int64_t> offsets) {
  if (offsets.empty() || offsets[0] != 0) {
    return FP8_INVALID("row groups: offsets must start at 0 (got {} offsets)", offsets.size());
  }
  RowGroups g;
  g.tiles.assign(offsets.size(), 0);
  for (size_t i = 1; i < offsets.size(); ++i) {
    const int64_t n = offsets[i] - offsets[i - 1];
    if (n < 0 || offsets[i] >= (int64_t{1} << 31)) {
      return FP8_INVALID("row groups: offset {} = {} after {} (must not decrease, below 2^31)", i,
                         offsets[i], offsets[i - 1]);
    }
    g.tiles[i] = g.tiles[i - 1] + kernels::ceil_div(n, 128);
  }
  g.offsets = std::move(offsets);
  const int64_t n = static_cast<int64_t>(g.offsets.size());
  auto cpu = make_cpu_backend();
  FP8_ASSIGN_OR_RETURN(Tensor h, cpu->empty({2 * n}, DType::kI32));
  for (int64_t i = 0; i < n; ++i) {
    h.data_as<int32_t>()[i] = static_cast<int32_t>(g.offsets[i]);
    h.data_as<int32_t>()[n + i] = static_cast<int32_t>(g.tiles[i]);
  }
  if (be.device() == Device::kCpu) {
    g.dev = h;
  } else {
    FP8_ASSIGN_OR_RETURN(g.dev, be.empty({2 * n}, DType::kI32));
    FP8_RETURN_IF_ERROR(be.copy(h, g.dev));
  }
  return g;
}

GroupedFp8 group_views(Tensor codes, Tensor scales, const RowGroups& groups, int64_t K,
                       bool transposed, bool pow2) {
  GroupedFp8 out;
  const int64_t KB = kernels::ceil_div(K, 128);
  for (int64_t g = 0; g < groups.count(); ++g) {
    const int64_t lo = groups.offsets[g], n = groups.rows(g);
    Tensor q, s;
    if (n > 0 && !transposed) {
      q = codes.slice_rows(lo, lo + n);
      s = scales.slice_rows(lo * KB, (lo + n) * KB);
    } else if (n > 0) {
      q = codes.slice_rows(K * lo, K * (lo + n)).reshape({K, n}).value();
      s = scales.slice_rows(K * groups.tiles[g], K * groups.tiles[g + 1]);
    }
    if (q.defined()) q.set_scale(std::make_shared<Tensor>(std::move(s)), Granularity::k1x128, pow2);
    out.group.push_back(std::move(q));
  }
  out.codes = std::move(codes);
  out.scales = std::move(scales);
  return out;
}

GroupedFp8 stacked_block_views(Tensor codes, Tensor scales, int64_t count, int64_t rows,
                               int64_t cols, bool pow2) {
  GroupedFp8 out;
  const int64_t sc = kernels::scale_count(Granularity::k128x128, rows, cols);
  for (int64_t z = 0; z < count; ++z) {
    Tensor q = codes.slice_rows(z * rows, (z + 1) * rows);
    q.set_scale(std::make_shared<Tensor>(scales.slice_rows(z * sc, (z + 1) * sc)),
                Granularity::k128x128, pow2);
    out.group.push_back(std::move(q));
  }
  out.codes = std::move(codes);
  out.scales = std::move(scales);
  return out;
}

Result<Tensor> Backend::to_host(const Tensor& t) {
  if (t.device() == Device::kCpu) return t;
  auto cpu = make_cpu_backend();
  FP8_ASSIGN_OR_RETURN(Tensor h, cpu->empty(t.shape(), t.dtype()));
  FP8_RETURN_IF_ERROR(copy(t, h));
  return h;
}

// One BLAS thread per process unless OPENBLAS_NUM_THREADS says otherwise: parallelism comes from
// ranks (processes), and OpenBLAS's spinning worker threads oversubscribe the cores next to other
// ranks and the MPI progress thread (measured: 0.56 s vs 8 s per tiny step under load).
std::unique_ptr<Backend> make_cpu_backend() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (!std::getenv("OPENBLAS_NUM_THREADS")) openblas_set_num_threads(1);
  });
  return std::make_unique<CpuBackend>();
}

#ifndef FP8PIPE_HAVE_CUDA
int cuda_device_count() { return 0; }

Result<std::unique_ptr<Backend>> make_cuda_backend(int) {
  return Status(Code::kUnimplemented, "this fp8pipe was built without CUDA",
                "rebuild with -DFP8PIPE_CUDA=ON on a machine with the CUDA toolkit");
}
#endif

}  // namespace fp8pipe
