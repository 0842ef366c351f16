// The AdamW optimizer: decoupled weight decay, bias correction, global-norm clipping, state
// export/import, ZeRO-1 shards equal to the unsharded update bitwise, validation, and that it
// actually minimises a quadratic.
#include "optim/adamw.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "optim/lr_schedule.h"
#include "tests/test_random.h"

namespace fp8pipe::optim {
namespace {

using testutil::randn;

// Overwrites x in place: optimizers hold pointers into these vectors, so they must not move.
void refill(std::vector<float>& x, uint32_t seed, float scale = 1.0f) {
  const std::vector<float> r = randn(static_cast<int>(x.size()), seed, scale);
  std::copy(r.begin(), r.end(), x.begin());
}

ParamGroup group(const std::string& name, std::vector<float>& p, const std::vector<float>& g,
                 bool decay = true) {
  return ParamGroup{name, p.data(), g.data(), 0, static_cast<int64_t>(p.size()), decay};
}

AdamW make(std::vector<ParamGroup> groups, AdamWConfig cfg = {}) {
  auto r = AdamW::create(cfg, std::move(groups));
  EXPECT_TRUE(r.ok()) << r.status().to_string();
  return std::move(r).value();
}

TEST(AdamW, WeightDecayIsDecoupled) {
  std::vector<float> p1 = randn(256, 1), p2 = p1, zero(256, 0.0f);
  AdamW opt = make({group("w", p1, zero), group("norm", p2, zero, /*decay=*/false)});
  const float lr = 1e-2f;
  ASSERT_TRUE(opt.step(lr).ok());
  const float decay = static_cast<float>(1.0 - double(lr) * double(opt.config().weight_decay));
  const std::vector<float> p0 = randn(256, 1);
  for (int i = 0; i < 256; ++i) {
    EXPECT_EQ(p1[i], p0[i] * decay);  // zero gradient: only the decay, exactly
    EXPECT_EQ(p2[i], p0[i]);          // no-decay group untouched
  }
  // With gradients the decay is still lr*wd*p, not scaled by Adam's 1/sqrt(v) (not L2).
  std::vector<float> a = p0, b = p0, g = randn(256, 2, 1e-3f);
  AdamW with = make({group("w", a, g)}), without = make({group("w", b, g, false)});
  ASSERT_TRUE(with.step(lr).ok());
  ASSERT_TRUE(without.step(lr).ok());
  for (int i = 0; i < 256; ++i) {
    EXPECT_NEAR(a[i] - b[i], -double(lr) * 0.1 * p0[i], 1e-6) << i;
  }
}

TEST(AdamW, BiasCorrectionMakesEarlyStepsLrSized) {
  std::vector<float> p(64, 0.0f), g(64);  // at 0 the fp32 differences below are exact enough
  for (int i = 0; i < 64; ++i) g[i] = (i % 2 ? -1.0f : 1.0f) * std::ldexp(1.0f, i % 7 - 3);
  AdamWConfig cfg;
  cfg.weight_decay = 0.0f;
  AdamW opt = make({group("w", p, g)}, cfg);
  const float lr = 1e-3f;
  for (int t = 1; t <= 3; ++t) {
    std::vector<float> before = p;
    ASSERT_TRUE(opt.step(lr).ok());
    // m_hat = g and v_hat = g^2 for a constant gradient: each step moves by lr * sign(g), up to
    // the bf16 storage of the moments (<= 2^-8 relative) from step 2 on.
    const double tol = t == 1 ? 1e-6 * lr : lr / 256.0;
    for (int i = 0; i < 64; ++i) {
      EXPECT_NEAR(before[i] - p[i], std::copysign(double(lr), g[i]), tol) << "t=" << t;
    }
  }
  EXPECT_EQ(opt.step_count(), 3);
}

TEST(AdamW, GlobalNormAndClipFactor) {
  std::vector<float> p1(3000), p2(5000), g1 = randn(3000, 3), g2 = randn(5000, 4, 10.0f);
  AdamW opt = make({group("a", p1, g1), group("b", p2, g2)});
  long double ref = 0.0L;
  for (float x : g1) ref += static_cast<long double>(x) * x;
  for (float x : g2) ref += static_cast<long double>(x) * x;
  EXPECT_NEAR(opt.grad_sq_sum(), static_cast<double>(ref), 1e-13 * static_cast<double>(ref));

  EXPECT_EQ(AdamW::clip_factor(0.5, 1.0f), 1.0f);
  EXPECT_EQ(AdamW::clip_factor(4.0, 1.0f), static_cast<float>(1.0 / (4.0 + 1e-6)));
  EXPECT_EQ(AdamW::clip_factor(1e9, 0.0f), 1.0f);  // disabled
  EXPECT_TRUE(std::isnan(AdamW::clip_factor(INFINITY, 1.0f)));
  EXPECT_TRUE(std::isnan(AdamW::clip_factor(NAN, 1.0f)));
}

TEST(AdamW, ClipAndStepEqualsPreScaledGradients) {
  std::vector<float> g = randn(1000, 5, 3.0f), p = randn(1000, 6), q = p;
  AdamW opt = make({group("w", p, g)});
  auto norm = opt.clip_and_step(1e-3f);
  ASSERT_TRUE(norm.ok());
  EXPECT_NEAR(*norm, std::sqrt(opt.grad_sq_sum()), 0.0);
  const float f = AdamW::clip_factor(*norm, 1.0f);
  ASSERT_LT(f, 0.1f);
  std::vector<float> gs(g.size());
  for (size_t i = 0; i < g.size(); ++i) gs[i] = g[i] * f;
  AdamW ref = make({group("w", q, gs)});
  ASSERT_TRUE(ref.step(1e-3f, 1.0f).ok());
  EXPECT_EQ(p, q);  // bitwise: the kernel scales the gradient first, in fp32

  std::vector<float> bad = g;
  bad[7] = INFINITY;
  std::vector<float> r = p;
  AdamW skip = make({group("w", r, bad)});
  auto st = skip.clip_and_step(1e-3f);
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(skip.step_count(), 0);
  EXPECT_EQ(r, p);
  EXPECT_FALSE(skip.step(1e-3f, NAN).ok());
  EXPECT_FALSE(skip.step(-1.0f).ok());
}

TEST(AdamW, StateExportImportResumesBitwise) {
  const int n = 777;
  std::vector<float> pa = randn(n, 8), pb(n), ba = randn(9, 9), bb(9), g(n), gb(9);
  AdamW a = make({group("w", pa, g), group("b", ba, gb, false)});
  auto fill = [&](int t) {
    refill(g, 100 + t);
    refill(gb, 200 + t);
  };
  for (int t = 0; t < 5; ++t) {
    fill(t);
    ASSERT_TRUE(a.clip_and_step(1e-3f).ok());
  }
  std::copy(pa.begin(), pa.end(), pb.begin());
  std::copy(ba.begin(), ba.end(), bb.begin());
  AdamW b = make({group("w", pb, g), group("b", bb, gb, false)});
  const AdamWState saved = a.export_state();
  ASSERT_EQ(saved.arrays.size(), 4u);
  EXPECT_EQ(saved.arrays[0].name, "w.exp_avg");
  EXPECT_EQ(saved.arrays[3].name, "b.exp_avg_sq");
  EXPECT_EQ(saved.arrays[0].bytes.size(), 2u * n);
  ASSERT_TRUE(b.import_state(saved).ok());
  EXPECT_EQ(b.step_count(), 5);
  for (int t = 5; t < 10; ++t) {
    fill(t);
    ASSERT_TRUE(a.clip_and_step(1e-3f).ok());
    ASSERT_TRUE(b.clip_and_step(1e-3f).ok());
  }
  EXPECT_EQ(pa, pb);
  EXPECT_EQ(ba, bb);
  const AdamWState sa = a.export_state(), sb = b.export_state();
  for (size_t i = 0; i < sa.arrays.size(); ++i) EXPECT_EQ(sa.arrays[i].bytes, sb.arrays[i].bytes);
}

TEST(AdamW, ImportRejectsMismatchedState) {
  std::vector<float> p(10), g(10);
  AdamW opt = make({group("w", p, g)});
  AdamWState s = opt.export_state();
  s.step = 4;
  AdamWState renamed = s;
  renamed.arrays[1].name = "x.exp_avg_sq";
  auto st = opt.import_state(renamed);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("x.exp_avg_sq"), std::string::npos);
  AdamWState shifted = s;
  shifted.arrays[0].begin = 1;
  EXPECT_FALSE(opt.import_state(shifted).ok());
  AdamWState dup = s;
  dup.arrays[1] = dup.arrays[0];
  EXPECT_FALSE(opt.import_state(dup).ok());
  AdamWState missing = s;
  missing.arrays.pop_back();
  EXPECT_FALSE(opt.import_state(missing).ok());
  EXPECT_EQ(opt.step_count(), 0);  // unchanged by every failure
  EXPECT_TRUE(opt.import_state(s).ok());
  EXPECT_EQ(opt.step_count(), 4);
}

// ZeRO-1: three "ranks" each own shard_range(n, r, 3) of every array; same grads, same factor.
TEST(AdamW, ShardedUpdateEqualsUnshardedBitwise) {
  const int n = 1001, m = 64, world = 3;
  std::vector<float> full_w = randn(n, 20), full_b = randn(m, 21), gw(n), gb(m);
  std::vector<float> sh_w = full_w, sh_b = full_b;
  AdamW full = make({group("w", full_w, gw), group("b", full_b, gb, false)});
  std::vector<AdamW> shards;
  for (int r = 0; r < world; ++r) {
    const Range rw = shard_range(n, r, world), rb = shard_range(m, r, world);
    shards.push_back(
        make({{"w", sh_w.data() + rw.begin, gw.data() + rw.begin, rw.begin, rw.end},
              {"b", sh_b.data() + rb.begin, gb.data() + rb.begin, rb.begin, rb.end, false}}));
  }
  EXPECT_EQ(shard_range(n, 0, world).end - shard_range(n, 0, world).begin, 334);
  EXPECT_EQ(shard_range(n, 2, world).end, n);
  for (int t = 0; t < 6; ++t) {
    refill(gw, 300 + t, 0.5f);
    refill(gb, 400 + t, 0.5f);
    double sq = 0.0;
    for (const AdamW& s : shards) sq += s.grad_sq_sum();  // the dp all-reduce
    EXPECT_NEAR(sq, full.grad_sq_sum(), 1e-12 * sq);
    const float f = AdamW::clip_factor(std::sqrt(full.grad_sq_sum()), 1.0f);
    ASSERT_TRUE(full.step(1e-3f, f).ok());
    for (AdamW& s : shards) ASSERT_TRUE(s.step(1e-3f, f).ok());
  }
  EXPECT_EQ(sh_w, full_w);
  EXPECT_EQ(sh_b, full_b);
  const AdamWState fs = full.export_state();
  for (size_t a = 0; a < fs.arrays.size(); ++a) {
    std::vector<uint8_t> joined;
    for (const AdamW& s : shards) {
      const AdamWState piece = s.export_state();
      joined.insert(joined.end(), piece.arrays[a].bytes.begin(), piece.arrays[a].bytes.end());
    }
    EXPECT_EQ(joined, fs.arrays[a].bytes) << fs.arrays[a].name;
  }
}

TEST(AdamW, CreateValidates) {
  std::vector<float> p(4), g(4);
  AdamWConfig bad;
  bad.beta2 = 1.0f;
  auto r = AdamW::create(bad, {group("w", p, g)});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("beta2"), std::string::npos);
  bad = {};
  bad.eps = 0.0f;
  EXPECT_FALSE(AdamW::create(bad, {group("w", p, g)}).ok());
  auto dup = AdamW::create({}, {group("w", p, g), group("w", p, g)});
  ASSERT_FALSE(dup.ok());
  EXPECT_NE(dup.status().message().find("'w'"), std::string::npos);
  EXPECT_FALSE(AdamW::create({}, {{"w", nullptr, g.data(), 0, 4}}).ok());
  EXPECT_FALSE(AdamW::create({}, {{"w", p.data(), g.data(), 3, 2}}).ok());
  EXPECT_TRUE(AdamW::create({}, {{"empty", nullptr, nullptr, 0, 0}}).ok());
}

