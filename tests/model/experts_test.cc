// RoutedExperts (core/model/experts.h) against the per-expert SwiGLU it replaces: the same
// parameters (same names and seeds), each SwiGLU run on its expert's rows alone, must give the
// same bits for the output, the input gradient and every weight gradient, in FP8, BF16 and FP32.
// Groups include an empty expert, rows that are not a multiple of 16 and more than 128 rows (two
// 128x1 tiles in the FP8 weight gradient). The op profiler then checks what the grouping is for:
// the row-wise work does not grow with the number of experts.
#include "core/model/experts.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "core/model/layers.h"
#include "core/op_profile.h"
#include "tests/test_profiled.h"
#include "tests/test_random.h"

namespace fp8pipe::model {
namespace {

constexpr int64_t kDim = 256, kHidden = 384;

std::vector<int64_t> offsets_of(const std::vector<int64_t>& rows) {
  std::vector<int64_t> off = {0};
  for (int64_t n : rows) off.push_back(off.back() + n);
  return off;
}

void expect_same_bits(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.numel(), b.numel()) << what;
  ASSERT_EQ(a.dtype(), b.dtype()) << what;
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.nbytes()), 0) << what;
}

class ExpertsVsSwiGLU : public ::testing::TestWithParam<Precision> {};

TEST_P(ExpertsVsSwiGLU, SameBitsAsEachExpertAlone) {
  std::unique_ptr<Backend> be = make_cpu_backend();
  ModelCtx c;
  c.be = be.get();
  c.precision = GetParam();
  const std::vector<int64_t> rows = {37, 0, 160, 16, 129};
  const int64_t E = static_cast<int64_t>(rows.size());
  const std::vector<int64_t> off = offsets_of(rows);
  const int64_t M = off.back();

  RoutedExperts grouped;
  ASSERT_TRUE(grouped.init(c, "moe", 0, E, kDim, kHidden, /*seed=*/7, 0.05f).ok());
  std::vector<SwiGLU> alone(E);
  for (int64_t e = 0; e < E; ++e) {
    ASSERT_TRUE(
        alone[e].init(c, "moe.experts." + std::to_string(e), kDim, kHidden, 7, 0.05f, true).ok());
  }
  const std::vector<Param*> gp = grouped.params();
  ASSERT_EQ(gp.size(), static_cast<size_t>(3 * E));
  for (int64_t e = 0; e < E; ++e) {
    const std::vector<Param*> ap = alone[e].params();
    for (int i = 0; i < 3; ++i) {
      ASSERT_EQ(gp[3 * e + i]->name, ap[i]->name);
      expect_same_bits(gp[3 * e + i]->value, ap[i]->value, ap[i]->name);
    }
  }

  Tensor x = testutil::randn(*be, {M, kDim}, 1), dy = testutil::randn(*be, {M, kDim}, 2);
  RowGroups groups = make_row_groups(*be, off).value();
  auto y = grouped.forward(c, 0, x, groups);
  ASSERT_TRUE(y.ok()) << y.status().to_string();
  auto dx = grouped.backward_input(c, 0, dy);
  ASSERT_TRUE(dx.ok()) << dx.status().to_string();
  ASSERT_TRUE(grouped.backward_weight(c, 0).ok());
  EXPECT_EQ(grouped.saved_microbatches(), 0u);

  for (int64_t e = 0; e < E; ++e) {
    if (rows[e] == 0) continue;
    const std::string who = "expert " + std::to_string(e);
    auto ye = alone[e].forward(c, 0, x.slice_rows(off[e], off[e + 1]));
    ASSERT_TRUE(ye.ok()) << ye.status().to_string();
    expect_same_bits(y.value().slice_rows(off[e], off[e + 1]), ye.value(), who + " y");
    auto dxe = alone[e].backward_input(c, 0, dy.slice_rows(off[e], off[e + 1]));
    ASSERT_TRUE(dxe.ok()) << dxe.status().to_string();
    expect_same_bits(dx.value().slice_rows(off[e], off[e + 1]), dxe.value(), who + " dx");
    ASSERT_TRUE(alone[e].backward_weight(c, 0).ok());
  }
  for (int64_t e = 0; e < E; ++e) {
    const std::vector<Param*> ap = alone[e].params();
    for (int i = 0; i < 3; ++i) expect_same_bits(gp[3 * e + i]->grad, ap[i]->grad, ap[i]->name);
  }
  // The empty expert got no gradient, the others did (the comparison above is not vacuous).
  for (int i = 0; i < 3; ++i) {
    double empty = 0, full = 0;
    for (int64_t j = 0; j < gp[3 + i]->grad.numel(); ++j)
      empty += std::abs(gp[3 + i]->grad.data_as<float>()[j]);
    for (int64_t j = 0; j < gp[i]->grad.numel(); ++j)
      full += std::abs(gp[i]->grad.data_as<float>()[j]);
    EXPECT_EQ(empty, 0.0);
    EXPECT_GT(full, 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(Precisions, ExpertsVsSwiGLU,
                         ::testing::Values(Precision::kFP8, Precision::kBF16, Precision::kFP32),
                         [](const auto& info) { return std::string(precision_name(info.param)); });

// precision.fp8_swiglu_cache: the experts hold g and u as FP8 1x128 instead of bf16, and not the
// FP8 SwiGLU output, which the backward recomputes. After the forward the held bytes fall by
// exactly 4MH (bf16 g, u) + the output's grouped FP8 operand - (2MH codes + 2 x 3 scales a row).
// The output is bitwise the same (the forward reads the exact g, u); the gradients read g and u
// rounded to E4M3, a relative error of ~2^-4/sqrt(3) = 0.036 RMS each, so dg, du, dx and the
// weight gradients move by ~sqrt(2) x 0.036 = 0.05 (measured 0.044-0.054): bound 0.12, > 1e-3
// (the cache is really read).
TEST(RoutedExperts, Fp8SwigluCacheHoldsLessWithinTheFp8Bound) {
  const std::vector<int64_t> rows = {37, 0, 160, 16, 129};
  const std::vector<int64_t> off = offsets_of(rows);
  const int64_t E = static_cast<int64_t>(rows.size()), M = off.back();
  struct Run {
    std::unique_ptr<Backend> be = make_cpu_backend();
    ModelCtx c;
    RoutedExperts ex;
    int64_t held = 0;
    Tensor y, dx;
  };
  Run run[2];
  int64_t h_operand = 0;
  for (int cached = 0; cached < 2; ++cached) {
    Run& r = run[cached];
    r.c.be = r.be.get();
    r.c.precision = Precision::kFP8;
    r.c.fp8_swiglu_cache = cached == 1;
    ASSERT_TRUE(r.ex.init(r.c, "moe", 0, E, kDim, kHidden, /*seed=*/7, 0.05f).ok());
    Tensor x = testutil::randn(*r.be, {M, kDim}, 1), dy = testutil::randn(*r.be, {M, kDim}, 2);
    RowGroups groups = make_row_groups(*r.be, off).value();
    if (cached == 0) {  // the bytes of the SwiGLU output's grouped FP8 operand
      const int64_t before = r.be->memory().in_use;
      Tensor h = r.be->zeros({M, kHidden}, DType::kF32).value();
      const int64_t zeros = r.be->memory().in_use - before;
      auto hq = r.be->quantize_groups(h, groups, r.c.qp);
      ASSERT_TRUE(hq.ok());
      h_operand = r.be->memory().in_use - before - zeros;
    }
    ASSERT_TRUE(r.ex.forward(r.c, 0, x, groups).ok());  // warms the FP8 weight cache
    ASSERT_TRUE(r.ex.backward_input(r.c, 0, dy).ok());
    ASSERT_TRUE(r.ex.backward_weight(r.c, 0).ok());
    for (Param* p : r.ex.params()) ASSERT_TRUE(r.be->fill_zero(p->grad).ok());
    const int64_t before = r.be->memory().in_use;
    auto y = r.ex.forward(r.c, 1, x, groups);
    ASSERT_TRUE(y.ok()) << y.status().to_string();
    r.y = *y;
    r.held = r.be->memory().in_use - before - r.y.nbytes();
    auto dx = r.ex.backward_input(r.c, 1, dy);
    ASSERT_TRUE(dx.ok()) << dx.status().to_string();
    r.dx = *dx;
    ASSERT_TRUE(r.ex.backward_weight(r.c, 1).ok());
  }
  const int64_t scales = kernels::scale_count(Granularity::k1x128, M, kHidden) * 4;
  ASSERT_GT(h_operand, M * kHidden);
  EXPECT_EQ(run[0].held - run[1].held,
            4 * M * kHidden + h_operand - (2 * M * kHidden + 2 * scales));
  expect_same_bits(run[1].y, run[0].y, "y");
  auto rel = [](const Tensor& got, const Tensor& want) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < want.numel(); ++i) {
      const double w = want.data_as<float>()[i], d = got.data_as<float>()[i] - w;
      num += d * d;
      den += w * w;
    }
    return std::sqrt(num / den);
  };
  const double edx = rel(run[1].dx, run[0].dx);
  EXPECT_LT(edx, 0.12);
  EXPECT_GT(edx, 1e-3);
  const std::vector<Param*> p0 = run[0].ex.params(), p1 = run[1].ex.params();
  for (size_t i = 0; i < p0.size(); ++i) {
    if (rows[i / 3] == 0) continue;
    const double e = rel(p1[i]->grad, p0[i]->grad);
    EXPECT_LT(e, 0.12) << p0[i]->name;
    EXPECT_GT(e, 1e-3) << p0[i]->name;
  }
}

// The MoE's FP8 backward (backward_input from the unweighted gradient's codes, the gate applied
// to w2's dgrad result) against the plain backward of the weighted gradient w_r * dy_r. When dy
// is FP8-representable (its own quantize-dequantize) and every w_r a power of two or 0, scaling
// commutes exactly with power-of-two-scaled quantization and with the GEMMs' fp32 sums, so both
// give the same bits: dx and every weight gradient. Weights that are not powers of two do not
// (the check is not vacuous).
TEST(RoutedExperts, WeightedFp8BackwardIsThePreweightedOneForPowerOfTwoWeights) {
  std::unique_ptr<Backend> be = make_cpu_backend();
  ModelCtx c;
  c.be = be.get();
  c.precision = Precision::kFP8;
  c.qp.pow2 = true;
  const std::vector<int64_t> off = offsets_of({37, 0, 160, 16, 129});
  const int64_t M = off.back(), E = static_cast<int64_t>(off.size()) - 1;
  RowGroups groups = make_row_groups(*be, off).value();
  Tensor x = testutil::randn(*be, {M, kDim}, 1);
  Tensor dy = testutil::randn(*be, {M, kDim}, 2);
  ASSERT_TRUE(
      be->dequantize_groups(be->quantize_groups(dy, groups, c.qp).value(), groups, dy).ok());

  // Runs both backward forms with row weights `w`; true when every result has the same bits.
  auto same_bits = [&](const std::vector<float>& w) {
    RoutedExperts plain, weighted;
    EXPECT_TRUE(plain.init(c, "moe", 0, E, kDim, kHidden, 7, 0.05f).ok());
    EXPECT_TRUE(weighted.init(c, "moe", 0, E, kDim, kHidden, 7, 0.05f).ok());
    Tensor wt = be->empty({M}, DType::kF32).value();
    Tensor wdy = be->empty({M, kDim}, DType::kF32).value();
    for (int64_t r = 0; r < M; ++r) {
      wt.data_as<float>()[r] = w[r];
      for (int64_t k = 0; k < kDim; ++k)  // 0 + w*dy as gather_rows_scaled: no -0 rows
        wdy.data_as<float>()[r * kDim + k] = 0.0f + w[r] * dy.data_as<float>()[r * kDim + k];
    }
    EXPECT_TRUE(plain.forward(c, 0, x, groups).ok());
    EXPECT_TRUE(weighted.forward(c, 0, x, groups).ok());
    auto dx_plain = plain.backward_input(c, 0, wdy);
    auto dyq = be->quantize_groups(dy, groups, c.qp);
    EXPECT_TRUE(dx_plain.ok() && dyq.ok());
    auto dx_weighted = weighted.backward_input(c, 0, std::move(*dyq), wt, dy);
    EXPECT_TRUE(dx_weighted.ok()) << dx_weighted.status().to_string();
    EXPECT_TRUE(plain.backward_weight(c, 0).ok());
    EXPECT_TRUE(weighted.backward_weight(c, 0).ok());
    if (!dx_plain.ok() || !dx_weighted.ok()) return false;
    bool same = std::memcmp(dx_plain->data(), dx_weighted->data(), dx_plain->nbytes()) == 0;
    const std::vector<Param*> a = plain.params(), b = weighted.params();
    for (size_t i = 0; i < a.size(); ++i) {
      const bool s = std::memcmp(a[i]->grad.data(), b[i]->grad.data(), a[i]->grad.nbytes()) == 0;
      EXPECT_TRUE(s || !same) << a[i]->name << " differs though dx does not";
      same = same && s;
    }
    return same;
  };
  const float pow2[] = {1.0f, 0.5f, 2.0f, 0.0f, 0.25f, 0.125f};
  std::vector<float> w(M);
  for (int64_t r = 0; r < M; ++r) w[r] = pow2[(r * 7) % 6];
  EXPECT_TRUE(same_bits(w)) << "power-of-two and zero weights";
  for (int64_t r = 0; r < M; ++r) w[r] = 0.3f + 0.01f * static_cast<float>(r % 17);
  EXPECT_FALSE(same_bits(w)) << "weights that are not powers of two";
}

// One forward + backward of E experts with 24 rows each, FP8; the op counts.
std::vector<OpStats> profile_step(int64_t E) {
  testutil::ProfiledFp8Cpu p;
  Backend* be = p.be.get();
  ModelCtx& c = p.c;
  std::shared_ptr<OpProfile>& prof = p.prof;
  RoutedExperts ex;
  EXPECT_TRUE(ex.init(c, "moe", 0, E, kDim, kHidden, 3, 0.05f).ok());
  const int64_t M = 24 * E;
  Tensor x = testutil::randn(*be, {M, kDim}, 1), dy = testutil::randn(*be, {M, kDim}, 2);
  RowGroups groups = make_row_groups(*be, offsets_of(std::vector<int64_t>(E, 24))).value();
  prof->reset();
  EXPECT_TRUE(ex.forward(c, 0, x, groups).ok());
  EXPECT_TRUE(ex.backward_input(c, 0, dy).ok());
  EXPECT_TRUE(ex.backward_weight(c, 0).ok());
  return prof->totals();
}

TEST(RoutedExperts, RowWiseWorkDoesNotGrowWithTheExperts) {
  const std::vector<OpStats> two = profile_step(2), eight = profile_step(8);
  // Activations: x, h (forward), dy, dg, du (backward) quantized 1x128 once each; the cached x,
  // h requantized 128x1 from their FP8 codes and dy, dg, du quantized 128x1 once each; the
  // SwiGLU product and its backward once; bf16 rounding of g, u, h, y, dh, dg, du, dx, dx3 once
  // each. Weights: every expert's w1, w3 and w2 quantized 128x128 in one call per kind,
  // transposed in one.
  const std::vector<std::pair<std::string, int64_t>> once = {{"quantize_groups", 5},
                                                             {"requantize_transposed_groups", 2},
                                                             {"quantize_transposed_groups", 3},
                                                             {"swiglu_fwd", 1},
                                                             {"swiglu_bwd", 1},
                                                             {"round_bf16", 9},
                                                             {"quantize_blocks_batch", 3},
                                                             {"transpose_fp8_batch", 3},
                                                             {"gemm_fp8_grouped", 5}};
  for (const auto& [op, n] : once) {
    EXPECT_EQ(calls_of(two, op), n) << op;
    EXPECT_EQ(calls_of(eight, op), n) << op;
  }
  // The GEMMs (3 forward, 3 dgrad, 3 wgrad per expert) are 5 grouped calls: w1 + w3 forward,
  // w2 forward, w2 dgrad, w1 + w3 dgrad, every wgrad (a backend may run each call's GEMMs
  // concurrently); the weight-gradient adds are one call per kind; no per-expert quantization.
  EXPECT_EQ(calls_of(eight, "gemm_fp8"), 0);
  // Every expert's 9 products (each 2 * 24 rows * kDim * kHidden flops) are in those calls.
  double flops = 0;
  for (const OpStats& s : eight)
    if (s.op == "gemm_fp8_grouped") flops = s.flops;
  EXPECT_EQ(flops, 8.0 * 9 * 2 * 24 * kDim * kHidden);
  EXPECT_EQ(calls_of(eight, "axpy"), 1);        // dx += dx3
  EXPECT_EQ(calls_of(eight, "axpy_batch"), 3);  // every expert's gradient, once per kind
  for (const char* op : {"quantize", "quantize_transposed", "transpose_fp8"})
    EXPECT_EQ(calls_of(eight, op), 0) << op;
  EXPECT_EQ(calls_of(eight, "dequantize"), 0);
  EXPECT_EQ(calls_of(eight, "dequantize_groups"), 0);  // no fp32 copy of x or h
}

}  // namespace
}  // namespace fp8pipe::model
