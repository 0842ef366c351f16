// The per-operator profile (core/op_profile.h): the wrapper forwards every call unchanged (bitwise
// the plain backend's results), counts calls and GEMM FLOPs exactly (2·M·N·K computed here), and
// its times add up to no more than the wall time around the calls.
#include "core/op_profile.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <random>

namespace fp8pipe {
namespace {

Tensor filled(Backend& be, Shape shape, uint32_t seed) {
  Tensor t = be.empty(shape, DType::kF32).value();
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) t.data_as<float>()[i] = d(rng);
  return t;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

const OpStats* find(const std::vector<OpStats>& s, const std::string& op) {
  for (const OpStats& x : s)
    if (x.op == op) return &x;
  return nullptr;
}

TEST(OpProfile, ForwardsBitwiseAndCountsCallsAndFlops) {
  std::unique_ptr<Backend> plain = make_cpu_backend();
  std::shared_ptr<OpProfile> prof;
  std::unique_ptr<Backend> be = make_profiled_backend(make_cpu_backend(), &prof);
  ASSERT_TRUE(prof);
  EXPECT_EQ(be->device(), plain->device());
  EXPECT_EQ(be->name(), plain->name());

  const int64_t M = 64, N = 256, K = 384;
  Tensor x = filled(*plain, {M, K}, 1), w = filled(*plain, {N, K}, 2);
  const QuantParams qp{};
  const auto wall0 = std::chrono::steady_clock::now();
  Tensor out_p = plain->empty({M, N}, DType::kF32).value();
  Tensor out_w = be->empty({M, N}, DType::kF32).value();
  for (int rep = 0; rep < 3; ++rep) {
    Tensor qx_p = plain->quantize(x, Granularity::k1x128, qp).value();
    Tensor qw_p = plain->quantize(w, Granularity::k128x128, qp).value();
    Tensor qx_w = be->quantize(x, Granularity::k1x128, qp).value();
    Tensor qw_w = be->quantize(w, Granularity::k128x128, qp).value();
    ASSERT_TRUE(same_bytes(qx_p, qx_w));
    ASSERT_TRUE(plain->gemm_fp8(qx_p, qw_p, out_p, GemmMode::kExact).ok());
    ASSERT_TRUE(be->gemm_fp8(qx_w, qw_w, out_w, GemmMode::kExact).ok());
    EXPECT_TRUE(same_bytes(out_p, out_w)) << "rep " << rep;
  }
  // fp32 GEMM with a transpose: C[M][N] = X[M][K] . W[N][K]^T
  Tensor c_p = plain->empty({M, N}, DType::kF32).value();
  Tensor c_w = be->empty({M, N}, DType::kF32).value();
  ASSERT_TRUE(plain->gemm(x, false, w, true, c_p).ok());
  ASSERT_TRUE(be->gemm(x, false, w, true, c_w).ok());
  EXPECT_TRUE(same_bytes(c_p, c_w));
  // an error passes through unchanged (shape mismatch)
  Tensor bad = be->empty({M, N + 1}, DType::kF32).value();
  EXPECT_FALSE(be->gemm(x, false, w, true, bad).ok());
  const double wall_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - wall0).count();

  const std::vector<OpStats> s = prof->totals();
  const OpStats* q = find(s, "quantize");
  const OpStats* g8 = find(s, "gemm_fp8");
  const OpStats* g32 = find(s, "gemm_f32");
  ASSERT_TRUE(q && g8 && g32);
  EXPECT_EQ(q->calls, 6);
  EXPECT_EQ(g8->calls, 3);
  EXPECT_EQ(g32->calls, 2);  // the refused call counts too
  EXPECT_DOUBLE_EQ(g8->flops, 3 * 2.0 * M * N * K);
  EXPECT_DOUBLE_EQ(g32->flops, 2.0 * M * N * K);  // the refused call adds none
  EXPECT_EQ(q->flops, 0.0);
  EXPECT_EQ(find(s, "rmsnorm_fwd"), nullptr);  // never called: no row
  double device = 0, host = 0;
  for (const OpStats& x : s) {
    EXPECT_GE(x.device_ms, 0.0) << x.op;
    device += x.device_ms;
    host += x.host_ms;
  }
  EXPECT_GT(g8->device_ms, 0.0);
  EXPECT_GT(g8->host_ms, 0.0);
  EXPECT_LE(device, wall_ms);  // inline CPU stream: the timed spans do not overlap
  EXPECT_LE(host, wall_ms);
  for (size_t i = 1; i < s.size(); ++i) EXPECT_GE(s[i - 1].device_ms, s[i].device_ms);

  prof->reset();
  EXPECT_TRUE(prof->totals().empty());
  ASSERT_TRUE(be->fill_zero(out_w).ok());
  const std::vector<OpStats> after = prof->totals();
  ASSERT_EQ(after.size(), 1u);
  EXPECT_EQ(after[0].op, "fill_zero");
  EXPECT_EQ(after[0].calls, 1);
}

TEST(OpProfile, TableFoldsTheTailAndJsonKeepsEveryOperator) {
  std::vector<OpStats> s = {{"gemm_fp8", 10, 40.0, 5.0, 4e12},
                            {"quantize", 20, 30.0, 6.0, 0},
                            {"add", 5, 20.0, 1.0, 0},
                            {"axpy", 7, 10.0, 2.0, 0}};
  const std::string t = format_op_table(s, 200.0, 2);
  EXPECT_NE(t.find("gemm_fp8"), std::string::npos);
  EXPECT_NE(t.find("quantize"), std::string::npos);
  EXPECT_EQ(t.find("axpy"), std::string::npos);  // folded into (others)
  // (others): 5 + 7 calls, 20 + 10 ms = 30% of the 100 ms device total
  EXPECT_NE(t.find("(others)"), std::string::npos);
  const std::string others =
      t.substr(t.find("(others)"), t.find('\n', t.find("(others)")) - t.find("(others)"));
  EXPECT_NE(others.find(" 12 "), std::string::npos) << others;
  EXPECT_NE(others.find("30.000"), std::string::npos) << others;
  EXPECT_NE(others.find("30.0%"), std::string::npos) << others;
  // 4e12 FLOP in 40 ms = 100 TFLOP/s; busy 100 of 200 ms wall
  EXPECT_NE(t.find("100.00"), std::string::npos) << t;
  EXPECT_NE(t.find("busy 50.0%"), std::string::npos) << t;

  const json::Value j = op_stats_json(s, 200.0);
  const std::string text = json::write(j);
  for (const char* op : {"gemm_fp8", "quantize", "add", "axpy"})
    EXPECT_NE(text.find(std::string("\"") + op + "\""), std::string::npos) << op;
  auto parsed = json::parse(text);
  ASSERT_TRUE(parsed.ok());
}

}  // namespace
}  // namespace fp8pipe
