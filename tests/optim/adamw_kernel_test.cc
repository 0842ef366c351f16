// The fused AdamW kernel against an independent fp64 implementation of the AdamW formulas
// (Loshchilov & Hutter; PyTorch's AdamW) that models the bf16 storage of the moments. bf16 keeps
// 8 significant bits, so storing a moment changes it by at most u = 2^-8 relative (half an ulp).
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/cpu/adamw.h"
#include "kernels/cpu/fp8_codec.h"

namespace fp8pipe::kernels {
namespace {

constexpr double kU = 1.0 / 256.0;  // bf16 unit roundoff 2^-8

struct Hyper {
  double lr, b1, b2, eps, wd, scale;
  int64_t t;
};

// One AdamW step in fp64, textbook form. Returns the new weight; m and v are updated in place
// (unrounded); r receives m_hat / (sqrt(v_hat) + eps).
double ref_step(double p, double g, double& m, double& v, const Hyper& h, double* r) {
  g = g * h.scale;
  m = h.b1 * m + (1.0 - h.b1) * g;
  v = h.b2 * v + (1.0 - h.b2) * g * g;
  const double m_hat = m / (1.0 - std::pow(h.b1, static_cast<double>(h.t)));
  const double v_hat = v / (1.0 - std::pow(h.b2, static_cast<double>(h.t)));
  *r = m_hat / (std::sqrt(v_hat) + h.eps);
  return p - h.lr * h.wd * p - h.lr * *r;
}

AdamWScalars scalars(const Hyper& h) {
  AdamWHyper k;
  k.lr = static_cast<float>(h.lr);
  k.beta1 = static_cast<float>(h.b1);
  k.beta2 = static_cast<float>(h.b2);
  k.eps = static_cast<float>(h.eps);
  k.weight_decay = static_cast<float>(h.wd);
  k.step = h.t;
  k.grad_scale = static_cast<float>(h.scale);
  return adamw_scalars(k);
}

// Hyperparameters as the kernel sees them: fp32 values widened to fp64.
Hyper hyper_at(int64_t t, float lr, float scale) {
  return Hyper{lr, 0.9f, 0.95f, 1e-8f, 0.1f, scale, t};
}

// Each step starts the reference from the kernel's own state (fp32 p, bf16 m and v), so the
// only differences are fp32 arithmetic (a few 2^-24) and the final bf16 rounding (<= u).
TEST(AdamWKernel, EachStepMatchesFp64Reference) {
  const int n = 2048;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> expo(-3.0f, 1.0f);
  std::vector<float> p(n), g(n), mag(n);
  std::vector<uint16_t> m(n, 0), v(n, 0);
  for (int i = 0; i < n; ++i) p[i] = normal(rng), mag[i] = std::pow(10.0f, expo(rng));
  for (int64_t t = 1; t <= 100; ++t) {
    for (int i = 0; i < n; ++i) g[i] = normal(rng) * mag[i];
    const Hyper h = hyper_at(t, 1e-3f * (1.0f + 0.01f * t), t % 3 == 0 ? 0.7f : 1.0f);
    std::vector<float> p0 = p;
    std::vector<uint16_t> m0 = m, v0 = v;
    adamw_step(p.data(), g.data(), m.data(), v.data(), n, scalars(h));
    for (int i = 0; i < n; ++i) {
      double mr = bf16_to_float(m0[i]), vr = bf16_to_float(v0[i]), r;
      const double gs = static_cast<double>(g[i]) * h.scale;
      const double m_terms = std::abs(h.b1 * mr) + std::abs((1.0 - h.b1) * gs);
      const double pr = ref_step(p0[i], g[i], mr, vr, h, &r);
      const double e_m = std::ldexp(m_terms, -21);  // fp32 error of m, absolute (cancellation)
      ASSERT_LE(std::abs(bf16_to_float(m[i]) - mr), kU * std::abs(mr) + e_m) << "t=" << t;
      ASSERT_LE(std::abs(bf16_to_float(v[i]) - vr), kU * vr * (1.0 + 1e-6)) << "t=" << t;
      const double denom = std::sqrt(vr / (1.0 - std::pow(h.b2, double(t)))) + h.eps;
      const double step_size = h.lr / (1.0 - std::pow(h.b1, double(t)));
      const double tol =
          std::ldexp(std::abs(pr) + step_size * (std::abs(mr) + m_terms) / denom, -20);
      ASSERT_NEAR(p[i], pr, tol) << "i=" << i << " t=" << t;
    }
  }
}

// Free-running: the reference keeps its own state, rounded to bf16 like the kernel's. Where
// fp32 and fp64 round a moment to different bf16 neighbours the two runs stay at most one bf16
// ulp (<= 2u relative) apart: the next pre-rounding difference is beta * ulp < ulp. Hence r
// differs by at most 2u (m) + u (sqrt v) relative, and the weights by sum_t lr_t |r_t| 4u.
// Gradients keep a fixed sign per element so m never crosses zero and "relative" is meaningful.
TEST(AdamWKernel, ManyStepsTrackFp64ReferenceWithBf16Moments) {
  const int n = 1024, steps = 300;
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uni(0.0f, 1.0f);
  std::vector<float> p(n), g(n), c(n), w(n);
  std::vector<uint16_t> m(n, 0), v(n, 0), mref(n, 0), vref(n, 0);
  std::vector<double> pref(n), tol(n, 0.0);
  for (int i = 0; i < n; ++i) {
    p[i] = normal(rng);
    pref[i] = p[i];
    c[i] = (uni(rng) < 0.5f ? -1.0f : 1.0f) * std::pow(10.0f, -2.0f + 3.0f * uni(rng));
    w[i] = 0.05f + 0.5f * uni(rng);
  }
  for (int64_t t = 1; t <= steps; ++t) {
    for (int i = 0; i < n; ++i) g[i] = c[i] * (1.0f + 0.5f * std::sin(w[i] * t));
    const float lr = 1e-2f * (1.0f - 0.5f * t / steps);  // no warm-up: early steps count
    const Hyper h = hyper_at(t, lr, 1.0f);
    adamw_step(p.data(), g.data(), m.data(), v.data(), n, scalars(h));
    for (int i = 0; i < n; ++i) {
      double mr = bf16_to_float(mref[i]), vr = bf16_to_float(vref[i]), r;
      pref[i] = ref_step(pref[i], g[i], mr, vr, h, &r);
      mref[i] = float_to_bf16(static_cast<float>(mr));
      vref[i] = float_to_bf16(static_cast<float>(vr));
      tol[i] = tol[i] * (1.0 - h.lr * h.wd) + h.lr * std::abs(r) * 4.0 * kU +
               std::ldexp(std::abs(pref[i]) + h.lr * std::abs(r), -20);
    }
  }
  int same_m = 0;
  for (int i = 0; i < n; ++i) {
    EXPECT_NEAR(p[i], pref[i], tol[i]) << "i=" << i;
    same_m += m[i] == mref[i];
  }
  EXPECT_GE(same_m, n * 95 / 100);  // the rounding model is right: nearly all bits agree
}

TEST(AdamWKernel, ScalarsAreTheDocumentedFp32Constants) {
  AdamWHyper h;
  h.lr = 3e-4f;
  h.weight_decay = 0.1f;
  h.step = 3;
  const AdamWScalars s = adamw_scalars(h);
  const double b1 = 0.9f, b2 = 0.95f;
  EXPECT_EQ(s.one_minus_beta1, static_cast<float>(1.0 - b1));
  EXPECT_EQ(s.decay, static_cast<float>(1.0 - double(3e-4f) * double(0.1f)));
  EXPECT_EQ(s.step_size, static_cast<float>(double(3e-4f) / (1.0 - b1 * b1 * b1)));
  EXPECT_EQ(s.sqrt_bc2, static_cast<float>(std::sqrt(1.0 - b2 * b2 * b2)));
}

TEST(AdamWKernel, SumOfSquaresIsFp64) {
  std::vector<float> g = {3.0f, 4.0f, 1e20f, -1e-20f};
  EXPECT_EQ(sum_squares_f64(g.data(), 2), 25.0);
  // 1e40 overflows fp32 but not fp64.
  EXPECT_DOUBLE_EQ(sum_squares_f64(g.data(), 4), 25.0 + double(1e20f) * double(1e20f));
}

}  // namespace
}  // namespace fp8pipe::kernels
