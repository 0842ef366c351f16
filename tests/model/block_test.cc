// train.recompute=rmsnorm at the block level: what a block holds between its forward and its
// backward falls by exactly the projections' copies of the two normed inputs and of MLA's two
// normed latents, and the block
// computes the same bits. The expected bytes are measured independently: a 1x128 quantization
// and a bf16 cast of an [n, hidden] tensor, each counted alone by Backend::memory. Also MLA's
// latent norms, which hold their bf16-valued input as bf16.
#include "core/model/block.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "kernels/cpu/fp8_codec.h"

namespace fp8pipe::model {
namespace {

constexpr int64_t kHidden = 256, kB = 2, kT = 16, kN = kB * kT;

config::Model block_model() {
  config::Model m;
  m.set_hidden(kHidden);
  m.set_heads(2);
  m.set_init_std(0.05f);
  m.set_attention(config::Model::MLA);
  m.set_ffn_hidden(384);
  config::Mla* a = m.mutable_mla();
  a->set_q_lora_rank(128);
  a->set_kv_lora_rank(128);
  a->set_qk_nope_head_dim(64);
  a->set_qk_rope_head_dim(64);
  a->set_v_head_dim(128);
  config::Moe* e = m.mutable_moe();
  e->set_routed_experts(4);
  e->set_shared_experts(1);
  e->set_topk(2);
  e->set_expert_hidden(128);
  return m;
}

struct BlockRun {
  std::unique_ptr<Backend> be = make_cpu_backend();
  ModelCtx c;
  Block blk;
  BlockRun(bool moe, bool recompute) {
    c.be = be.get();
    c.precision = Precision::kFP8;
    c.recompute_norm = recompute;
    const Status s = blk.init(c, "layers.0", block_model(), moe, /*seed=*/4);
    EXPECT_TRUE(s.ok()) << s.to_string();
  }
  Tensor tensor(uint32_t seed) {
    Tensor t = be->empty({kN, kHidden}, DType::kF32).value();
    std::mt19937 rng(seed);
    std::normal_distribution<float> d(0.0f, 1.0f);
    for (int64_t i = 0; i < t.numel(); ++i) t.data_as<float>()[i] = d(rng);
    return t;
  }
  std::vector<float> values(const Tensor& t) {
    return std::vector<float>(t.data_as<float>(), t.data_as<float>() + t.numel());
  }
};

// Bytes a [kN, cols] tensor's 1x128 FP8 quantization and its bf16 copy hold.
std::pair<int64_t, int64_t> operand_bytes(int64_t cols = kHidden) {
  auto be = make_cpu_backend();
  Tensor x = be->empty({kN, cols}, DType::kF32).value();
  for (int64_t i = 0; i < x.numel(); ++i) x.data_as<float>()[i] = 1.0f + 0.01f * (i % 7);
  const int64_t base = be->memory().in_use;
  int64_t fp8 = 0, bf16 = 0;
  {
    auto q = be->quantize(x, Granularity::k1x128, QuantParams{});
    EXPECT_TRUE(q.ok());
    fp8 = be->memory().in_use - base;
  }
  {
    Tensor b = be->empty({kN, cols}, DType::kBF16).value();
    bf16 = be->memory().in_use - base;
  }
  return {fp8, bf16};
}

// Forward two micro-batches, backward them in reverse with deferred weight gradients.
TEST(Block, RecomputedNormsHoldExactlyTheirOutputsLess) {
  const auto [fp8, bf16] = operand_bytes();
  EXPECT_GT(fp8, kN * kHidden) << "codes plus scales";
  for (bool moe : {false, true}) {
    SCOPED_TRACE(moe ? "MoE block" : "dense block");
    BlockRun keep(moe, false), re(moe, true);
    // Dropped per micro-batch: the attention's shared FP8 copy of the normed input (wq_a and
    // wkv_a), wq_b's and wkv_b's FP8 copies of the normed latents (q_lora, kv_lora wide), and
    // the FFN's: a dense SwiGLU's FP8 copy (w1 and w3), or the MoE's router bf16 copy and its
    // shared expert's FP8 copy.
    const int64_t latents = operand_bytes(block_model().mla().q_lora_rank()).first +
                            operand_bytes(block_model().mla().kv_lora_rank()).first;
    const int64_t per_mb = fp8 + latents + (moe ? bf16 + fp8 : fp8);
    // inputs on a third backend, so that neither run's count includes them
    BlockRun inputs(moe, false);
    std::vector<Tensor> x = {inputs.tensor(1), inputs.tensor(2)};
    std::vector<Tensor> dy = {inputs.tensor(3), inputs.tensor(4)};
    std::vector<std::vector<float>> yk, yr;
    for (int mb : {0, 1}) {
      auto a = keep.blk.forward(keep.c, mb, x[mb], kB, kT);
      auto b = re.blk.forward(re.c, mb, x[mb], kB, kT);
      ASSERT_TRUE(a.ok() && b.ok());
      EXPECT_EQ(re.values(*b), keep.values(*a)) << "mb " << mb;
    }
    EXPECT_EQ(keep.be->memory().in_use - re.be->memory().in_use, 2 * per_mb);
    for (int mb : {1, 0}) {
      auto a = keep.blk.backward_input(keep.c, mb, dy[mb]);
      auto b = re.blk.backward_input(re.c, mb, dy[mb]);
      ASSERT_TRUE(a.ok() && b.ok()) << b.status().to_string();
      EXPECT_EQ(re.values(*b), keep.values(*a)) << "dx of mb " << mb;
    }
    for (int mb : {0, 1}) {
      ASSERT_TRUE(keep.blk.backward_weight(keep.c, mb).ok());
      ASSERT_TRUE(re.blk.backward_weight(re.c, mb).ok());
    }
    const std::vector<Param*> pk = keep.blk.params(), pr = re.blk.params();
    ASSERT_EQ(pk.size(), pr.size());
    for (size_t i = 0; i < pk.size(); ++i) {
      EXPECT_EQ(re.values(pr[i]->grad), keep.values(pk[i]->grad)) << pk[i]->name;
    }
    EXPECT_EQ(re.be->memory().in_use, keep.be->memory().in_use) << "all saved state freed";
  }
}

}  // namespace
}  // namespace fp8pipe::model

