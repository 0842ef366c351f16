// Inference over a key/value cache (core/model/decode.h) against independent references: the new
// Backend op against fp64 loops; decoding's logits against the training forward's (full K and V
// per head, the causal core over the whole sequence) for the main head and MTP depth 1, in every
// precision and with both caches; cached greedy generation against greedy generation that
// re-runs the training forward over the whole sequence for every token; MTP speculative decoding
// against plain greedy decoding.
#include "core/model/decode.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "core/config.h"
#include "launch/trainer.h"
#include "tests/launch/short_run.h"

namespace fp8pipe {
namespace {

using model::DecodeOut;
using model::KvCache;
using model::Model;
using model::ModelCtx;

// ---- Backend::attention_cached ------------------------------------------------------------------

Tensor random_f32(Backend& be, Shape s, std::mt19937& g) {
  Tensor t = be.empty(s, DType::kF32).value();
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) t.data_as<float>()[i] = d(g);
  return t;
}

// The definition in fp64: o[i, h] = sum_{j <= L-n+i} softmax_j(scale q_ih . k_jg) v_jg.
std::vector<double> cached_reference(const Tensor& q, const Tensor& k, const Tensor& v, int64_t H,
                                     int64_t G, int64_t dv, float scale) {
  const int64_t n = q.rows(), L = k.rows(), dk = q.cols() / H;
  std::vector<double> o(n * H * dv, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / G), seen = L - n + i + 1;
      std::vector<double> s(seen);
      for (int64_t j = 0; j < seen; ++j) {
        double d = 0;
        for (int64_t c = 0; c < dk; ++c)
          d += double{q.data_as<float>()[(i * H + h) * dk + c]} *
               k.data_as<float>()[(j * G + g) * dk + c];
        s[j] = d * scale;
      }
      const double m = *std::max_element(s.begin(), s.end());
      double l = 0;
      for (double& x : s) l += (x = std::exp(x - m));
      for (int64_t j = 0; j < seen; ++j)
        for (int64_t c = 0; c < dv; ++c)
          o[(i * H + h) * dv + c] += s[j] / l * v.data_as<float>()[j * v.cols() + g * dv + c];
    }
  }
  return o;
}

TEST(AttentionCached, MatchesFp64Definition) {
  auto be = make_cpu_backend();
  std::mt19937 gen(5);
  struct Case {
    int64_t n, L, H, G, dk, dv;
    bool v_is_k;
  };
  // multi-head; grouped; MLA's latent form (one head, values = the keys' first dv columns)
  for (const Case& cs : {Case{3, 7, 4, 4, 8, 6, false}, Case{1, 5, 4, 2, 8, 8, false},
                         Case{2, 9, 4, 1, 12, 8, true}, Case{4, 4, 2, 1, 6, 6, true}}) {
    Tensor q = random_f32(*be, {cs.n, cs.H * cs.dk}, gen);
    Tensor k = random_f32(*be, {cs.L, cs.G * cs.dk}, gen);
    Tensor v = cs.v_is_k ? k : random_f32(*be, {cs.L, cs.G * cs.dv}, gen);
    Tensor o = be->empty({cs.n, cs.H * cs.dv}, DType::kF32).value();
    ASSERT_TRUE(be->attention_cached(q, k, v, cs.H, cs.G, cs.dv, 0.4f, o).ok());
    const auto ref = cached_reference(q, k, v, cs.H, cs.G, cs.dv, 0.4f);
    for (size_t i = 0; i < ref.size(); ++i)
      ASSERT_NEAR(o.data_as<float>()[i], ref[i], 1e-5 * (1 + std::abs(ref[i]))) << i;
  }
  // the last query sees every key: changing the first key's value moves every output
  Tensor q = random_f32(*be, {1, 8}, gen), k = random_f32(*be, {3, 8}, gen);
  Tensor v = random_f32(*be, {3, 4}, gen), o1 = be->empty({1, 4}, DType::kF32).value();
  Tensor o2 = be->empty({1, 4}, DType::kF32).value();
  ASSERT_TRUE(be->attention_cached(q, k, v, 2, 2, 2, 1.0f, o1).ok());
  v.data_as<float>()[0] += 1.0f;
  ASSERT_TRUE(be->attention_cached(q, k, v, 2, 2, 2, 1.0f, o2).ok());
  EXPECT_NE(o1.data_as<float>()[0], o2.data_as<float>()[0]);
}

