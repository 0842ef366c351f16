// SwiGLU's w1 and w3 read the same input: in FP8 it is quantized once for both forward GEMMs and
// re-quantized (128x1) once for both weight gradients. Counted with the op profiler
// (core/op_profile.h): forward = 3 weight quantizations + x + h = 5 quantize calls (6 if x were
// quantized per layer); backward_weight = x^T once + h^T + 3 dY^T = 5 quantize_transposed (6).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "core/model/attention.h"
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

// Attention's projections that read the block's normed input (MLA wq_a and wkv_a; without a q
// latent wq and wkv_a; MHA wq, wk, wv) share it the same way: one 1x128 quantization of x in the
// forward, held once, and one 128x1 re-quantization for their weight gradients. Counted: forward
// = one quantization per weight (first forward) + x once + each other Linear's own input (MLA
// with q latent: q_norm's and kv_norm's outputs and the core's output for wo); backward_weight =
// one dY^T per weight + x once + the others' inputs.
TEST(AttentionSharing, ProjectionsReadingTheInputQuantizeItOnce) {
  struct Case {
    bool mla;
    int q_lora;
    int weights, other_inputs;
  };
  for (const Case& k : {Case{true, 32, 5, 3}, Case{true, 0, 4, 2}, Case{false, 0, 4, 1}}) {
    SCOPED_TRACE(testing::Message() << "mla " << k.mla << " q_lora " << k.q_lora);
    testutil::ProfiledFp8Cpu p;
    config::Model m;
    m.set_hidden(256);
    m.set_heads(2);
    m.set_init_std(0.05f);
    m.set_attention(k.mla ? config::Model::MLA : config::Model::MHA);
    config::Mla* a = m.mutable_mla();
    a->set_q_lora_rank(k.q_lora);
    a->set_kv_lora_rank(128);
    a->set_qk_nope_head_dim(64);
    a->set_qk_rope_head_dim(64);
    a->set_v_head_dim(128);
    Attention attn;
    ASSERT_TRUE(attn.init(p.c, "attn", m, /*seed=*/5).ok());
    const int64_t B = 2, T = 32;
    Tensor x = p.be->empty({B * T, 256}, DType::kF32).value();
    std::mt19937 rng(2);
    std::normal_distribution<float> d(0.0f, 1.0f);
    for (int64_t i = 0; i < x.numel(); ++i) x.data_as<float>()[i] = d(rng);
    p.prof->reset();
    auto y = attn.forward(p.c, 0, x, B, T);
    ASSERT_TRUE(y.ok()) << y.status().to_string();
    EXPECT_EQ(calls_of(p.prof->totals(), "quantize"), k.weights + 1 + k.other_inputs);
    ASSERT_TRUE(attn.backward_input(p.c, 0, *y).ok());
    p.prof->reset();
    ASSERT_TRUE(attn.backward_weight(p.c, 0).ok());
    EXPECT_EQ(calls_of(p.prof->totals(), "quantize_transposed"), k.weights);
    EXPECT_EQ(calls_of(p.prof->totals(), "requantize_transposed"), 1 + k.other_inputs);
    for (Param* w : attn.params()) {
      double ss = 0;
      for (int64_t i = 0; i < w->grad.numel(); ++i) ss += std::abs(w->grad.data_as<float>()[i]);
      EXPECT_GT(ss, 0.0) << w->name;
    }
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

// precision.fp8_swiglu_cache on the MoE's shared expert (a SwiGLU made with in_moe): g and u are
// held as FP8 1x128 (1 byte an element, a 4-byte scale per 128) instead of bf16, and w2's FP8
// input h (1 byte an element and its scales) is dropped until the backward rebuilds it, so the
// forward holds 2·n·H·2 + n·H + s − (2·n·H + 2·s) = 3·n·H − s bytes less (s = n·H/128·4, one
// 1x128 scale set). The output is bitwise the uncached one; the gradients read E4M3-rounded g and
// u and move within FP8's bound (the routed experts' test has the same bound); the backward
// frees everything. A dense FFN (in_moe false) ignores the flag: the same bits and bytes.
TEST(SwiGLUMemory, Fp8CacheInTheMoeHoldsLessWithinTheFp8Bound) {
  constexpr int64_t n = 64, dim = 256, hidden = 384;
  struct Run {
    int64_t held = 0, after = 0;
    std::vector<float> y, dx, grads;
  };
  auto run = [&](bool in_moe, bool cache) {
    Run r;
    auto be = make_cpu_backend();
    ModelCtx c;
    c.be = be.get();
    c.precision = Precision::kFP8;
    c.fp8_swiglu_cache = cache;
    SwiGLU f;
    EXPECT_TRUE(f.init(c, "ffn", dim, hidden, /*seed=*/3, 0.05f, false, in_moe).ok());
    Tensor x = be->empty({n, dim}, DType::kF32).value(),
           dy = be->empty({n, dim}, DType::kF32).value();
    std::mt19937 rng(7);
    std::normal_distribution<float> d(0.0f, 1.0f);
    for (int64_t i = 0; i < x.numel(); ++i) x.data_as<float>()[i] = d(rng);
    for (int64_t i = 0; i < dy.numel(); ++i) dy.data_as<float>()[i] = d(rng);
    auto y = f.forward(c, 0, x);  // also builds the FP8 weight caches
    EXPECT_TRUE(y.ok());
    const int64_t before = be->memory().in_use;  // x, dy, weights, y and what f holds
    r.held = before;
    r.y.assign(y->data_as<float>(), y->data_as<float>() + y->numel());
    auto dx = f.backward_input(c, 0, dy);
    EXPECT_TRUE(dx.ok());
    r.dx.assign(dx->data_as<float>(), dx->data_as<float>() + dx->numel());
    EXPECT_TRUE(f.backward_weight(c, 0).ok());
    for (Param* p : f.params()) {
      r.grads.insert(r.grads.end(), p->grad.data_as<float>(),
                     p->grad.data_as<float>() + p->grad.numel());
    }
    y = Tensor();
    dx = Tensor();
    r.after = be->memory().in_use;
    return r;
  };
  const Run plain = run(true, false), cached = run(true, true), dense = run(false, true);
  const int64_t s = n * hidden / 128 * 4;
  EXPECT_EQ(plain.held - cached.held, 3 * n * hidden - s);
  EXPECT_EQ(plain.after, cached.after) << "the backward frees what the cache holds";
  EXPECT_EQ(cached.y, plain.y) << "the forward is unchanged";
  auto rel = [](const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
      den += double(b[i]) * b[i];
    }
    return std::sqrt(num / den);
  };
  const double dgrad = rel(cached.dx, plain.dx), wgrad = rel(cached.grads, plain.grads);
  EXPECT_GT(dgrad, 0.0) << "the cache must change the gradients (E4M3 g, u)";
  EXPECT_GT(wgrad, 0.0);
  EXPECT_LT(dgrad, 0.12);
  EXPECT_LT(wgrad, 0.12);
  // A dense FFN: the flag changes nothing.
  EXPECT_EQ(dense.held, plain.held);
  EXPECT_EQ(dense.y, plain.y);
  EXPECT_EQ(dense.dx, plain.dx);
  EXPECT_EQ(dense.grads, plain.grads);
  std::printf(
      "shared-expert FP8 cache: %lld bytes less held; dx %.3g, weight grads %.3g relative\n",
      static_cast<long long>(plain.held - cached.held), dgrad, wgrad);
}

}  // namespace
}  // namespace fp8pipe::model
