// Pipeline readiness: a model split into chunks (embedding + first blocks | remaining blocks +
// head/MTP) composes, by passing activations and gradients by hand, to exactly the single-model
// loss and gradients (same init by global name), which is what the executor relies on.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "core/config.h"
#include "core/model/transformer.h"

namespace fp8pipe::model {
namespace {

config::Config tiny() {
  auto cfg = load_config(std::string(FP8PIPE_SOURCE_DIR) + "/configs/tiny.textproto",
                         std::vector<std::string>{"--precision.mode=FP32", "--train.seq_len=8"});
  EXPECT_TRUE(cfg.ok()) << cfg.status().to_string();
  return *cfg;
}

MicroBatch batch(int64_t B, int64_t T, int vocab) {
  MicroBatch mb;
  mb.B = B;
  mb.T = T;
  for (int64_t i = 0; i < B * (T + 1); ++i)
    mb.tokens.push_back(static_cast<int32_t>((i * 37 + 11) % vocab));
  return mb;
}

std::map<std::string, std::vector<float>> grads(Model& m) {
  std::map<std::string, std::vector<float>> g;
  for (Param* p : m.params()) {
    const float* d = p->grad.data_as<float>();
    auto& v = g[p->name];
    if (v.empty())
      v.assign(d, d + p->grad.numel());
    else
      for (int64_t i = 0; i < p->grad.numel(); ++i) v[i] += d[i];  // embedding copies sum
  }
  return g;
}

TEST(ModelPart, TwoChunksComposeToTheWholeModel) {
  const auto cfg = tiny();
  auto be = make_cpu_backend();
  ModelCtx c;
  c.be = be.get();
  const uint64_t seed = 7;
  Model whole, first, last;
  ASSERT_TRUE(whole.init(c, cfg.model(), seed).ok());
  ASSERT_TRUE(first.init(c, cfg.model(), seed, {0, 2, true, false}).ok());
  ASSERT_TRUE(last.init(c, cfg.model(), seed, {2, -1, false, true}).ok());
  EXPECT_EQ(first.num_blocks(), 2);
  EXPECT_EQ(last.num_blocks(), cfg.model().layers() - 2);
  const MicroBatch mb = batch(2, 8, cfg.model().vocab_size());

  auto lw = whole.forward(c, 0, mb);
  ASSERT_TRUE(lw.ok()) << lw.status().to_string();
  ASSERT_TRUE(whole.backward(c, 0, 1.0f).ok());

  // Chunked: F of chunk 1, send x; F of chunk 2 with the loss; B of chunk 2, send dx; B chunk 1.
  Tensor x = first.embed_forward(c, 0, mb).value();
  for (int i = 0; i < first.num_blocks(); ++i)
    x = first.block(i).forward(c, 0, x, mb.B, mb.T).value();
  Tensor h = x;
  for (int i = 0; i < last.num_blocks(); ++i)
    h = last.block(i).forward(c, 0, h, mb.B, mb.T).value();
  auto lc = last.head_forward(c, 0, h, mb);
  ASSERT_TRUE(lc.ok()) << lc.status().to_string();
  Tensor d = last.head_backward_input(c, 0, 1.0f).value();
  ASSERT_TRUE(last.head_backward_weight(c, 0).ok());
  for (int i = last.num_blocks() - 1; i >= 0; --i) {
    d = last.block(i).backward_input(c, 0, d).value();
    ASSERT_TRUE(last.block(i).backward_weight(c, 0).ok());
  }
  for (int i = first.num_blocks() - 1; i >= 0; --i) {
    d = first.block(i).backward_input(c, 0, d).value();
    ASSERT_TRUE(first.block(i).backward_weight(c, 0).ok());
  }
  ASSERT_TRUE(first.embed_backward(c, 0, d).ok());

  EXPECT_EQ(lw->total, lc->total);  // identical arithmetic, so bitwise equal
  auto gw = grads(whole), g1 = grads(first), g2 = grads(last);
  for (auto& [name, v] : g2) {
    if (g1.count(name)) {
      for (size_t i = 0; i < v.size(); ++i) g1[name][i] += v[i];
    } else {
      g1[name] = v;
    }
  }
  ASSERT_EQ(gw.size(), g1.size());
  for (auto& [name, v] : gw) {
    ASSERT_TRUE(g1.count(name)) << name;
    double num = 0, den = 0;
    for (size_t i = 0; i < v.size(); ++i) {
      num += (v[i] - g1[name][i]) * double(v[i] - g1[name][i]);
      den += double(v[i]) * v[i];
    }
    // Only the embedding's gradient is summed in a different order (two copies): fp32 rounding.
    EXPECT_LE(num, 1e-12 * (den + 1e-30)) << name;
  }
}

// The head's logits ([rows, vocab] per depth) are held from F to B as bf16 outside FP32 (the
// head's output is rounded to bf16 there, so the same values): two models that differ only in
// vocab_size hold 2 bytes more per extra logit in BF16 and FP8 and 4 in FP32, with rows B·T for
// the main head and B·(T-1) for the MTP depth. Dense blocks only, so nothing else depends on
// the vocabulary (the first 256 embedding rows and every block are the same by name).
TEST(ModelPart, HeadHoldsItsLogitsAsBf16OutsideFp32) {
  const int64_t B = 2, T = 8;
  for (const char* mode : {"FP32", "BF16", "FP8"}) {
    SCOPED_TRACE(mode);
    int64_t held[2] = {0, 0};
    const int vocab[2] = {256, 384};
    for (int v = 0; v < 2; ++v) {
      auto cfg = load_config(
          std::string(FP8PIPE_SOURCE_DIR) + "/configs/tiny.textproto",
          std::vector<std::string>{std::string("--precision.mode=") + mode, "--train.seq_len=8",
                                   "--model.vocab_size=" + std::to_string(vocab[v]),
                                   "--model.dense_layers=4", "--model.moe.routed_experts=0"});
      ASSERT_TRUE(cfg.ok()) << cfg.status().to_string();
      ASSERT_EQ(cfg->model().mtp_depth(), 1);
      auto be = make_cpu_backend();
      ModelCtx c;
      c.be = be.get();
      c.precision = std::string(mode) == "FP8"    ? Precision::kFP8
                    : std::string(mode) == "BF16" ? Precision::kBF16
                                                  : Precision::kFP32;
      Model m;
      ASSERT_TRUE(m.init(c, cfg->model(), 7).ok());
      const MicroBatch mb = batch(B, T, 256);
      ASSERT_TRUE(m.forward(c, 0, mb).ok());  // warm-up: weight caches
      ASSERT_TRUE(m.backward(c, 0, 1.0f).ok());
      const int64_t base = be->memory().in_use;
      ASSERT_TRUE(m.forward(c, 1, mb).ok());
      held[v] = be->memory().in_use - base;
      ASSERT_TRUE(m.backward(c, 1, 1.0f).ok());
      EXPECT_EQ(be->memory().in_use, base) << "all saved state freed";
    }
    const int64_t bytes = std::string(mode) == "FP32" ? 4 : 2;
    EXPECT_EQ(held[1] - held[0], (vocab[1] - vocab[0]) * (B * T + B * (T - 1)) * bytes);
  }
}

// train.recompute=rmsnorm on a head-only chunk (BF16, dense MTP block): besides the MTP block's
// own norms, the final norm, the MTP module's enorm, hnorm and norm re-run in the backward, so
// the Linears reading them (the head for the main and the MTP depth, eh_proj's two halves) drop
// their bf16 inputs after the forward: exactly 2 bytes x hidden for each of those rows less, plus
// the MTP block's attention input, MLA latents (q_lora + kv_lora) and FFN input copies; the loss
// and every gradient are the same bits.
TEST(ModelPart, RecomputedHeadNormsHoldTheirOutputsLess) {
  const int64_t B = 2, T = 8;
  auto cfg = load_config(
      std::string(FP8PIPE_SOURCE_DIR) + "/configs/tiny.textproto",
      std::vector<std::string>{"--precision.mode=BF16", "--train.seq_len=8",
                               "--model.dense_layers=4", "--model.moe.routed_experts=0"});
  ASSERT_TRUE(cfg.ok()) << cfg.status().to_string();
  const config::Model& mc = cfg->model();
  ASSERT_EQ(mc.mtp_depth(), 1);
  struct Run {
    std::unique_ptr<Backend> be = make_cpu_backend();
    ModelCtx c;
    Model m;
    int64_t held = 0;
    double loss = 0;
    std::map<std::string, std::vector<float>> g;
  };
  Run runs[2];
  for (int re = 0; re < 2; ++re) {
    Run& r = runs[re];
    r.c.be = r.be.get();
    r.c.precision = Precision::kBF16;
    r.c.recompute_norm = re == 1;
    ASSERT_TRUE(r.m.init(r.c, mc, 7, {mc.layers(), -1, false, true}).ok());
    ASSERT_EQ(r.m.num_blocks(), 0);
    const MicroBatch mb = batch(B, T, mc.vocab_size());
    Tensor h = r.be->empty({B * T, mc.hidden()}, DType::kF32).value();
    for (int64_t i = 0; i < h.numel(); ++i) h.data_as<float>()[i] = std::sin(0.37 * i);
    const int64_t base = r.be->memory().in_use;
    auto lp = r.m.head_forward(r.c, 0, h, mb);
    ASSERT_TRUE(lp.ok()) << lp.status().to_string();
    r.loss = lp->total;
    r.held = r.be->memory().in_use - base;
    auto dh = r.m.head_backward_input(r.c, 0, 1.0f);
    ASSERT_TRUE(dh.ok()) << dh.status().to_string();
    ASSERT_TRUE(r.m.head_backward_weight(r.c, 0).ok());
    r.g = grads(r.m);
    r.g["dh"].assign(dh->data_as<float>(), dh->data_as<float>() + dh->numel());
  }
  const int64_t d = mc.hidden(), n = B * T, n1 = B * (T - 1);
  const int64_t lat = mc.mla().q_lora_rank() + mc.mla().kv_lora_rank();
  EXPECT_EQ(runs[0].held - runs[1].held, 2 * d * n + n1 * (2 * d * 3 + 2 * d * 2 + 2 * lat));
  EXPECT_EQ(runs[1].loss, runs[0].loss);
  EXPECT_EQ(runs[1].g, runs[0].g);
}

TEST(ModelPart, RejectsBadRanges) {
  const auto cfg = tiny();
  auto be = make_cpu_backend();
  ModelCtx c;
  c.be = be.get();
  Model m;
  Status s = m.init(c, cfg.model(), 1, {3, 99, false, false});
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.to_string().find("blocks [3, 99)"), std::string::npos) << s.to_string();
}

}  // namespace
}  // namespace fp8pipe::model