// A bf16 cache is read as its exact widening: the fp32 op on the widened values, bit for bit.
TEST(AttentionCached, Bf16CacheReadsItsWidenedValues) {
  auto be = make_cpu_backend();
  std::mt19937 gen(9);
  for (const int64_t G : {int64_t{4}, int64_t{1}}) {
    const int64_t n = 3, L = 11, H = 4, dk = 12, dv = 8;
    Tensor q = random_f32(*be, {n, H * dk}, gen), k = random_f32(*be, {L, G * dk}, gen);
    Tensor v = G == 1 ? k : random_f32(*be, {L, G * dv}, gen);
    Tensor kb = be->empty(k.shape(), DType::kBF16).value();
    Tensor vb = be->empty(v.shape(), DType::kBF16).value();
    ASSERT_TRUE(be->cast(k, kb).ok() && be->cast(v, vb).ok());
    Tensor kw = be->empty(k.shape(), DType::kF32).value();
    Tensor vw = be->empty(v.shape(), DType::kF32).value();
    ASSERT_TRUE(be->cast(kb, kw).ok() && be->cast(vb, vw).ok());
    Tensor o16 = be->empty({n, H * dv}, DType::kF32).value();
    Tensor o32 = be->empty({n, H * dv}, DType::kF32).value();
    ASSERT_TRUE(be->attention_cached(q, kb, G == 1 ? kb : vb, H, G, dv, 0.3f, o16).ok());
    ASSERT_TRUE(be->attention_cached(q, kw, G == 1 ? kw : vw, H, G, dv, 0.3f, o32).ok());
    for (int64_t i = 0; i < o16.numel(); ++i)
      ASSERT_EQ(o16.data_as<float>()[i], o32.data_as<float>()[i]) << i;
  }
  Tensor q = be->empty({1, 8}, DType::kF32).value(), k = be->empty({2, 8}, DType::kBF16).value();
  Tensor v = be->empty({2, 8}, DType::kF32).value(), o = be->empty({1, 8}, DType::kF32).value();
  EXPECT_FALSE(be->attention_cached(q, k, v, 2, 2, 4, 1.0f, o).ok());  // mixed dtypes
}

TEST(AttentionCached, RefusesMismatchedShapes) {
  auto be = make_cpu_backend();
  Tensor q = be->empty({2, 8}, DType::kF32).value(), k = be->empty({1, 8}, DType::kF32).value();
  Tensor o = be->empty({2, 8}, DType::kF32).value();
  const Status s = be->attention_cached(q, k, k, 2, 2, 4, 1.0f, o);  // 2 queries, 1 key
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.to_string().find("attention_cached"), std::string::npos) << s.to_string();
  Tensor k3 = be->empty({3, 8}, DType::kF32).value();
  EXPECT_FALSE(be->attention_cached(q, k3, k3, 3, 3, 4, 1.0f, o).ok());  // 8 % 3 != 0
}

// ---- decoding against the training forward
// --------------------------------------------------------

config::Config tiny(const std::string& mode, std::vector<std::string> extra = {}) {
  extra.push_back("--precision.mode=" + mode);
  extra.push_back("--model.init_std=0.1");  // logits far from uniform: a meaningful comparison
  auto cfg = load_config(std::string(FP8PIPE_SOURCE_DIR) + "/configs/tiny.textproto", extra);
  EXPECT_TRUE(cfg.ok()) << cfg.status().to_string();
  return *cfg;
}

// A model of the tiny config (init_std 0.1) on the CPU backend, with the config's context.
struct TinyModel {
  explicit TinyModel(const std::string& mode, uint64_t seed = 11,
                     std::vector<std::string> extra = {})
      : cfg(tiny(mode, std::move(extra))), be(make_cpu_backend()), c(make_ctx(cfg, be.get())) {
    EXPECT_TRUE(m.init(c, cfg.model(), seed).ok());
  }
  config::Config cfg;
  std::unique_ptr<Backend> be;
  ModelCtx c;
  Model m;
};

std::vector<int32_t> sequence(int64_t n, int V) {
  std::vector<int32_t> t;
  for (int64_t i = 0; i < n; ++i) t.push_back(static_cast<int32_t>((i * 37 + 11) % V));
  return t;
}

std::vector<float> host(ModelCtx& c, const Tensor& t) {
  Tensor h = c.be->to_host(t).value();
  return std::vector<float>(h.data_as<float>(), h.data_as<float>() + h.numel());
}

struct Logits {
  std::vector<float> main, mtp;
};

