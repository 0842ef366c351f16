// Checks kernels/cpu/ops.h against independent fp64 reference forwards written here: forwards
// within fp32 rounding of the reference, backwards against central finite differences of the fp64
// reference, plus structural properties (causality, RoPE orthogonality, DeepSeek-V3 routing).
#include "kernels/cpu/ops.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cpu/fp8_codec.h"
#include "kernels/cpu/rope.h"

namespace fp8pipe::kernels {
namespace {

using VecF = std::vector<float>;
using VecD = std::vector<double>;

VecF randn(size_t n, uint32_t seed, float sd = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, sd);
  VecF v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}
VecD to_d(const VecF& v) { return VecD(v.begin(), v.end()); }

// |got - want| <= tol * max(1, max|want|) elementwise: fp32 results against fp64 truths whose
// error is a few ulps of the largest magnitude involved.
void expect_close(const VecF& got, const VecD& want, double tol, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double mx = 1.0;
  for (double w : want) mx = std::max(mx, std::abs(w));
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], tol * mx) << what << " at " << i;
  }
}

// Central finite difference of f at x in every coordinate, in double. With h = 1e-6 and smooth
// O(1) functions the truncation error (~h^2) and cancellation (~1e-16/h) are both below 1e-9, far
// under the fp32 errors of the kernels' backwards, so the difference stands in for the exact value.
VecD fd_grad(const std::function<double(const VecD&)>& f, VecD x, double h = 1e-6) {
  VecD g(x.size());
  for (size_t k = 0; k < x.size(); ++k) {
    const double x0 = x[k];
    x[k] = x0 + h;
    const double fp = f(x);
    x[k] = x0 - h;
    const double fm = f(x);
    x[k] = x0;
    g[k] = (fp - fm) / (2 * h);
  }
  return g;
}
double dotd(const VecD& a, const VecD& b) {
  return std::inner_product(a.begin(), a.end(), b.begin(), 0.0);
}

// ---- fp64 references ------------------------------------------------------------------------

VecD rmsnorm_ref(const VecD& x, const VecD& w, int64_t n, int64_t D, double eps) {
  VecD y(n * D);
  for (int64_t r = 0; r < n; ++r) {
    double ss = 0;
    for (int64_t c = 0; c < D; ++c) ss += x[r * D + c] * x[r * D + c];
    const double rs = 1.0 / std::sqrt(ss / D + eps);
    for (int64_t c = 0; c < D; ++c) y[r * D + c] = x[r * D + c] * rs * w[c];
  }
  return y;
}

VecD rope_ref(const VecD& x, const std::vector<int32_t>& pos, int64_t H, int64_t d, double theta) {
  VecD y(x.size());
  for (size_t r = 0; r < pos.size(); ++r) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < d / 2; ++i) {
        const double ang = pos[r] * std::pow(theta, -2.0 * i / d);
        const size_t o = (r * H + h) * d + 2 * i;
        y[o] = x[o] * std::cos(ang) - x[o + 1] * std::sin(ang);
        y[o + 1] = x[o] * std::sin(ang) + x[o + 1] * std::cos(ang);
      }
    }
  }
  return y;
}

struct Dims {
  int64_t B, T, H, dk, dv;
  double scale;
};

// Naive causal softmax attention in fp64: o [B][T][H][dv]; lse [B][H][T] if non-null.
VecD attention_ref(const VecD& q, const VecD& k, const VecD& v, const Dims& a,
                   VecD* lse = nullptr) {
  VecD o(a.B * a.T * a.H * a.dv, 0.0);
  if (lse) lse->assign(a.B * a.H * a.T, 0.0);
  VecD s(a.T);
  for (int64_t b = 0; b < a.B; ++b) {
    for (int64_t h = 0; h < a.H; ++h) {
      for (int64_t i = 0; i < a.T; ++i) {
        double m = -INFINITY, l = 0;
        for (int64_t j = 0; j <= i; ++j) {
          s[j] = 0;
          for (int64_t c = 0; c < a.dk; ++c) {
            s[j] +=
                q[((b * a.T + i) * a.H + h) * a.dk + c] * k[((b * a.T + j) * a.H + h) * a.dk + c];
          }
          s[j] *= a.scale;
          m = std::max(m, s[j]);
        }
        for (int64_t j = 0; j <= i; ++j) l += std::exp(s[j] - m);
        for (int64_t j = 0; j <= i; ++j) {
          const double p = std::exp(s[j] - m) / l;
          for (int64_t c = 0; c < a.dv; ++c) {
            o[((b * a.T + i) * a.H + h) * a.dv + c] += p * v[((b * a.T + j) * a.H + h) * a.dv + c];
          }
        }
        if (lse) (*lse)[(b * a.H + h) * a.T + i] = m + std::log(l);
      }
    }
  }
  return o;
}

