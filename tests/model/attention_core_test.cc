// The attention core's two implementations (core/model/attention_core.h) on the CPU backend:
// the batched-GEMM path against the fused kernel (itself checked against finite differences in
// attention_test.cc) on random inputs, forward (o, lse) and backward (dq, dk, dv), for MLA-like
// (dk != dv) and MHA-like head widths, several sequences and a T that is not a multiple of
// anything; plus the new ops' own contracts (masking, lse, the softmax backward's row sums).
#include "core/model/attention_core.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <tuple>

#include "tests/test_random.h"

namespace fp8pipe::model {
namespace {

using testutil::randn;

// max |a - b| / (1 + max |a|)
double rel_diff(const Tensor& a, const Tensor& b) {
  double worst = 0, mag = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    mag = std::max(mag, std::fabs(double(a.data_as<float>()[i])));
    worst = std::max(worst, std::fabs(double(a.data_as<float>()[i]) - b.data_as<float>()[i]));
  }
  return worst / (1 + mag);
}

struct Case {
  int64_t B, T, H, dk, dv;
};

// One case's inputs (fixed seeds) and the core's forward + backward outputs under `c`.
struct CoreRun {
  Tensor q, k, v, dout;  // inputs
  Tensor o, lse, dq, dk, dv;
};
CoreRun run_core(Backend& be, ModelCtx c, const Case& k) {
  CoreRun r;
  const int64_t n = k.B * k.T;
  const AttnShape a{k.B, k.T, k.H, 1.0f / std::sqrt(float(k.dk))};
  r.q = randn(be, {n, k.H * k.dk}, 1, 2.0f), r.k = randn(be, {n, k.H * k.dk}, 2, 2.0f);
  r.v = randn(be, {n, k.H * k.dv}, 3), r.dout = randn(be, {n, k.H * k.dv}, 4);
  c.be = &be;
  r.o = be.empty({n, k.H * k.dv}, DType::kF32).value();
  r.lse = be.empty({k.B * k.H * k.T}, DType::kF32).value();
  Status s = attention_core_fwd(c, r.q, r.k, r.v, a, r.o, r.lse);
  EXPECT_TRUE(s.ok()) << s.to_string();
  r.dq = be.empty(r.q.shape(), DType::kF32).value();
  r.dk = be.empty(r.k.shape(), DType::kF32).value();
  r.dv = be.empty(r.v.shape(), DType::kF32).value();
  s = attention_core_bwd(c, r.dout, r.q, r.k, r.v, r.o, r.lse, a, r.dq, r.dk, r.dv);
  EXPECT_TRUE(s.ok()) << s.to_string();
  return r;
}

TEST(AttentionCore, GemmPathMatchesFusedKernel) {
  auto be = make_cpu_backend();
  for (const Case& k : {Case{2, 33, 3, 24, 16}, Case{1, 64, 4, 32, 32}, Case{3, 7, 2, 8, 12}}) {
    SCOPED_TRACE(testing::Message() << "B " << k.B << " T " << k.T << " H " << k.H << " dk " << k.dk
                                    << " dv " << k.dv);
    ModelCtx fused, gemm;
    gemm.attention_gemm = true;
    const CoreRun x = run_core(*be, fused, k), y = run_core(*be, gemm, k);
    EXPECT_LT(rel_diff(x.o, y.o), 2e-6);
    EXPECT_LT(rel_diff(x.lse, y.lse), 2e-6);
    EXPECT_LT(rel_diff(x.dq, y.dq), 1e-5);
    EXPECT_LT(rel_diff(x.dk, y.dk), 1e-5);
    EXPECT_LT(rel_diff(x.dv, y.dv), 1e-5);
    EXPECT_GT(rel_diff(x.dq, x.dk), 1e-2);  // the comparison can fail: different tensors differ
  }
}

// precision.attention=gemm_bf16: the same GEMMs on bf16 operands (Q, K, V, dO, P, dS rounded to
// bf16, fp32 accumulation, fp32 softmax). Against the fp32 kernel the error is that of bf16
// rounding (2^-9 relative per operand, a few of them chained in the backward): measured up to
// ~9e-3 here (relative to the largest value), bounded at 2e-2; it must also differ (the bf16
// path ran).
TEST(AttentionCore, Bf16GemmPathTracksFp32WithinBf16Rounding) {
  auto be = make_cpu_backend();
  for (const Case& k : {Case{2, 33, 3, 24, 16}, Case{1, 64, 4, 32, 32}}) {
    SCOPED_TRACE(testing::Message() << "B " << k.B << " T " << k.T);
    ModelCtx fused, bf16;
    bf16.attention_gemm = bf16.attention_bf16 = true;
    const CoreRun x = run_core(*be, fused, k), y = run_core(*be, bf16, k);
    for (auto [name, a, b] : {std::tuple{"o", &x.o, &y.o}, std::tuple{"lse", &x.lse, &y.lse},
                              std::tuple{"dq", &x.dq, &y.dq}, std::tuple{"dk", &x.dk, &y.dk},
                              std::tuple{"dv", &x.dv, &y.dv}}) {
      const double d = rel_diff(*a, *b);
      EXPECT_LT(d, 2e-2) << name;
      EXPECT_GT(d, 1e-5) << name << ": the bf16 path did not round";
      if (std::getenv("FP8PIPE_TEST_VERBOSE")) std::printf("%s %.3e\n", name, d);
    }
  }
}

// Row r of a [B*H*T, T] block is query position r % T: masked columns give p = 0, each row's p
// sums to 1 with lse = log sum exp over the unmasked columns (fp64 here), the recompute path
// reproduces p from lse, and softmax_bwd's rows of ds sum to 0 (d/ds of sum p = 0).
TEST(AttentionCore, CausalSoftmaxAndItsBackward) {
  auto be = make_cpu_backend();
  const int64_t T = 9, R = 2 * T;
  Tensor s = randn(*be, {R, T}, 5, 3.0f), p = be->empty({R, T}, DType::kF32).value();
  Tensor lse = be->empty({R}, DType::kF32).value();
  ASSERT_TRUE(be->causal_softmax(s, p, lse, false).ok());
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = r % T + 1;
    double l = 0, sum = 0;
    for (int64_t j = 0; j < n; ++j) l += std::exp(double(s.data_as<float>()[r * T + j]));
    EXPECT_NEAR(lse.data_as<float>()[r], std::log(l), 1e-5) << r;
    for (int64_t j = 0; j < T; ++j) {
      const float pj = p.data_as<float>()[r * T + j];
      if (j >= n) {
        EXPECT_EQ(pj, 0.0f) << r << "," << j;
      }
      sum += pj;
    }
    EXPECT_NEAR(sum, 1.0, 1e-5) << r;
  }
  Tensor p2 = be->empty({R, T}, DType::kF32).value();
  ASSERT_TRUE(be->causal_softmax(s, p2, lse, true).ok());
  for (int64_t i = 0; i < p.numel(); ++i) EXPECT_EQ(p.data_as<float>()[i], p2.data_as<float>()[i]);
  Tensor dp = randn(*be, {R, T}, 6), ds = be->empty({R, T}, DType::kF32).value();
  ASSERT_TRUE(be->softmax_bwd(p, dp, ds).ok());
  for (int64_t r = 0; r < R; ++r) {
    double sum = 0, mag = 0;
    for (int64_t j = 0; j < T; ++j) {
      sum += ds.data_as<float>()[r * T + j];
      mag += std::fabs(ds.data_as<float>()[r * T + j]);
    }
    EXPECT_NEAR(sum, 0.0, 1e-6 * (1 + mag)) << r;
    if (r % T > 0) {  // a one-column row has p = 1 and ds = 0
      EXPECT_GT(mag, 0.0) << r;
    }
  }
  Tensor short_lse = be->empty({R - 1}, DType::kF32).value();
  EXPECT_FALSE(be->causal_softmax(s, p, short_lse, false).ok());
}