// The training forward over tokens t_0..t_T (B = 1): main logits [T, V], MTP depth 1 [T-1, V].
Logits training_logits(ModelCtx& c, Model& m, const std::vector<int32_t>& t) {
  model::MicroBatch mb;
  mb.B = 1;
  mb.T = static_cast<int64_t>(t.size()) - 1;
  mb.tokens = t;
  auto lp = m.forward(c, 0, mb);
  EXPECT_TRUE(lp.ok()) << lp.status().to_string();
  Logits l{host(c, m.held_logits(c, 0, 0).value()), host(c, m.held_logits(c, 0, 1).value())};
  EXPECT_TRUE(m.backward(c, 0, 0.0f).ok());  // releases the saved state
  return l;
}

// The same logits by decoding t_0..t_{T-1}: a prefill of `prefill` positions, then chunks of
// 1, 2, 1, 2, ... positions; MTP depth 1 in the same chunks, reading h^0 and t_{i+1}.
Logits decoded_logits(ModelCtx& c, Model& m, const std::vector<int32_t>& t, int64_t prefill,
                      bool latent, DType cache_dtype = DType::kF32) {
  const int64_t T = static_cast<int64_t>(t.size()) - 1;
  KvCache cache = m.new_cache(T, latent, cache_dtype).value();
  Logits l;
  c.inference = true;
  for (int64_t pos = 0, chunk = prefill, i = 0; pos < T; pos += chunk, chunk = 1 + (i++ % 2)) {
    chunk = std::min(chunk, T - pos);
    std::vector<int32_t> in(t.begin() + pos, t.begin() + pos + chunk);
    auto st = m.decode(c, in, pos, cache);
    EXPECT_TRUE(st.ok()) << st.status().to_string();
    for (float x : host(c, st->logits)) l.main.push_back(x);
    // MTP position j needs t_{j+1}: the last sequence position T-1 has no MTP row (training)
    const int64_t mrows = std::min(chunk, T - 1 - pos);
    if (mrows <= 0) continue;
    std::vector<int32_t> next(t.begin() + pos + 1, t.begin() + pos + 1 + mrows);
    auto ms = m.mtp_decode(c, 1, st->h.slice_rows(0, mrows), next, pos, cache);
    EXPECT_TRUE(ms.ok()) << ms.status().to_string();
    for (float x : host(c, ms->logits)) l.mtp.push_back(x);
  }
  c.inference = false;
  return l;
}

// ||a - b|| / ||b|| over all elements
double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0, n = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    d += (double{a[i]} - b[i]) * (double{a[i]} - b[i]);
    n += double{b[i]} * b[i];
  }
  return std::sqrt(d / n);
}

struct DecodeCase {
  std::string mode;
  bool latent;
  double bound;  // FP32: rel_l2(decoded, trained); else a fraction of rel_l2(trained, FP32)
};

class DecodeVsTraining : public ::testing::TestWithParam<DecodeCase> {};

// FP32 differs from the training forward by summation order only (the fused core against the
// cached one; the latent form multiplies q by W_uk before the dot with c_kv): bound 1e-5,
// measured 6e-7. Outside FP32 the layers round their outputs to bf16 and FP8, so a one-ulp
// difference in fp32 can move a value by a bf16 or E4M3 step and flip a MoE routing choice; the
// measure of those precisions is their own distance from the FP32 model (the same weights): the
// decoded logits must stay a small fraction of it from the trained ones, and no farther from
// FP32 than training is. The heads cache computes what training computes (measured: FP8 the same
// bits, BF16 3% of BF16's distance, where OpenBLAS sums a 1-row GEMM in another order than a
// 13-row one); the latent cache skips the bf16 rounding of k_nope and v (measured: BF16 10%,
// FP8 34% of the mode's distance, at init_std 0.1 where FP8 is 45% from FP32).
TEST_P(DecodeVsTraining, LogitsMatchTheTrainingForward) {
  const DecodeCase& p = GetParam();
  TinyModel tm(p.mode, 7);
  auto& [cfg, be, c, m] = tm;
  const auto t = sequence(14, cfg.model().vocab_size());
  const Logits ref = training_logits(c, m, t);
  const Logits got = decoded_logits(c, m, t, 5, p.latent);
  const double dm = rel_l2(got.main, ref.main), dt = rel_l2(got.mtp, ref.mtp);
  RecordProperty("main_rel_l2", std::to_string(dm));
  RecordProperty("mtp_rel_l2", std::to_string(dt));
  double noise = 1.0;
  if (p.mode != "FP32") {
    const auto cfg32 = tiny("FP32");
    ModelCtx c32 = make_ctx(cfg32, be.get());
    Model m32;
    ASSERT_TRUE(m32.init(c32, cfg32.model(), 7).ok());
    const Logits r32 = training_logits(c32, m32, t);
    noise = rel_l2(ref.main, r32.main);
    ASSERT_GT(noise, 1e-3);  // the mode rounds
    EXPECT_LT(rel_l2(got.main, r32.main), 1.05 * noise);
    EXPECT_LT(rel_l2(got.mtp, r32.mtp), 1.05 * rel_l2(ref.mtp, r32.mtp));
  }
  EXPECT_LT(dm, p.bound * noise) << "main head";
  EXPECT_LT(dt, p.bound * noise) << "MTP depth 1";
  // and a decode that ignored the cache (positions restarted at 0) is far off: the test can fail
  KvCache cache = m.new_cache(14, p.latent).value();
  c.inference = true;
  ASSERT_TRUE(m.decode(c, {t.begin(), t.begin() + 5}, 0, cache).ok());
  auto alone = m.decode(c, {t[5]}, 0, cache);  // position 0 again, no past
  ASSERT_TRUE(alone.ok());
  const int64_t V = cfg.model().vocab_size();
  std::vector<float> row5(ref.main.begin() + 5 * V, ref.main.begin() + 6 * V);
  EXPECT_GT(rel_l2(host(c, alone->logits), row5), 5 * p.bound * noise);
}