VecD swiglu_ref(const VecD& g, const VecD& u) {
  VecD h(g.size());
  for (size_t i = 0; i < g.size(); ++i) h[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
  return h;
}

// -log softmax(x)[t] per row via a long-double log-sum-exp; ignored rows 0.
VecD cross_entropy_ref(const VecD& x, const std::vector<int32_t>& t, int64_t V) {
  VecD loss(t.size(), 0.0);
  for (size_t r = 0; r < t.size(); ++r) {
    if (t[r] < 0) continue;
    long double mx = -INFINITY, s = 0;
    for (int64_t j = 0; j < V; ++j) mx = std::max<long double>(mx, x[r * V + j]);
    for (int64_t j = 0; j < V; ++j) s += std::exp(static_cast<long double>(x[r * V + j]) - mx);
    loss[r] = static_cast<double>(mx + std::log(s) - x[r * V + t[r]]);
  }
  return loss;
}

// ---- embedding, rows, elementwise -----------------------------------------------------------

TEST(OpsEmbedding, ForwardGathersAndBackwardAccumulatesRepeatedIds) {
  const int64_t Vocab = 5, D = 7;
  const VecF table = randn(Vocab * D, 1);
  const std::vector<int32_t> ids = {3, 0, 3, 4, 3};
  const int64_t n = ids.size();
  VecF out(n * D);
  embedding_fwd(table.data(), ids.data(), n, D, out.data());
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c < D; ++c) EXPECT_EQ(out[r * D + c], table[ids[r] * D + c]);
  }
  const VecF dout = randn(n * D, 2);
  VecF dtable = randn(Vocab * D, 3), expect = dtable;
  embedding_bwd_acc(dout.data(), ids.data(), n, D, dtable.data());
  for (int64_t r = 0; r < n; ++r) {  // serial order: bit-identical to this loop
    for (int64_t c = 0; c < D; ++c) expect[ids[r] * D + c] += dout[r * D + c];
  }
  EXPECT_EQ(dtable, expect);
}

TEST(OpsRows, GatherAndScatterAddWithRepeatsAreSerialAndDeterministic) {
  const int64_t D = 9, n = 6, rows_out = 4;
  const VecF in = randn(n * D, 4), w = randn(n, 5);
  const std::vector<int32_t> rows = {2, 0, 2, 3, 2, 0};
  VecF g(n * D);
  const VecF src = randn(rows_out * D, 6);
  gather_rows(src.data(), rows.data(), n, D, g.data());
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < D; ++c) EXPECT_EQ(g[i * D + c], src[rows[i] * D + c]);
  }
  for (const float* wp : {w.data(), static_cast<const float*>(nullptr)}) {
    VecF out = randn(rows_out * D, 7), expect = out;
    scatter_add_rows(in.data(), rows.data(), wp, n, D, out.data());
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t c = 0; c < D; ++c)
        expect[rows[i] * D + c] += (wp ? wp[i] : 1.0f) * in[i * D + c];
    }
    EXPECT_EQ(out, expect);
  }
}

TEST(OpsElementwise, AddAndAxpy) {
  const VecF a = randn(37, 8), b = randn(37, 9);
  VecF out(37), y = b;
  add(a.data(), b.data(), 37, out.data());
  axpy(-0.75f, a.data(), 37, y.data());
  for (int i = 0; i < 37; ++i) {
    EXPECT_EQ(out[i], a[i] + b[i]);
    EXPECT_EQ(y[i], b[i] + -0.75f * a[i]);
  }
}

TEST(OpsRoundBf16, MatchesCodecOnSpecialValues) {
  const float inf = std::numeric_limits<float>::infinity();
  const VecF x = {0.0f,
                  -0.0f,
                  1.0f,
                  -1.0f,
                  inf,
                  -inf,
                  std::numeric_limits<float>::quiet_NaN(),
                  bits_f32(0x3F808000u) /* tie, even: down */,
                  bits_f32(0x3F818000u) /* up */,
                  bits_f32(0x00000001u) /* min subnormal */,
                  bits_f32(0x807FFFFFu),
                  bits_f32(0x7F7FFFFFu) /* rounds to inf */,
                  3.14159265f,
                  -1e-30f};
  VecF out(x.size());
  round_bf16(x.data(), x.size(), out.data());
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(f32_bits(out[i]), f32_bits(bf16_to_float(float_to_bf16(x[i])))) << i;
  }
  EXPECT_EQ(out[7], 1.0f);
  EXPECT_EQ(f32_bits(out[8]), 0x3F820000u);
  EXPECT_TRUE(std::isnan(out[6]));
  EXPECT_EQ(out[11], inf);
  EXPECT_TRUE(std::signbit(out[1]));
}