namespace fp8pipe::model {
namespace {

// MLA's latent norms (q_norm, kv_norm) read wq_a's and wkv_a's outputs, bf16-valued outside FP32:
// they hold their input as bf16. Against a norm holding fp32: after the forward (the caller's
// input and output released) it holds exactly 2 bytes an element less, and its output, input
// gradient and weight gradient are bitwise the same.
TEST(RMSNormMemory, Bf16ValuedInputIsHeldAsBf16WithTheSameResults) {
  constexpr int64_t n = 48, d = 160;
  std::vector<float> xv(n * d), dyv(n * d);
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (float& v : xv) v = kernels::bf16_to_float(kernels::float_to_bf16(g(rng)));  // bf16 values
  for (float& v : dyv) v = g(rng);
  struct Norm {
    std::unique_ptr<Backend> be = make_cpu_backend();
    ModelCtx c;
    RMSNorm norm;
    int64_t held = 0;
    std::vector<float> y, dx, dw;
  };
  Norm runs[2];
  for (int bf16 = 0; bf16 < 2; ++bf16) {
    Norm& r = runs[bf16];
    r.c.be = r.be.get();
    r.c.precision = Precision::kFP8;
    ASSERT_TRUE(r.norm.init(r.c, "q_norm.weight", d, 1e-6f, /*seed=*/2, bf16 == 1).ok());
    const int64_t base = r.be->memory().in_use;
    {
      Tensor x = r.be->empty({n, d}, DType::kF32).value();
      std::copy(xv.begin(), xv.end(), x.data_as<float>());
      auto y = r.norm.forward(r.c, 0, x);
      ASSERT_TRUE(y.ok());
      r.y.assign(y->data_as<float>(), y->data_as<float>() + n * d);
    }
    r.held = r.be->memory().in_use - base;
    Tensor dy = r.be->empty({n, d}, DType::kF32).value();
    std::copy(dyv.begin(), dyv.end(), dy.data_as<float>());
    auto dx = r.norm.backward(r.c, 0, dy);
    ASSERT_TRUE(dx.ok());
    r.dx.assign(dx->data_as<float>(), dx->data_as<float>() + n * d);
    const Tensor& gw = r.norm.weight().grad;
    r.dw.assign(gw.data_as<float>(), gw.data_as<float>() + d);
  }
  EXPECT_EQ(runs[0].held - runs[1].held, n * d * 2);
  EXPECT_EQ(runs[0].held, n * d * 4 + n * 4) << "fp32 input and rstd";
  EXPECT_EQ(runs[1].y, runs[0].y);
  EXPECT_EQ(runs[1].dx, runs[0].dx);
  EXPECT_EQ(runs[1].dw, runs[0].dw);
}

// precision.bf16_norm_inputs: a block's norm (residual) reads its fp32 input rounded to bf16 and
// holds that: its output and gradients are bitwise those of a plain norm given the rounded input
// (an independent rounding here), it holds 2 bytes an element (+ rstd), and without the flag it
// holds the fp32 input.
TEST(RMSNormMemory, ResidualNormReadsAndHoldsBf16UnderTheFlag) {
  constexpr int64_t n = 40, d = 192;
  std::vector<float> xv(n * d), xr(n * d), dyv(n * d);
  std::mt19937 rng(5);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (int64_t i = 0; i < n * d; ++i) {
    xv[i] = g(rng);  // fp32 residual values, not bf16
    xr[i] = kernels::bf16_to_float(kernels::float_to_bf16(xv[i]));
    dyv[i] = g(rng);
  }
  struct Out {
    int64_t held = 0;
    std::vector<float> y, dx, dw;
  };
  // residual norm under `flag` given `input`
  auto run = [&](bool flag, const std::vector<float>& input) {
    Out o;
    auto be = make_cpu_backend();
    ModelCtx c;
    c.be = be.get();
    c.precision = Precision::kFP8;
    c.bf16_norm_inputs = flag;
    RMSNorm norm;
    EXPECT_TRUE(norm.init(c, "layers.0.attn_norm.weight", d, 1e-6f, 2, false, true).ok());
    const int64_t base = be->memory().in_use;
    {
      Tensor x = be->empty({n, d}, DType::kF32).value();
      std::copy(input.begin(), input.end(), x.data_as<float>());
      auto y = norm.forward(c, 0, x);
      EXPECT_TRUE(y.ok());
      o.y.assign(y->data_as<float>(), y->data_as<float>() + n * d);
    }
    o.held = be->memory().in_use - base;
    Tensor dy = be->empty({n, d}, DType::kF32).value();
    std::copy(dyv.begin(), dyv.end(), dy.data_as<float>());
    auto dx = norm.backward(c, 0, dy);
    EXPECT_TRUE(dx.ok());
    o.dx.assign(dx->data_as<float>(), dx->data_as<float>() + n * d);
    o.dw.assign(norm.weight().grad.data_as<float>(), norm.weight().grad.data_as<float>() + d);
    return o;
  };
  const Out flagged = run(true, xv), plain_rounded = run(false, xr), plain = run(false, xv);
  EXPECT_EQ(flagged.y, plain_rounded.y);
  EXPECT_EQ(flagged.dx, plain_rounded.dx);
  EXPECT_EQ(flagged.dw, plain_rounded.dw);
  EXPECT_NE(flagged.y, plain.y) << "the input was rounded";
  EXPECT_EQ(flagged.held, n * d * 2 + n * 4);
  EXPECT_EQ(plain.held, n * d * 4 + n * 4);
}

}  // namespace
}  // namespace fp8pipe::model