INSTANTIATE_TEST_SUITE_P(
    Caches, DecodeVsTraining,
    ::testing::Values(DecodeCase{"FP32", false, 1e-5}, DecodeCase{"FP32", true, 1e-5},
                      DecodeCase{"BF16", false, 0.1}, DecodeCase{"BF16", true, 0.3},
                      DecodeCase{"FP8", false, 0.1}, DecodeCase{"FP8", true, 0.5}),
    [](const auto& info) { return info.param.mode + (info.param.latent ? "_latent" : "_heads"); });

// A bf16 cache rounds each key and value once (2^-9 relative): on the FP32 model its logits stay
// within 1e-2 of the fp32 cache's (measured 0.37-0.42% over 4 layers, both forms), and do move.
// (In BF16 and FP8 that one rounding can flip a later bf16 or E4M3 rounding, or a routing choice
// of this random model, as any rounding there can: no tighter measure than the mode's own noise.)
TEST(DecodeCache, Bf16CacheMovesLogitsByItsRounding) {
  TinyModel tm("FP32", 7);
  auto& [cfg, be, c, m] = tm;
  const auto t = sequence(14, cfg.model().vocab_size());
  for (const bool latent : {false, true}) {
    const Logits a = decoded_logits(c, m, t, 5, latent, DType::kF32);
    const Logits b = decoded_logits(c, m, t, 5, latent, DType::kBF16);
    EXPECT_LT(rel_l2(b.main, a.main), 1e-2) << latent;
    EXPECT_LT(rel_l2(b.mtp, a.mtp), 1e-2) << latent;
    EXPECT_GT(rel_l2(b.main, a.main), 1e-4) << latent;
  }
}

// In FP8 with pow2 scales the latent cache's c_kv values (E4M3 codes times a power of two) are
// exact in bf16, so a bf16 cache holds them bit for bit; only the RoPE key's columns round. The
// first layer sees the same input either way (later layers see the first's rounding).
TEST(DecodeCache, Bf16LatentCacheHoldsFp8CkvExactly) {
  TinyModel tm("FP8", 7);
  auto& [cfg, be, c, m] = tm;
  c.inference = true;
  const int64_t r = cfg.model().mla().kv_lora_rank(), w = r + cfg.model().mla().qk_rope_head_dim();
  KvCache c32 = m.new_cache(8, true).value(), c16 = m.new_cache(8, true, DType::kBF16).value();
  ASSERT_TRUE(m.decode(c, {4, 8, 15, 16, 23}, 0, c32).ok());
  ASSERT_TRUE(m.decode(c, {4, 8, 15, 16, 23}, 0, c16).ok());
  EXPECT_EQ(c16.bytes_per_position() * 2, c32.bytes_per_position());
  const std::vector<float> f = host(c, c32.blocks[0].k);
  Tensor wide = be->empty(c16.blocks[0].k.shape(), DType::kF32).value();
  ASSERT_TRUE(be->cast(c16.blocks[0].k, wide).ok());
  const std::vector<float> b = host(c, wide);
  int64_t rounded = 0;
  for (int64_t pos = 0; pos < 5; ++pos) {
    for (int64_t j = 0; j < w; ++j) {
      const float x = f[pos * w + j], y = b[pos * w + j];
      if (j < r) {
        ASSERT_EQ(x, y) << "position " << pos << " c_kv " << j;
      } else {
        EXPECT_LE(std::abs(x - y), std::ldexp(std::abs(x), -8)) << j;
        rounded += x != y;
      }
    }
  }
  EXPECT_GT(rounded, 0);  // the RoPE key does round: the comparison sees bf16 storage
}