// ---- RMSNorm --------------------------------------------------------------------------------

TEST(RmsNorm, ForwardMatchesFp64) {
  const int64_t n = 5, D = 64;
  const VecF x = randn(n * D, 10, 3.0f), w = randn(D, 11);
  VecF y(n * D), rstd(n);
  rmsnorm_fwd(x.data(), w.data(), n, D, 1e-6f, y.data(), rstd.data());
  expect_close(y, rmsnorm_ref(to_d(x), to_d(w), n, D, 1e-6), 4e-7, "y");
  for (int64_t r = 0; r < n; ++r) {
    double ss = 0;
    for (int64_t c = 0; c < D; ++c) ss += double(x[r * D + c]) * x[r * D + c];
    EXPECT_EQ(rstd[r], static_cast<float>(1.0 / std::sqrt(ss / D + double(1e-6f))));
  }
}

TEST(RmsNorm, BackwardMatchesFiniteDifferencesAndAccumulatesDw) {
  const int64_t n = 4, D = 16;
  const double eps = 1e-5;
  const VecF x = randn(n * D, 12), w = randn(D, 13), dy = randn(n * D, 14);
  VecF y(n * D), rstd(n), dx(n * D), dw(D, 0.0f);
  rmsnorm_fwd(x.data(), w.data(), n, D, float(eps), y.data(), rstd.data());
  rmsnorm_bwd(dy.data(), x.data(), w.data(), rstd.data(), n, D, dx.data(), dw.data());
  const VecD xd = to_d(x), wd = to_d(w), dyd = to_d(dy);
  const VecD gx =
      fd_grad([&](const VecD& v) { return dotd(dyd, rmsnorm_ref(v, wd, n, D, eps)); }, xd);
  const VecD gw =
      fd_grad([&](const VecD& v) { return dotd(dyd, rmsnorm_ref(xd, v, n, D, eps)); }, wd);
  expect_close(dx, gx, 2e-6, "dx");
  expect_close(dw, gw, 2e-6, "dw");
  VecF dw2 = dw;  // dw is accumulated: a second call adds the same again
  rmsnorm_bwd(dy.data(), x.data(), w.data(), rstd.data(), n, D, dx.data(), dw2.data());
  for (int64_t c = 0; c < D; ++c) EXPECT_NEAR(dw2[c], 2 * dw[c], 1e-6 * (1 + std::abs(dw[c])));
}

// ---- RoPE -----------------------------------------------------------------------------------

std::vector<double> plain_freq(int64_t d) { return rope_frequencies(RopeSpec{}, d); }