// f(x) = 1/2 sum a_i (x_i - c_i)^2 with curvatures over two decades.
TEST(AdamW, MinimisesAQuadratic) {
  const int n = 64;
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::vector<float> x(n, 0.0f), g(n), a(n), c(n);
  for (int i = 0; i < n; ++i) a[i] = std::pow(10.0f, uni(rng)), c[i] = uni(rng);
  auto loss = [&] {
    double f = 0.0;
    for (int i = 0; i < n; ++i) f += 0.5 * a[i] * (double(x[i]) - c[i]) * (double(x[i]) - c[i]);
    return f;
  };
  AdamWConfig cfg;
  cfg.weight_decay = 0.0f;
  AdamW opt = make({group("x", x, g)}, cfg);
  auto sched = LrSchedule::warmup_cosine(0.05, 5e-4, 20, 1000);
  ASSERT_TRUE(sched.ok());
  const double f0 = loss();
  for (int t = 1; t <= 1000; ++t) {
    for (int i = 0; i < n; ++i) g[i] = a[i] * (x[i] - c[i]);
    ASSERT_TRUE(opt.clip_and_step(sched->lr(t)).ok());
  }
  EXPECT_LT(loss(), 1e-5 * f0);
}

}  // namespace
}  // namespace fp8pipe::optim
