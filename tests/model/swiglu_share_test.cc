// SwiGLU's w1 and w3 read the same input: in FP8 it is quantized once for both forward GEMMs and
// re-quantized (128x1) once for both weight gradients. Counted with the op profiler
// (core/op_profile.h): forward = 3 weight quantizations + x + h = 5 quantize calls (6 if x were
// quantized per layer); backward_weight = x^T once + h^T + 3 dY^T = 5 quantize_transposed (6).
#include <gtest/gtest.h>

#include <random>

#include "core/model/layers.h"
#include "core/op_profile.h"
#include "tests/test_profiled.h"

namespace fp8pipe::model {
namespace {

TEST(SwiGLUSharing, W1AndW3QuantizeTheirInputOnce) {
  testutil::ProfiledFp8Cpu p;
  Backend* be = p.be.get();
  ModelCtx& c = p.c;
  std::shared_ptr<OpProfile>& prof = p.prof;
  SwiGLU f;
  ASSERT_TRUE(f.init(c, "ffn", 256, 384, /*seed=*/3, 0.05f).ok());
  Tensor x = be->empty({64, 256}, DType::kF32).value(),
         dy = be->empty({64, 256}, DType::kF32).value();
  std::mt19937 rng(1);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (int64_t i = 0; i < x.numel(); ++i) x.data_as<float>()[i] = d(rng);
  for (int64_t i = 0; i < dy.numel(); ++i) dy.data_as<float>()[i] = d(rng);
  prof->reset();
  ASSERT_TRUE(f.forward(c, 0, x).ok());
  EXPECT_EQ(calls_of(prof->totals(), "quantize"), 5);
  EXPECT_EQ(calls_of(prof->totals(), "gemm_fp8"), 3);
  ASSERT_TRUE(f.backward_input(c, 0, dy).ok());
  prof->reset();
  ASSERT_TRUE(f.backward_weight(c, 0).ok());
  // dY^T of w1, w3, w2 quantized 128x1; x's and h's FP8 caches requantized (w1 and w3 share x's)
  EXPECT_EQ(calls_of(prof->totals(), "quantize_transposed"), 3);
  EXPECT_EQ(calls_of(prof->totals(), "requantize_transposed"), 2);
  EXPECT_EQ(calls_of(prof->totals(), "dequantize"), 0);
  EXPECT_EQ(calls_of(prof->totals(), "gemm_fp8"), 3);
  for (Param* p : f.params()) {  // every weight got a gradient
    double ss = 0;
    for (int64_t i = 0; i < p->grad.numel(); ++i) ss += std::abs(p->grad.data_as<float>()[i]);
    EXPECT_GT(ss, 0.0) << p->name;
  }
}

// What a SwiGLU holds from its forward to its backward, counted by Backend::memory: under BF16
// the bf16 input of w1 and w3 (shared, n x dim), w2's bf16 input h (n x hidden), the product's
// inputs g and u as bf16 (2 x n x hidden; they are bf16-valued GEMM outputs), and the three
// bf16 weight copies made at the first forward; 2 bytes each. FP32 holds fp32 x, h, g, u and no
// weight copies. The backward and the weight gradients leave only the weight copies.
TEST(SwiGLUMemory, HoldsItsBf16ValuedActivationsAsBf16) {
  constexpr int64_t n = 64, dim = 256, hidden = 384;
  for (Precision p : {Precision::kBF16, Precision::kFP32}) {
    SCOPED_TRACE(static_cast<int>(p));
    auto be = make_cpu_backend();
    ModelCtx c;
    c.be = be.get();
    c.precision = p;
    SwiGLU f;
    ASSERT_TRUE(f.init(c, "ffn", dim, hidden, /*seed=*/3, 0.05f).ok());
    Tensor x = be->zeros({n, dim}, DType::kF32).value(),
           dy = be->zeros({n, dim}, DType::kF32).value();
    const int64_t before = be->memory().in_use;
    ASSERT_TRUE(f.forward(c, 0, x).ok());
    const bool bf16 = p == Precision::kBF16;
    const int64_t weights = bf16 ? 3 * hidden * dim * 2 : 0;
    const int64_t held = bf16 ? 2 * (n * dim + 3 * n * hidden) : 4 * 3 * n * hidden;
    EXPECT_EQ(be->memory().in_use - before, weights + held);
    ASSERT_TRUE(f.backward_input(c, 0, dy).ok());
    ASSERT_TRUE(f.backward_weight(c, 0).ok());
    EXPECT_EQ(be->memory().in_use - before, weights);
  }
}

}  // namespace
}  // namespace fp8pipe::model