TEST(Rope, PlainFrequenciesAreThetaPowers) {
  const std::vector<double> f = rope_frequencies(RopeSpec{.theta = 500.0}, 8);
  ASSERT_EQ(f.size(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_DOUBLE_EQ(f[i], std::pow(500.0, -i / 4.0));
  EXPECT_EQ(rope_magnitude(RopeSpec{}), 1.0);
  EXPECT_EQ(rope_softmax_factor(RopeSpec{}), 1.0);
}

// DeepSeek-V3's YaRN (config.json rope_scaling: factor 40, original 4096, beta 32 / 1, mscale 1
// / 1) on its 64 RoPE dims, theta 1e4. Pair i turns 4096·1e4^(-i/32)/2π times over the original
// context: 36.7 at i = 10, 27.5 at 11, 1.16 at 22, 0.87 at 23. The pair indices where that
// equals 32 and 1 are 10.47 and 22.51 (d ln(L / 2πβ) / 2 ln θ), floored and ceiled to 10 and 23:
// pairs 0..10 keep theta's frequency, 23..31 are divided by 40, 11..22 blend linearly in the index.
// The logits' factor is (0.1 ln 40 + 1)^2 = 1.873854; cos/sin are not scaled.
TEST(Rope, YarnMatchesDeepSeekV3sRampByHand) {
  const RopeSpec r{.theta = 10000.0,
                   .factor = 40.0,
                   .original_max_position = 4096,
                   .beta_fast = 32.0,
                   .beta_slow = 1.0,
                   .mscale = 1.0,
                   .mscale_all_dim = 1.0};
  const std::vector<double> f = rope_frequencies(r, 64);
  ASSERT_EQ(f.size(), 32u);
  for (int i = 0; i < 32; ++i) {
    const double base = std::pow(10000.0, -i / 32.0);
    const double t = i <= 10 ? 0.0 : i >= 23 ? 1.0 : (i - 10) / 13.0;  // share interpolated
    EXPECT_NEAR(f[i], base * (1 - t) + base / 40.0 * t, 1e-15 * base) << "pair " << i;
  }
  EXPECT_NEAR(rope_softmax_factor(r), 1.873854, 1e-6);
  EXPECT_EQ(rope_magnitude(r), 1.0);
}

// The backward rotates by -angle with the same magnitude: the transpose of the forward, so
// <R x, y> = <x, R^T y> for any x, y, also when YaRN scales cos/sin (mscale != mscale_all_dim:
// (0.2 ln 8 + 1) / (0.1 ln 8 + 1) = 1.1721); and pair norms scale by exactly that magnitude.
TEST(Rope, YarnMagnitudeScalesPairsAndTheBackwardIsTheTranspose) {
  const RopeSpec r{.theta = 10000.0,
                   .factor = 8.0,
                   .original_max_position = 16,
                   .beta_fast = 4.0,
                   .beta_slow = 0.5,
                   .mscale = 2.0,
                   .mscale_all_dim = 1.0};
  EXPECT_NEAR(rope_magnitude(r), 1.1721, 1e-4);
  const int64_t H = 2, d = 16, n = 40;
  std::vector<int32_t> pos(n);
  for (int64_t i = 0; i < n; ++i) pos[i] = static_cast<int32_t>(i * 3);
  const std::vector<double> f = rope_frequencies(r, d);
  const VecF x0 = randn(n * H * d, 40), y0 = randn(n * H * d, 41);
  VecF x = x0, y = y0;
  rope(x.data(), pos.data(), n, H, d, f.data(), rope_magnitude(r), false);
  rope(y.data(), pos.data(), n, H, d, f.data(), rope_magnitude(r), true);
  double rx_y = 0, x_ry = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    rx_y += double(x[i]) * y0[i];
    x_ry += double(x0[i]) * y[i];
  }
  EXPECT_NEAR(rx_y, x_ry, 1e-5 * (1 + std::abs(rx_y)));
  for (int64_t p = 0; p < n * H * d / 2; ++p) {
    const double a = std::hypot(double(x0[2 * p]), double(x0[2 * p + 1]));
    EXPECT_NEAR(std::hypot(double(x[2 * p]), double(x[2 * p + 1])), 1.1721 * a, 2e-4 * (1 + a));
  }
}

TEST(Rope, MatchesFp64IncludingLargePositions) {
  const int64_t H = 3, d = 16;
  const std::vector<int32_t> pos = {0, 1, 7, 127, 4095, 100000};
  const int64_t n = pos.size();
  const VecF x0 = randn(n * H * d, 20);
  VecF x = x0;
  rope(x.data(), pos.data(), n, H, d, plain_freq(d).data(), 1.0, false);
  // cos/sin rounded to float and one fp32 rotation: a few ulps of |x|, even at position 1e5.
  expect_close(x, rope_ref(to_d(x0), pos, H, d, 10000.0), 1e-6, "rope");
  for (int64_t c = 0; c < H * d; ++c) EXPECT_EQ(x[c], x0[c]) << "position 0 must be the identity";
}

TEST(Rope, InverseUndoesForwardAndPairNormsArePreserved) {
  const int64_t H = 2, d = 64, n = 50;
  std::vector<int32_t> pos(n);
  for (int64_t r = 0; r < n; ++r) pos[r] = static_cast<int32_t>(r * 37);
  const VecF x0 = randn(n * H * d, 21);
  VecF x = x0;
  rope(x.data(), pos.data(), n, H, d, plain_freq(d).data(), 1.0, false);
  for (int64_t p = 0; p < n * H * d / 2; ++p) {
    const double a = std::hypot(double(x0[2 * p]), double(x0[2 * p + 1]));
    EXPECT_NEAR(std::hypot(double(x[2 * p]), double(x[2 * p + 1])), a, 1e-6 * (1 + a));
  }
  rope(x.data(), pos.data(), n, H, d, plain_freq(d).data(), 1.0, true);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(x[i], x0[i], 1e-6 * (1 + std::abs(x0[i])));
}

// ---- attention ------------------------------------------------------------------------------

struct AttnCase {
  Dims a;
  VecF q, k, v, o, lse;
  AttnCase(Dims dims, uint32_t seed) : a(dims) {
    q = randn(a.B * a.T * a.H * a.dk, seed);
    k = randn(a.B * a.T * a.H * a.dk, seed + 1);
    v = randn(a.B * a.T * a.H * a.dv, seed + 2);
    forward();
  }
  void forward() {
    o.assign(a.B * a.T * a.H * a.dv, 0.0f);
    lse.assign(a.B * a.H * a.T, 0.0f);
    attention_fwd(q.data(), k.data(), v.data(), a.B, a.T, a.H, a.dk, a.dv, float(a.scale), o.data(),
                  lse.data());
  }
};

TEST(Attention, ForwardMatchesFp64NaiveSoftmax) {
  // The second shape is large enough for the kernel to split heads over threads.
  for (const Dims d : {Dims{2, 7, 3, 8, 5, 0.35}, Dims{2, 64, 4, 48, 32, 1 / std::sqrt(48.0)}}) {
    AttnCase c(d, 30);
    VecD lse;
    const VecD o = attention_ref(to_d(c.q), to_d(c.k), to_d(c.v), d, &lse);
    expect_close(c.o, o, 2e-6, "o");
    expect_close(c.lse, lse, 2e-6, "lse");
  }
}

TEST(Attention, IsCausalAndDeterministic) {
  const Dims d{2, 16, 2, 8, 8, 0.3};
  AttnCase c(d, 40);
  const VecF o0 = c.o;
  c.forward();
  EXPECT_EQ(c.o, o0);
  const int64_t t_changed = 9;
  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t x = 0; x < d.H * d.dk; ++x) c.k[(b * d.T + t_changed) * d.H * d.dk + x] += 5.0f;
    for (int64_t x = 0; x < d.H * d.dv; ++x) c.v[(b * d.T + t_changed) * d.H * d.dv + x] -= 3.0f;
  }
  c.forward();
  const int64_t row = d.H * d.dv;
  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t t = 0; t < d.T; ++t) {
      const bool same =
          std::equal(c.o.begin() + (b * d.T + t) * row, c.o.begin() + (b * d.T + t + 1) * row,
                     o0.begin() + (b * d.T + t) * row);
      EXPECT_EQ(same, t < t_changed) << "b=" << b << " t=" << t;
    }
  }
}

