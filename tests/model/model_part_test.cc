// Pipeline readiness: a model split into chunks (embedding + first blocks | remaining blocks +
// head/MTP) composes, by passing activations and gradients by hand, to exactly the single-model
// loss and gradients (same init by global name), which is what the executor relies on.
#include <gtest/gtest.h>

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