TEST(AttentionCore, GemmBatchedRejectsViewsOutsideTheTensor) {
  auto be = make_cpu_backend();
  Tensor a = randn(*be, {4, 8}, 7), b = randn(*be, {4, 8}, 8);
  Tensor c = be->zeros({2, 16}, DType::kF32).value();
  GemmBatch g;
  g.batch = 2, g.M = 4, g.N = 4, g.K = 4, g.trans_b = true;
  g.lda = 8, g.ldb = 8, g.ldc = 8, g.stride_a = 4, g.stride_b = 4, g.stride_c = 4;
  ASSERT_TRUE(be->gemm_batched(a, b, c, g).ok());  // two 4x4 blocks of A B^T side by side in C
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        double ref = 0;
        for (int l = 0; l < 4; ++l)
          ref +=
              double(a.data_as<float>()[i * 8 + h * 4 + l]) * b.data_as<float>()[j * 8 + h * 4 + l];
        EXPECT_NEAR(c.data_as<float>()[i * 8 + h * 4 + j], ref, 1e-5);
      }
  g.stride_c = 5;  // the second block would end past C
  const Status s = be->gemm_batched(a, b, c, g);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("gemm_batched: C views"), std::string::npos) << s.to_string();
}

}  // namespace
}  // namespace fp8pipe::model