// Loss L = <dO, attention_ref(q, k, v)> in fp64; the kernel's dq/dk/dv must be its gradient.
void check_attention_grads(const Dims& d, uint32_t seed, double tol) {
  AttnCase c(d, seed);
  const VecF dout = randn(c.o.size(), seed + 9);
  VecF dq(c.q.size()), dk(c.k.size()), dv(c.v.size());
  attention_bwd(dout.data(), c.q.data(), c.k.data(), c.v.data(), c.o.data(), c.lse.data(), d.B, d.T,
                d.H, d.dk, d.dv, float(d.scale), dq.data(), dk.data(), dv.data());
  const VecD q = to_d(c.q), k = to_d(c.k), v = to_d(c.v), g = to_d(dout);
  const double h = 1e-5;  // ~1e-10 truncation error; the loss is a sum of O(T) terms
  expect_close(dq, fd_grad([&](const VecD& x) { return dotd(g, attention_ref(x, k, v, d)); }, q, h),
               tol, "dq");
  expect_close(dk, fd_grad([&](const VecD& x) { return dotd(g, attention_ref(q, x, v, d)); }, k, h),
               tol, "dk");
  expect_close(dv, fd_grad([&](const VecD& x) { return dotd(g, attention_ref(q, k, x, d)); }, v, h),
               tol, "dv");
}

TEST(Attention, BackwardMatchesFiniteDifferences) {
  check_attention_grads(Dims{2, 6, 2, 4, 3, 0.5}, 50, 5e-6);
  check_attention_grads(Dims{1, 9, 1, 6, 4, 1.7}, 60, 5e-6);  // sharper softmax
}

TEST(Attention, BackwardAtThreadedSizeMatchesFiniteDifferencesOnSampledEntries) {
  // Large enough that the backward splits heads over threads; check a sample of coordinates.
  const Dims d{2, 48, 4, 16, 8, 0.25};
  AttnCase c(d, 70);
  const VecF dout = randn(c.o.size(), 71);
  VecF dq(c.q.size()), dk(c.k.size()), dv(c.v.size());
  attention_bwd(dout.data(), c.q.data(), c.k.data(), c.v.data(), c.o.data(), c.lse.data(), d.B, d.T,
                d.H, d.dk, d.dv, float(d.scale), dq.data(), dk.data(), dv.data());
  VecD q = to_d(c.q), k = to_d(c.k), v = to_d(c.v);
  const VecD g = to_d(dout);
  auto loss = [&] { return dotd(g, attention_ref(q, k, v, d)); };
  auto fd = [&](VecD& x, size_t i) {
    const double x0 = x[i], h = 1e-5;
    x[i] = x0 + h;
    const double lp = loss();
    x[i] = x0 - h;
    const double lm = loss();
    x[i] = x0;
    return (lp - lm) / (2 * h);
  };
  for (size_t i = 3; i < q.size(); i += 97) {
    EXPECT_NEAR(dq[i], fd(q, i), 2e-5) << i;
    EXPECT_NEAR(dk[i], fd(k, i), 2e-5) << i;
  }
  for (size_t i = 5; i < v.size(); i += 53) EXPECT_NEAR(dv[i], fd(v, i), 2e-5) << i;
}