TEST(DecodeVsTraining, MhaModelsCacheHeads) {
  TinyModel tm("FP32", 7, {"--model.attention=MHA", "--model.head_dim=16"});
  auto& [cfg, be, c, m] = tm;
  const auto t = sequence(10, cfg.model().vocab_size());
  const Logits ref = training_logits(c, m, t);
  const Logits got = decoded_logits(c, m, t, 3, /*latent=*/true);  // ignored for MHA
  EXPECT_LT(rel_l2(got.main, ref.main), 1e-5);
  EXPECT_LT(rel_l2(got.mtp, ref.mtp), 1e-5);
}

TEST(DecodeCache, LatentHoldsFewerBytes) {
  TinyModel tm("FP32", 7);
  auto& [cfg, be, c, m] = tm;
  c.inference = true;
  const config::Mla& a = cfg.model().mla();
  const int64_t layers = cfg.model().layers() + cfg.model().mtp_depth(), H = cfg.model().heads();
  for (bool latent : {true, false}) {
    KvCache cache = m.new_cache(8, latent).value();
    ASSERT_TRUE(m.decode(c, {1, 2, 3}, 0, cache).ok());
    auto st = m.decode(c, {1, 2, 3}, 0, cache);
    ASSERT_TRUE(st.ok());
    ASSERT_TRUE(m.mtp_decode(c, 1, st->h, {4, 5, 6}, 0, cache).ok());
    const int64_t per_layer =
        latent ? a.kv_lora_rank() + a.qk_rope_head_dim()
               : H * (a.qk_nope_head_dim() + a.qk_rope_head_dim() + a.v_head_dim());
    EXPECT_EQ(cache.bytes_per_position(), 4 * layers * per_layer) << latent;
  }
  // logits of the last rows only (a prefill's): those rows of the full call's
  KvCache ca = m.new_cache(8, true).value(), cb = m.new_cache(8, true).value();
  auto all = m.decode(c, {5, 6, 7, 8}, 0, ca), last = m.decode(c, {5, 6, 7, 8}, 0, cb, 1);
  ASSERT_TRUE(all.ok() && last.ok());
  ASSERT_EQ(last->logits.rows(), 1);
  EXPECT_LT(rel_l2(host(c, last->logits), host(c, all->logits.slice_rows(3, 4))), 1e-6);
  KvCache small = m.new_cache(4, true).value();
  const auto over = m.decode(c, {1, 2, 3, 4, 5}, 0, small);
  ASSERT_FALSE(over.ok());
  EXPECT_NE(over.status().to_string().find("exceed the cache of 4"), std::string::npos)
      << over.status().to_string();
}

// ---- generation ---------------------------------------------------------------------------------

// Greedy generation without a cache: the training forward over the whole sequence per token.
std::vector<int32_t> greedy_by_full_forward(ModelCtx& c, Model& m, std::vector<int32_t> seq,
                                            int64_t n) {
  const int64_t V = m.config().vocab_size();
  std::vector<int32_t> out;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<int32_t> in = seq;
    in.push_back(0);  // a target for the last position (its loss is not used)
    const Logits l = training_logits(c, m, in);
    const float* last = l.main.data() + (seq.size() - 1) * V;
    const int32_t tok = static_cast<int32_t>(std::max_element(last, last + V) - last);
    out.push_back(tok);
    seq.push_back(tok);
  }
  return out;
}

TEST(Generate, GreedyMatchesRerunningTheTrainingForward) {
  TinyModel tm("FP32", 11);
  auto& [cfg, be, c, m] = tm;
  const std::vector<int32_t> prompt = {72, 101, 108, 108, 111};
  model::GenerateOptions o;
  o.max_new_tokens = 12;
  for (bool latent : {true, false}) {
    o.latent_cache = latent;
    auto r = model::generate(c, m, prompt, o);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_EQ(r->tokens, greedy_by_full_forward(c, m, prompt, 12)) << latent;
    EXPECT_EQ(r->main_steps, 11);
  }
}

