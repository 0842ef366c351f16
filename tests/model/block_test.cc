// train.recompute=rmsnorm at the block level: what a block holds between its forward and its
// backward falls by exactly the projections' copies of the two normed inputs, and the block
// computes the same bits. The expected bytes are measured independently: a 1x128 quantization
// and a bf16 cast of an [n, hidden] tensor, each counted alone by Backend::memory.
#include "core/model/block.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

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

// Bytes a [kN, kHidden] tensor's 1x128 FP8 quantization and its bf16 copy hold.
std::pair<int64_t, int64_t> operand_bytes() {
  auto be = make_cpu_backend();
  Tensor x = be->empty({kN, kHidden}, DType::kF32).value();
  for (int64_t i = 0; i < x.numel(); ++i) x.data_as<float>()[i] = 1.0f + 0.01f * (i % 7);
  const int64_t base = be->memory().in_use;
  int64_t fp8 = 0, bf16 = 0;
  {
    auto q = be->quantize(x, Granularity::k1x128, QuantParams{});
    EXPECT_TRUE(q.ok());
    fp8 = be->memory().in_use - base;
  }
  {
    Tensor b = be->empty({kN, kHidden}, DType::kBF16).value();
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
    // wkv_a) and the FFN's: a dense SwiGLU's FP8 copy (w1 and w3), or the MoE's router bf16 copy
    // and its shared expert's FP8 copy.
    const int64_t per_mb = fp8 + (moe ? bf16 + fp8 : fp8);
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