// ---- SwiGLU ---------------------------------------------------------------------------------

TEST(Swiglu, ForwardAndBackwardMatchFp64) {
  VecF g = randn(200, 90, 3.0f);
  g.push_back(-90.0f);  // saturated sigmoid: no inf/nan
  g.push_back(40.0f);
  const int64_t n = g.size();
  const VecF u = randn(n, 91), dh = randn(n, 92);
  VecF h(n), dg(n), du(n);
  swiglu_fwd(g.data(), u.data(), n, h.data());
  swiglu_bwd(dh.data(), g.data(), u.data(), n, dg.data(), du.data());
  const VecD gd = to_d(g), ud = to_d(u);
  const VecD href = swiglu_ref(gd, ud);
  VecD dgref(n), duref(n);
  for (int64_t i = 0; i < n; ++i) {  // elementwise: one scalar finite difference per entry
    auto f = [&](double gi, double ui) { return swiglu_ref({gi}, {ui})[0]; };
    const double e = 1e-6;
    dgref[i] = dh[i] * (f(gd[i] + e, ud[i]) - f(gd[i] - e, ud[i])) / (2 * e);
    duref[i] = dh[i] * (f(gd[i], ud[i] + e) - f(gd[i], ud[i] - e)) / (2 * e);
  }
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_NEAR(h[i], href[i], 4e-7 * (1 + std::abs(href[i]))) << i;
    EXPECT_NEAR(dg[i], dgref[i], 2e-6 * (1 + std::abs(dgref[i]))) << i;
    EXPECT_NEAR(du[i], duref[i], 2e-6 * (1 + std::abs(duref[i]))) << i;
  }
}

// ---- cross-entropy --------------------------------------------------------------------------

TEST(CrossEntropy, MatchesFp64LogSoftmaxWithIgnoredRowsAndLargeLogits) {
  const int64_t V = 50;
  const std::vector<int32_t> t = {3, -1, 49, 0, -100};
  const int64_t n = t.size();
  VecF x = randn(n * V, 100, 4.0f);
  for (int64_t j = 0; j < V; ++j) x[3 * V + j] += 1e4f;  // needs the max shift
  VecF loss(n, -1.0f);
  cross_entropy_fwd(x.data(), t.data(), n, V, loss.data());
  const VecD ref = cross_entropy_ref(to_d(x), t, V);
  for (int64_t r = 0; r < n; ++r) {
    // Max-shifted in the kernel, so even the 1e4-offset row is within ulps of the loss itself.
    EXPECT_NEAR(loss[r], ref[r], 4e-7 * (1 + std::abs(ref[r]))) << r;
  }
  EXPECT_EQ(loss[1], 0.0f);
  EXPECT_EQ(loss[4], 0.0f);
}

TEST(CrossEntropy, GradientIsFiniteDifferenceRowsSumToZeroIgnoredRowsZero) {
  const int64_t V = 11;
  const std::vector<int32_t> t = {2, -1, 10, 0};
  const int64_t n = t.size();
  const VecF x = randn(n * V, 110, 2.0f);
  const float row_scale = 0.25f;
  VecF d(n * V, 123.0f);
  cross_entropy_bwd(x.data(), t.data(), n, V, row_scale, d.data());
  const VecD g = fd_grad(
      [&](const VecD& v) {
        const VecD l = cross_entropy_ref(v, t, V);
        return row_scale * std::accumulate(l.begin(), l.end(), 0.0);
      },
      to_d(x));
  expect_close(d, g, 1e-6, "dlogits");
  for (int64_t r = 0; r < n; ++r) {
    double s = 0;
    for (int64_t j = 0; j < V; ++j) s += d[r * V + j];
    EXPECT_NEAR(s, 0.0, 1e-6) << r;
  }
  for (int64_t j = 0; j < V; ++j) EXPECT_EQ(d[1 * V + j], 0.0f);
}