TEST(Generate, SpeculativeMatchesPlainGreedy) {
  for (const std::string mode : {"FP32", "FP8"}) {
    const auto cfg = tiny(mode);
    auto be = make_cpu_backend();
    ModelCtx c = make_ctx(cfg, be.get());
    Model m;
    ASSERT_TRUE(m.init(c, cfg.model(), 11).ok());
    model::GenerateOptions o;
    o.max_new_tokens = 40;
    auto plain = model::generate(c, m, {3, 1, 4, 1, 5}, o);
    o.speculative = true;
    auto spec = model::generate(c, m, {3, 1, 4, 1, 5}, o);
    ASSERT_TRUE(plain.ok() && spec.ok()) << spec.status().to_string();
    EXPECT_EQ(spec->tokens, plain->tokens) << mode;
    ASSERT_EQ(spec->tokens.size(), 40u);
    // every main step yields its verified token plus the draft when accepted
    EXPECT_GE(spec->main_steps + spec->accepted + 1, 40);
    EXPECT_LE(spec->main_steps + spec->accepted, 40);
    EXPECT_EQ(spec->drafted, spec->main_steps);
    EXPECT_LE(spec->accepted, spec->drafted);
  }
}

// On a model trained 15 steps on the synthetic Markov chain (34 of 61 drafts accepted when
// written), MTP's drafts are often but not always the main model's next choice (its two-step
// argmax against greedy's chain of one-step argmaxes), so both the accepted and the rejected
// path run, interleaved, and the text stays greedy's.
TEST(Generate, SpeculativeOnATrainedModelTakesBothPaths) {
  auto t = testutil::make_trainer(testutil::tiny_short({"--train.steps=15", "--checkpoint.dir="}));
  ASSERT_TRUE(t);
  for (int i = 0; i < 15; ++i) ASSERT_TRUE(t->train_step().ok());
  model::GenerateOptions o;
  o.max_new_tokens = 96;
  auto plain = model::generate(t->ctx(), t->model(), {10, 20, 30}, o);
  o.speculative = true;
  auto spec = model::generate(t->ctx(), t->model(), {10, 20, 30}, o);
  ASSERT_TRUE(plain.ok() && spec.ok()) << spec.status().to_string();
  EXPECT_EQ(spec->tokens, plain->tokens);
  EXPECT_GT(spec->accepted, 0);
  EXPECT_LT(spec->accepted, spec->drafted);
  EXPECT_LT(spec->main_steps, plain->main_steps);
  RecordProperty("accepted", std::to_string(spec->accepted) + "/" + std::to_string(spec->drafted));
}

// A batch decodes its prompts (of different lengths, finishing at different steps) together,
// each sequence giving the tokens it gets alone: greedy and speculative, FP32 and FP8 (rows are
// independent but for GEMM summation order); sampled, sequence s as alone with seed + s.
TEST(Generate, BatchGivesEachSequenceItsOwnTokens) {
  const std::vector<std::vector<int32_t>> prompts = {{3, 1, 4}, {1, 5, 9, 2, 6, 5}, {8}};
  for (const std::string mode : {"FP32", "FP8"}) {
    for (const bool spec : {false, true}) {
      for (const float temp : {0.0f, 0.9f}) {
        TinyModel tm(mode, 11);
        auto& [cfg, be, c, m] = tm;
        model::GenerateOptions o;
        o.max_new_tokens = 24;
        o.speculative = spec;
        o.temperature = temp;
        o.seed = 40;
        o.stop = {77};  // may end a sequence early
        auto batch = model::generate_batch(c, m, prompts, o);
        ASSERT_TRUE(batch.ok()) << batch.status().to_string();
        ASSERT_EQ(batch->size(), prompts.size());
        for (size_t s = 0; s < prompts.size(); ++s) {
          o.seed = 40 + s;
          auto alone = model::generate(c, m, prompts[s], o);
          ASSERT_TRUE(alone.ok());
          EXPECT_EQ((*batch)[s].tokens, alone->tokens)
              << mode << " speculative " << spec << " temperature " << temp << " sequence " << s;
          EXPECT_EQ((*batch)[s].accepted, alone->accepted);
        }
        o.seed = 40;
      }
    }
  }
}