// ---- router ---------------------------------------------------------------------------------

float logit_of(double s) { return static_cast<float>(std::log(s / (1 - s))); }

struct Routed {
  VecF scores, gates;
  std::vector<int32_t> idx;
};
Routed route(const VecF& logits, const VecF& bias, int64_t E, int64_t topk, int64_t groups,
             int64_t max_groups, float scale) {
  const int64_t n = logits.size() / E;
  Routed r{VecF(n * E), VecF(n * topk), std::vector<int32_t>(n * topk)};
  router_topk(logits.data(), bias.data(), n, E, topk, groups, max_groups, scale, r.scores.data(),
              r.idx.data(), r.gates.data());
  return r;
}

// The MoE dispatch order against std::stable_sort of (expert, assignment) pairs.
TEST(Router, SortAssignmentsIsAStableSortByExpert) {
  const int64_t n = 300, K = 6, E = 37;
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> d(0, E - 1);
  std::vector<int32_t> idx(n * K);
  for (auto& e : idx) e = d(rng);
  idx[7] = 36;  // the last expert used; expert 0 may go unused
  std::vector<int32_t> order(n * K), rows(n * K), slot(n * K), counts(E, -1);
  sort_assignments(idx.data(), n, K, E, order.data(), rows.data(), slot.data(), counts.data());
  std::vector<int32_t> want(n * K);
  std::iota(want.begin(), want.end(), 0);
  std::stable_sort(want.begin(), want.end(), [&](int32_t a, int32_t b) { return idx[a] < idx[b]; });
  EXPECT_EQ(order, want);
  for (int64_t i = 0; i < n * K; ++i) {
    EXPECT_EQ(rows[i], order[i] / K);
    EXPECT_EQ(slot[order[i]], i);
  }
  for (int64_t e = 0; e < E; ++e)
    EXPECT_EQ(counts[e], std::count(idx.begin(), idx.end(), static_cast<int32_t>(e)));
}

TEST(Router, GroupLimitDropsHighScoringExpertInLosingGroup) {
  // 8 experts, 4 groups of 2, at most 2 groups, top-4: group score = sum of its top 2.
  //   g0 {0.9, 0.1}=1.0  g1 {0.6, 0.6}=1.2  g2 {0.55, 0.55}=1.1  g3 {0.2, 0.3}=0.5
  const VecD s = {0.9, 0.1, 0.6, 0.6, 0.55, 0.55, 0.2, 0.3};
  VecF logits;
  for (double x : s) logits.push_back(logit_of(x));
  const VecF zero(8, 0.0f);
  const Routed r = route(logits, zero, 8, 4, 4, 2, 2.5f);
  EXPECT_EQ(r.idx, (std::vector<int32_t>{2, 3, 4, 5}));  // expert 0 (0.9) excluded with g0
  for (int e = 0; e < 8; ++e) EXPECT_EQ(r.scores[e], 1.0f / (1.0f + std::exp(-logits[e])));
  const Routed u = route(logits, zero, 8, 4, 1, 1, 2.5f);  // no limit
  EXPECT_EQ(u.idx, (std::vector<int32_t>{0, 2, 3, 4}));    // 0.55 tie -> lower index 4
  const Routed m = route(logits, zero, 8, 4, 4, 4, 2.5f);  // max_groups == groups: no limit
  EXPECT_EQ(m.idx, u.idx);
  // Bias lifts group 3 to the top (biased {0.65, 0.75} = 1.4) and drops group 2; the order is by
  // biased score, the gates come from the unbiased scores {0.3, 0.2, 0.6, 0.6}.
  VecF bias(8, 0.0f);
  bias[6] = bias[7] = 0.45f;
  const Routed b = route(logits, bias, 8, 4, 4, 2, 2.5f);
  EXPECT_EQ(b.idx, (std::vector<int32_t>{7, 6, 2, 3}));
  const double sum = 0.3 + 0.2 + 0.6 + 0.6;
  EXPECT_NEAR(b.gates[0], 0.3 / sum * 2.5, 1e-6);
  EXPECT_NEAR(b.gates[1], 0.2 / sum * 2.5, 1e-6);
  EXPECT_NEAR(b.gates[2], 0.6 / sum * 2.5, 1e-6);
}

TEST(Router, BiasChangesSelectionNotGateValues) {
  const VecF logits = {logit_of(0.9), logit_of(0.8), logit_of(0.7), logit_of(0.6)};
  const Routed a = route(logits, VecF{0, 0, 0, 0}, 4, 2, 1, 1, 1.0f);
  EXPECT_EQ(a.idx, (std::vector<int32_t>{0, 1}));
  const Routed b = route(logits, VecF{0, 0, 0.5f, 0}, 4, 2, 1, 1, 1.0f);
  EXPECT_EQ(b.idx, (std::vector<int32_t>{2, 0}));  // descending biased score: 1.2, 0.9
  EXPECT_EQ(a.scores, b.scores);
  EXPECT_NEAR(b.gates[0], 0.7 / 1.6, 1e-6);
  EXPECT_NEAR(b.gates[1], 0.9 / 1.6, 1e-6);
  // The same set chosen with and without bias gets the same gates.
  const Routed c = route(logits, VecF{-0.05f, -0.05f, 0, 0}, 4, 2, 1, 1, 1.0f);
  EXPECT_EQ(c.idx, a.idx);
  EXPECT_EQ(c.gates, a.gates);
}

TEST(Router, TiesGoToLowerIndexForExpertsAndGroups) {
  const VecF logits(8, 0.3f), zero(8, 0.0f);
  EXPECT_EQ(route(logits, zero, 8, 3, 1, 1, 1.0f).idx, (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(route(logits, zero, 8, 3, 4, 2, 1.0f).idx, (std::vector<int32_t>{0, 1, 2}));
  // top-1 with max 2 of 4 groups: a group scores by its single best expert.
  VecF l(8, 0.0f);
  l[7] = 1.0f, l[1] = 1.0f;  // tie between groups 0 and 3; expert 1 ranks first
  EXPECT_EQ(route(l, zero, 8, 1, 4, 2, 1.0f).idx, (std::vector<int32_t>{1}));
  // Four equal gates sum to route_scale: each 2.5 / 4.
  for (float gt : route(logits, zero, 8, 4, 4, 2, 2.5f).gates) EXPECT_NEAR(gt, 0.625f, 1e-6);
}

// Independent sort-based reference of DeepSeek-V3 routing for one token.
std::vector<int32_t> route_ref(const VecF& s, const VecF& bias, int64_t topk, int64_t groups,
                               int64_t max_groups) {
  const int64_t E = s.size(), gs = E / groups;
  VecD b(E);
  for (int64_t e = 0; e < E; ++e) b[e] = float(s[e] + bias[e]);
  auto better = [&](const VecD& v) {
    return [&v](int32_t x, int32_t y) { return v[x] > v[y] || (v[x] == v[y] && x < y); };
  };
  VecD gscore(groups);
  for (int64_t g = 0; g < groups; ++g) {
    VecD in(b.begin() + g * gs, b.begin() + (g + 1) * gs);
    std::sort(in.rbegin(), in.rend());
    for (int64_t r = 0; r < std::max<int64_t>(1, topk / max_groups); ++r) gscore[g] += in[r];
  }
  std::vector<int32_t> gorder(groups), cand;
  std::iota(gorder.begin(), gorder.end(), 0);
  std::stable_sort(gorder.begin(), gorder.end(), better(gscore));
  for (int64_t r = 0; r < max_groups; ++r) {
    for (int64_t e = 0; e < gs; ++e) cand.push_back(static_cast<int32_t>(gorder[r] * gs + e));
  }
  std::sort(cand.begin(), cand.end(), better(b));
  cand.resize(topk);
  return cand;
}

TEST(Router, MatchesSortReferenceAtDeepSeekV3Shape) {
  const int64_t E = 256, topk = 8, groups = 8, max_groups = 4, n = 64;
  const VecF logits = randn(n * E, 120, 2.0f), bias = randn(E, 121, 0.05f);
  const Routed r = route(logits, bias, E, topk, groups, max_groups, 2.5f);
  for (int64_t t = 0; t < n; ++t) {
    const VecF s(r.scores.begin() + t * E, r.scores.begin() + (t + 1) * E);
    const std::vector<int32_t> want = route_ref(s, bias, topk, groups, max_groups);
    EXPECT_EQ(std::vector<int32_t>(r.idx.begin() + t * topk, r.idx.begin() + (t + 1) * topk), want);
    std::vector<int32_t> nodes;
    double gsum = 0;
    for (int64_t k = 0; k < topk; ++k) {
      nodes.push_back(r.idx[t * topk + k] / (E / groups));
      gsum += r.gates[t * topk + k];
    }
    std::sort(nodes.begin(), nodes.end());
    EXPECT_LE(std::unique(nodes.begin(), nodes.end()) - nodes.begin(), max_groups);
    EXPECT_NEAR(gsum, 2.5, 1e-5);
  }
}

}  // namespace
}  // namespace fp8pipe::kernels