TEST(Generate, SamplingIsSeededAndTopOneIsGreedy) {
  TinyModel tm("FP32", 11);
  auto& [cfg, be, c, m] = tm;
  model::GenerateOptions o;
  o.max_new_tokens = 16;
  auto greedy = model::generate(c, m, {7, 8, 9}, o);
  o.temperature = 1.0f;
  o.seed = 3;
  auto a = model::generate(c, m, {7, 8, 9}, o), b = model::generate(c, m, {7, 8, 9}, o);
  o.seed = 4;
  auto d = model::generate(c, m, {7, 8, 9}, o);
  o.top_k = 1;
  auto top1 = model::generate(c, m, {7, 8, 9}, o);
  ASSERT_TRUE(greedy.ok() && a.ok() && b.ok() && d.ok() && top1.ok());
  EXPECT_EQ(a->tokens, b->tokens);
  EXPECT_NE(a->tokens, d->tokens);  // 16 draws over 256 tokens from a model this far from sharp
  EXPECT_EQ(top1->tokens, greedy->tokens);
}

TEST(Generate, PickTokenSamplesTheSoftmax) {
  // logits log(1), log(2), log(3), log(4) at temperature 1: probabilities 0.1, 0.2, 0.3, 0.4
  const float lg[4] = {0.0f, std::log(2.0f), std::log(3.0f), std::log(4.0f)};
  EXPECT_EQ(model::pick_token(lg, 4, 0.0f, 0, 1.0f, 0.5), 3);
  // sorted by probability: 3 [0, .4), 2 [.4, .7), 1 [.7, .9), 0 [.9, 1)
  EXPECT_EQ(model::pick_token(lg, 4, 1.0f, 0, 1.0f, 0.39), 3);
  EXPECT_EQ(model::pick_token(lg, 4, 1.0f, 0, 1.0f, 0.41), 2);
  EXPECT_EQ(model::pick_token(lg, 4, 1.0f, 0, 1.0f, 0.71), 1);
  EXPECT_EQ(model::pick_token(lg, 4, 1.0f, 0, 1.0f, 0.95), 0);
  // top-2 renormalises over {3, 2}: 4/7 and 3/7
  EXPECT_EQ(model::pick_token(lg, 4, 1.0f, 2, 1.0f, 0.56), 3);
  EXPECT_EQ(model::pick_token(lg, 4, 1.0f, 2, 1.0f, 0.58), 2);
  // top_p 0.5: 3 (0.4) alone falls short, 3 and 2 (0.7) reach it: 4/7 and 3/7 again
  EXPECT_EQ(model::pick_token(lg, 4, 1.0f, 0, 0.5f, 0.56), 3);
  EXPECT_EQ(model::pick_token(lg, 4, 1.0f, 0, 0.5f, 0.58), 2);
  EXPECT_EQ(model::pick_token(lg, 4, 1.0f, 0, 0.5f, 0.99), 2);
  // top_p 0.35 is reached by 3 alone; 0.75 takes 3, 2 and 1 (0.9): 4/9, 3/9, 2/9
  EXPECT_EQ(model::pick_token(lg, 4, 1.0f, 0, 0.35f, 0.99), 3);
  EXPECT_EQ(model::pick_token(lg, 4, 1.0f, 0, 0.75f, 0.40), 3);
  EXPECT_EQ(model::pick_token(lg, 4, 1.0f, 0, 0.75f, 0.60), 2);
  EXPECT_EQ(model::pick_token(lg, 4, 1.0f, 0, 0.75f, 0.77), 2);
  EXPECT_EQ(model::pick_token(lg, 4, 1.0f, 0, 0.75f, 0.79), 1);
  EXPECT_EQ(model::pick_token(lg, 4, 1.0f, 0, 0.75f, 0.99), 1);
}

TEST(Generate, StopsAtAStopTokenAndRefusesBadOptions) {
  TinyModel tm("FP32", 11);
  auto& [cfg, be, c, m] = tm;
  model::GenerateOptions o;
  o.max_new_tokens = 10;
  auto full = model::generate(c, m, {1, 2}, o);
  ASSERT_TRUE(full.ok());
  o.stop = {full->tokens[3]};
  auto cut = model::generate(c, m, {1, 2}, o);
  ASSERT_TRUE(cut.ok());
  const auto first = std::find(full->tokens.begin(), full->tokens.end(), full->tokens[3]);
  EXPECT_EQ(cut->tokens, std::vector<int32_t>(full->tokens.begin(), first + 1));
  o.stop.clear();
  EXPECT_FALSE(model::generate(c, m, {}, o).ok());
  EXPECT_FALSE(model::generate(c, m, {256}, o).ok());
  o.top_p = 0.0f;
  EXPECT_FALSE(model::generate(c, m, {1}, o).ok());
}

// ---- speculative sampling ----------------------------------------------------------------------

model::TokenDist dist(std::vector<int32_t> ids, std::vector<double> p) {
  model::TokenDist d;
  d.ids = std::move(ids);
  d.p = std::move(p);
  return d;
}

// Drafts drawn from q and verified against p come out distributed as p (Monte Carlo, 400k draws,
// every token within 5 standard deviations), q's support overlapping p's only in part; and they
// are kept at the rate sum_x min(p(x), q(x)). Keeping every draft would give q: the test fails.
TEST(SpeculativeSampling, VerifiedDraftsAreDistributedAsTheTarget) {
  const model::TokenDist p = dist({3, 1, 4, 0}, {0.4, 0.3, 0.2, 0.1});
  const model::TokenDist q = dist({1, 5, 3, 0}, {0.5, 0.2, 0.2, 0.1});
  std::mt19937_64 rng(17);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  const int n = 400000;
  std::vector<int64_t> count(6, 0);
  int64_t kept = 0;
  for (int i = 0; i < n; ++i) {
    const int32_t d = model::sample(q, u(rng));
    const double ua = u(rng), ur = u(rng);
    const auto [tok, k] = model::verify_draft(p, q, d, ua, ur);
    ++count[tok];
    kept += k;
  }
  for (int32_t x = 0; x < 6; ++x) {
    const double want = p.prob(x), sd = std::sqrt(want * (1 - want) / n);
    EXPECT_NEAR(static_cast<double>(count[x]) / n, want, 5 * sd + 1e-12) << "token " << x;
  }
  const double rate = 0.2 + 0.3 + 0.0 + 0.1;  // min(p, q) over 3, 1, 4, 0 (5 is not in p)
  EXPECT_NEAR(static_cast<double>(kept) / n, rate, 5 * std::sqrt(rate * (1 - rate) / n));
}

TEST(SpeculativeSampling, GreedyKeepsTheDraftOnlyWhenItIsTheArgmax) {
  const model::TokenDist p = dist({7}, {1.0});
  EXPECT_EQ(model::verify_draft(p, dist({7}, {1.0}), 7, 0.999, 0.5),
            std::make_pair(int32_t{7}, true));
  EXPECT_EQ(model::verify_draft(p, dist({2}, {1.0}), 2, 0.0, 0.999),
            std::make_pair(int32_t{7}, false));
}

// End to end on a model with 8 tokens: the second sampled token (a kept draft, or drawn from the
// residual, or after a rejection from the main model) has the same distribution with and without
// speculative decoding: a two-sample chi-square over 1500 seeds each, 7 degrees of freedom, below
// its 0.1% critical value 24.3; and the runs do keep some drafts and reject others.
TEST(SpeculativeSampling, SecondTokenDistributedAsPlainSampling) {
  TinyModel tm("FP32", 5, {"--model.vocab_size=8"});
  auto& [cfg, be, c, m] = tm;
  model::GenerateOptions o;
  o.max_new_tokens = 2;
  o.temperature = 1.0f;
  const int n = 1500;
  std::vector<double> plain(8, 0), spec(8, 0);
  int64_t kept = 0, drafted = 0;
  for (int s = 0; s < n; ++s) {
    o.seed = s;
    o.speculative = false;
    auto a = model::generate(c, m, {1, 2, 3}, o);
    o.speculative = true;
    o.seed = 100000 + s;
    auto b = model::generate(c, m, {1, 2, 3}, o);
    ASSERT_TRUE(a.ok() && b.ok());
    ASSERT_EQ(a->tokens.size(), 2u);
    ASSERT_EQ(b->tokens.size(), 2u);
    plain[a->tokens[1]] += 1;
    spec[b->tokens[1]] += 1;
    kept += b->accepted;
    drafted += b->drafted;
  }
  double chi2 = 0;
  for (int x = 0; x < 8; ++x) {
    if (plain[x] + spec[x] > 0)
      chi2 += (plain[x] - spec[x]) * (plain[x] - spec[x]) / (plain[x] + spec[x]);
  }
  EXPECT_LT(chi2, 24.3);
  EXPECT_GT(kept, 0);
  EXPECT_LT(kept, drafted);
  RecordProperty("chi2", std::to_string(chi2));
  RecordProperty("kept", std::to_string(kept) + "/" + std::to_string(drafted));
}

}  // namespace
}  // namespace fp8pipe
