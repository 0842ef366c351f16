// Attention (core/model/attention.cc), MLA and MHA: fp64 reference forward, gradients vs finite
// differences, causality, FP8/BF16 vs FP32, micro-batch independence (F/B/W of different
// micro-batches interleave under pipeline schedules), recomputed MLA up-projections.
#include "core/model/attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numbers>
#include <random>

#include "tests/test_random.h"

namespace fp8pipe::model {
namespace {

using testutil::randn;

constexpr int64_t kHidden = 64, kHeads = 4, kB = 2, kT = 8, kN = kB * kT;
const char* kPrefix = "layers.0.attn";

// std 0.2 (not DSV3's 0.006) makes the scores O(1) so the softmax is far from uniform and every
// path (q_norm, kv_norm, RoPE parts, values) carries O(1) gradients.
// yarn: YaRN at sizes where this layer's 8 positions see it (theta 100, L 8: the RoPE pairs turn
// 1.27, 0.40, 0.13, 0.04 times over L; beta 1 and 0.05 put the ramp over pairs 0..3 of MLA's 8
// RoPE dims, 0..6 of MHA's 16), with cos/sin scaled (mscale 2 against mscale_all_dim 1).
config::Model small_model(bool mla, int q_lora = 32, bool yarn = false) {
  config::Model m;
  if (yarn) {
    m.set_rope_theta(100.0f);
    config::RopeScaling* y = m.mutable_rope_scaling();
    y->set_factor(4.0f);
    y->set_original_max_position(8);
    y->set_beta_fast(1.0f);
    y->set_beta_slow(0.05f);
    y->set_mscale(2.0f);
    y->set_mscale_all_dim(1.0f);
  }
  m.set_hidden(kHidden);
  m.set_heads(kHeads);
  m.set_init_std(0.2f);
  m.set_attention(mla ? config::Model::MLA : config::Model::MHA);
  config::Mla* a = m.mutable_mla();
  a->set_q_lora_rank(q_lora);
  a->set_kv_lora_rank(32);
  a->set_qk_nope_head_dim(16);
  a->set_qk_rope_head_dim(8);
  a->set_v_head_dim(16);
  return m;
}

std::vector<float> values(const Tensor& t) {
  return std::vector<float>(t.data_as<float>(), t.data_as<float>() + t.numel());
}

struct Layer {
  std::unique_ptr<Backend> be = make_cpu_backend();
  ModelCtx c;
  Attention attn;
  explicit Layer(const config::Model& m, Precision p = Precision::kFP32) {
    c.be = be.get();
    c.precision = p;
    Status s = attn.init(c, kPrefix, m, /*seed=*/11);
    EXPECT_TRUE(s.ok()) << s.to_string();
  }
  Tensor tensor(const std::vector<float>& v, int64_t cols) {
    Tensor t = be->empty({static_cast<int64_t>(v.size()) / cols, cols}, DType::kF32).value();
    std::copy(v.begin(), v.end(), t.data_as<float>());
    return t;
  }
  std::vector<float> forward(int mb, const std::vector<float>& x, int64_t T = kT) {
    auto y =
        attn.forward(c, mb, tensor(x, kHidden), static_cast<int64_t>(x.size()) / kHidden / T, T);
    EXPECT_TRUE(y.ok()) << y.status().to_string();
    return y.ok() ? values(*y) : std::vector<float>();
  }
  std::vector<float> backward(int mb, const std::vector<float>& dy, bool weights = true) {
    auto dx = attn.backward_input(c, mb, tensor(dy, kHidden));
    EXPECT_TRUE(dx.ok()) << dx.status().to_string();
    if (weights) {
      EXPECT_TRUE(attn.backward_weight(c, mb).ok());
    }
    return dx.ok() ? values(*dx) : std::vector<float>();
  }
  // L = sum r*y in double, on a scratch micro-batch (its saved state is simply overwritten).
  double loss(const std::vector<float>& x, const std::vector<float>& r) {
    std::vector<float> y = forward(/*mb=*/99, x);
    double l = 0;
    for (size_t i = 0; i < y.size(); ++i) l += static_cast<double>(r[i]) * y[i];
    return l;
  }
  std::map<std::string, std::vector<float>> grads() {
    std::map<std::string, std::vector<float>> g;
    for (Param* p : attn.params()) g[p->name] = values(p->grad);
    return g;
  }
};

double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// ||got - want||_F / ||want||_F.
double rel_frob(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num / den);
}

std::vector<std::string> expected_names(bool mla, int q_lora) {
  std::vector<std::string> s;
  if (!mla) s = {".wq.weight", ".wk.weight", ".wv.weight", ".wo.weight"};
  if (mla && q_lora > 0) s = {".wq_a.weight", ".q_norm.weight", ".wq_b.weight"};
  if (mla && q_lora == 0) s = {".wq.weight"};
  if (mla) {
    for (const char* n : {".wkv_a.weight", ".kv_norm.weight", ".wkv_b.weight", ".wo.weight"}) {
      s.push_back(n);
    }
  }
  for (std::string& n : s) n = kPrefix + n;
  return s;
}

// ---- fp64 reference forward (DeepSeek-V3 inference/model.py, MLA "naive" path) ----

using Mat = std::vector<double>;  // row-major

Mat param_of(Layer& l, const std::string& suffix) {
  for (Param* p : l.attn.params()) {
    if (p->name == kPrefix + suffix)
      return Mat(p->value.data_as<float>(), p->value.data_as<float>() + p->value.numel());
  }
  ADD_FAILURE() << "no parameter " << suffix;
  return {};
}

// x [n, in] . W^T with W [out, in].
Mat linear(const Mat& x, const Mat& w, int64_t in) {
  const int64_t n = x.size() / in, out = w.size() / in;
  Mat y(n * out, 0.0);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      for (int64_t i = 0; i < in; ++i) y[r * out + o] += x[r * in + i] * w[o * in + i];
    }
  }
  return y;
}

Mat rmsnorm(Mat x, const Mat& w, double eps) {
  const int64_t D = w.size(), n = x.size() / D;
  for (int64_t r = 0; r < n; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += x[r * D + i] * x[r * D + i];
    const double rs = 1.0 / std::sqrt(ss / D + eps);
    for (int64_t i = 0; i < D; ++i) x[r * D + i] *= rs * w[i];
  }
  return x;
}

// YaRN's m(s, c) = 0.1 c ln s + 1.
double yarn_m(double s, double c) { return 0.1 * c * std::log(s) + 1.0; }

// Frequency of RoPE pair i of d dims: theta^(-2i/d), or under YaRN written from its definition in
// turns (not kernels/cpu/rope.h's closed form): pair j turns L theta^(-2j/d) / 2π times over the
// original context L; the ramp runs from the last pair turning at least beta_fast times to the
// first turning at most beta_slow times, the share interpolated (divided by the factor) growing
// linearly between.
double ref_freq(const config::Model& m, int64_t i, int64_t d) {
  const double th = m.rope_theta(), f = std::pow(th, -2.0 * i / d);
  const config::RopeScaling& y = m.rope_scaling();
  if (!(y.factor() > 1.0f)) return f;
  auto turns = [&](int64_t j) {
    return y.original_max_position() * std::pow(th, -2.0 * j / d) / (2 * std::numbers::pi);
  };
  int64_t lo = 0, hi = 0;
  while (lo + 1 < d && turns(lo + 1) >= y.beta_fast()) ++lo;
  while (hi < d - 1 && turns(hi) > y.beta_slow()) ++hi;
  const double share =
      hi == lo ? (i > lo ? 1.0 : 0.0) : std::clamp(double(i - lo) / double(hi - lo), 0.0, 1.0);
  return f / y.factor() * share + f * (1 - share);
}

// Interleaved pairs (2i, 2i+1) rotated by pos * freq_i, as model.py's complex view; YaRN scales
// them by m(s, mscale) / m(s, mscale_all_dim).
void rope_ref(double* v, int64_t d, int64_t pos, const config::Model& m) {
  const config::RopeScaling& y = m.rope_scaling();
  const double mag = y.factor() > 1.0f
                         ? yarn_m(y.factor(), y.mscale()) / yarn_m(y.factor(), y.mscale_all_dim())
                         : 1.0;
  for (int64_t i = 0; i < d / 2; ++i) {
    const double ang = pos * ref_freq(m, i, d), a = v[2 * i], b = v[2 * i + 1];
    v[2 * i] = mag * (a * std::cos(ang) - b * std::sin(ang));
    v[2 * i + 1] = mag * (a * std::sin(ang) + b * std::cos(ang));
  }
}

// Causal softmax(t q k^T / sqrt(dk)) v per sequence and head; q, k [n, H, dk], v [n, H, dv];
// t = 1, or YaRN's m(s, mscale_all_dim)^2.
Mat attend(const config::Model& m, const Mat& q, const Mat& k, const Mat& v, int64_t H, int64_t dk,
           int64_t dv) {
  const config::RopeScaling& y = m.rope_scaling();
  const double t = y.factor() > 1.0f ? std::pow(yarn_m(y.factor(), y.mscale_all_dim()), 2) : 1.0;
  const int64_t n = q.size() / (H * dk);
  Mat o(n * H * dv, 0.0);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t first = r / kT * kT;
      std::vector<double> p;
      for (int64_t s = first; s <= r; ++s) {
        double dotqk = 0;
        for (int64_t i = 0; i < dk; ++i) dotqk += q[(r * H + h) * dk + i] * k[(s * H + h) * dk + i];
        p.push_back(t * dotqk / std::sqrt(static_cast<double>(dk)));
      }
      const double mx = *std::max_element(p.begin(), p.end());
      double z = 0;
      for (double& e : p) z += (e = std::exp(e - mx));
      for (int64_t s = first; s <= r; ++s) {
        for (int64_t i = 0; i < dv; ++i) {
          o[(r * H + h) * dv + i] += p[s - first] / z * v[(s * H + h) * dv + i];
        }
      }
    }
  }
  return o;
}

// MLA: q per head [nope | rope(rope)], k per head [k_nope | rope(shared k_pe)], v from wkv_b.
Mat reference_mla(Layer& l, const config::Model& m, const Mat& x) {
  const config::Mla& a = m.mla();
  const int64_t H = kHeads, np = a.qk_nope_head_dim(), rp = a.qk_rope_head_dim(), dk = np + rp;
  const int64_t dv = a.v_head_dim(), kvr = a.kv_lora_rank(), n = x.size() / kHidden;
  Mat qf = linear(rmsnorm(linear(x, param_of(l, ".wq_a.weight"), kHidden),
                          param_of(l, ".q_norm.weight"), m.norm_eps()),
                  param_of(l, ".wq_b.weight"), a.q_lora_rank());
  Mat kv = linear(x, param_of(l, ".wkv_a.weight"), kHidden);
  Mat ckv(n * kvr);
  for (int64_t r = 0; r < n; ++r) {
    std::copy_n(&kv[r * (kvr + rp)], kvr, &ckv[r * kvr]);
    rope_ref(&kv[r * (kvr + rp) + kvr], rp, r % kT, m);
  }
  Mat kvb = linear(rmsnorm(ckv, param_of(l, ".kv_norm.weight"), m.norm_eps()),
                   param_of(l, ".wkv_b.weight"), kvr);
  Mat k(n * H * dk), v(n * H * dv);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t h = 0; h < H; ++h) {
      rope_ref(&qf[(r * H + h) * dk + np], rp, r % kT, m);
      std::copy_n(&kvb[(r * H + h) * (np + dv)], np, &k[(r * H + h) * dk]);
      std::copy_n(&kv[r * (kvr + rp) + kvr], rp, &k[(r * H + h) * dk + np]);
      std::copy_n(&kvb[(r * H + h) * (np + dv) + np], dv, &v[(r * H + h) * dv]);
    }
  }
  return linear(attend(m, qf, k, v, H, dk, dv), param_of(l, ".wo.weight"), H * dv);
}

Mat reference_mha(Layer& l, const config::Model& m, const Mat& x) {
  const int64_t H = kHeads, d = kHidden / kHeads, n = x.size() / kHidden;
  Mat q = linear(x, param_of(l, ".wq.weight"), kHidden);
  Mat k = linear(x, param_of(l, ".wk.weight"), kHidden);
  for (int64_t r = 0; r < n * H; ++r) {
    rope_ref(&q[r * d], d, r / H % kT, m);
    rope_ref(&k[r * d], d, r / H % kT, m);
  }
  Mat o = attend(m, q, k, linear(x, param_of(l, ".wv.weight"), kHidden), H, d, d);
  return linear(o, param_of(l, ".wo.weight"), kHidden);
}

// fp32 against fp64: ~10 roundings (u = 6e-8) of O(1) values per output, measured 3e-7 of the
// output scale; bound 3e-6. A wrong layout, RoPE part or softmax scale errs by O(0.1).
void check_reference(bool mla, bool yarn = false) {
  const config::Model m = small_model(mla, 32, yarn);
  Layer l(m);
  const std::vector<float> x = randn(kN * kHidden, 14);
  const std::vector<float> y = l.forward(0, x);
  const Mat xd(x.begin(), x.end());
  const Mat ref = mla ? reference_mla(l, m, xd) : reference_mha(l, m, xd);
  double err = 0, scale = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    err = std::max(err, std::abs(y[i] - ref[i]));
    scale = std::max(scale, std::abs(ref[i]));
  }
  EXPECT_LT(err, 3e-6 * scale) << "max |y - ref| vs max |ref| = " << scale;
}

TEST(Attention, MlaMatchesFp64Reference) { check_reference(true); }
TEST(Attention, MhaMatchesFp64Reference) { check_reference(false); }
TEST(Attention, MlaWithYarnMatchesFp64Reference) { check_reference(true, true); }
TEST(Attention, MhaWithYarnMatchesFp64Reference) { check_reference(false, true); }

// ---- (a) gradients vs central finite differences ----
//
// Tolerance for fp32 (u = 6e-8). Each of the ~1e3 outputs y carries ~10 roundings through short
// GEMMs, norms and the softmax, ~1e-6 absolute on O(1) values; summed with random signs r, L has
// noise ~sqrt(1e3) * 1e-6 = 3e-5 (measured ~2e-5), so the central difference with step eps along
// a unit direction has noise ~3e-5 / eps = 1e-3 at eps = 3e-2. The truncation eps^2/6 * L''' is
// ~1.5e-4 for O(1) third derivatives (measured: errors shrink as 1/eps up to 3e-2, so rounding
// dominates). Directional derivatives are O(0.1..10); a missing or mis-transposed path errs by
// O(0.1), far above the 3e-3 + 2e-3 * |grad| bound.
constexpr double kEps = 3e-2, kAbsTol = 3e-3, kRelTol = 2e-3;

// Central difference of L along v (unit norm) applied to `theta` in place, restored after.
double central_diff(Layer& l, std::vector<float>& theta_host, float* theta,
                    const std::vector<float>& v, const std::vector<float>& x,
                    const std::vector<float>& r) {
  auto set = [&](double s) {
    for (size_t i = 0; i < v.size(); ++i) theta[i] = static_cast<float>(theta_host[i] + s * v[i]);
  };
  set(kEps);
  const double lp = l.loss(x, r);
  set(-kEps);
  const double lm = l.loss(x, r);
  std::copy(theta_host.begin(), theta_host.end(), theta);
  return (lp - lm) / (2 * kEps);
}

std::vector<float> unit_direction(size_t n, uint32_t seed) {
  std::vector<float> v = randn(n, seed);
  const double norm = std::sqrt(dot(v, v));
  for (float& e : v) e = static_cast<float>(e / norm);
  return v;
}

// Checks <grad, v> for a random unit v and three single coordinates of one tensor.
void check_tensor(Layer& l, const std::string& what, float* theta, const std::vector<float>& grad,
                  const std::vector<float>& x, const std::vector<float>& r, uint32_t seed) {
  std::vector<float> host(theta, theta + grad.size());
  std::vector<std::vector<float>> dirs = {unit_direction(grad.size(), seed)};
  std::mt19937 rng(seed);
  for (int k = 0; k < 3; ++k) {
    dirs.emplace_back(grad.size(), 0.0f);
    dirs.back()[rng() % grad.size()] = 1.0f;
  }
  for (size_t d = 0; d < dirs.size(); ++d) {
    const double fd = central_diff(l, host, theta, dirs[d], x, r);
    const double an = dot(grad, dirs[d]);
    EXPECT_NEAR(fd, an, kAbsTol + kRelTol * std::abs(an))
        << what << (d == 0 ? " random direction" : " single coordinate") << " #" << d;
  }
}

void check_gradients(bool mla, int q_lora, bool yarn = false) {
  Layer l(small_model(mla, q_lora, yarn));
  const std::vector<float> x = randn(kN * kHidden, 1), r = randn(kN * kHidden, 2);
  l.forward(0, x);
  std::vector<float> dx = l.backward(0, r);
  std::vector<std::string> names;
  for (Param* p : l.attn.params()) names.push_back(p->name);
  EXPECT_EQ(names, expected_names(mla, q_lora));

  std::vector<float> xs = x;
  check_tensor(l, "input", xs.data(), dx, xs, r, 3);
  uint32_t seed = 10;
  for (Param* p : l.attn.params()) {
    check_tensor(l, p->name, p->value.data_as<float>(), values(p->grad), x, r, seed++);
  }
}

TEST(Attention, MlaGradientsMatchFiniteDifferences) { check_gradients(true, 32); }
TEST(Attention, MlaNoQLoraGradientsMatchFiniteDifferences) { check_gradients(true, 0); }
TEST(Attention, MhaGradientsMatchFiniteDifferences) { check_gradients(false, 0); }
TEST(Attention, MlaWithYarnGradientsMatchFiniteDifferences) { check_gradients(true, 32, true); }

// ---- (b) causality ----

void check_causal(bool mla) {
  Layer l(small_model(mla));
  const std::vector<float> x = randn(kN * kHidden, 4);
  const std::vector<float> y = l.forward(0, x);
  for (int64_t t : {int64_t{0}, int64_t{3}, kT - 1}) {
    std::vector<float> x2 = x;
    for (int64_t i = 0; i < kHidden; ++i) x2[(1 * kT + t) * kHidden + i] += 0.5f;  // sequence 1
    const std::vector<float> y2 = l.forward(1, x2);
    for (int64_t row = 0; row < kN; ++row) {
      const bool may_change = row >= kT + t;  // sequence 1, position >= t
      bool changed = false;
      for (int64_t i = 0; i < kHidden; ++i) {
        changed |= y[row * kHidden + i] != y2[row * kHidden + i];
      }
      if (!may_change) {
        EXPECT_FALSE(changed) << "t=" << t << " row " << row;
      }
      if (row == kT + t) {
        EXPECT_TRUE(changed) << "t=" << t << " row " << row;
      }
    }
  }
}

TEST(Attention, MlaIsCausal) { check_causal(true); }
TEST(Attention, MhaIsCausal) { check_causal(false); }

// ---- (c, e) FP8 and BF16 vs FP32 ----

struct Run {
  std::vector<float> y, dx;
  std::map<std::string, std::vector<float>> g;
};

Run run(const config::Model& m, Precision p) {
  Layer l(m, p);
  const std::vector<float> x = randn(kN * kHidden, 5), r = randn(kN * kHidden, 6);
  Run out;
  out.y = l.forward(0, x);
  out.dx = l.backward(0, r);
  out.g = l.grads();
  return out;
}

void check_close(bool mla, Precision p, double tol_y, double tol_grad) {
  const config::Model m = small_model(mla);
  const Run ref = run(m, Precision::kFP32), got = run(m, p);
  const double ey = rel_frob(got.y, ref.y), edx = rel_frob(got.dx, ref.dx);
  EXPECT_LT(ey, tol_y) << "output";
  EXPECT_GT(ey, 0.0) << "the low-precision path must actually run";
  EXPECT_LT(edx, tol_grad) << "input gradient";
  for (const auto& [name, g] : ref.g) EXPECT_LT(rel_frob(got.g.at(name), g), tol_grad) << name;
}

// FP8 bound. FP8.md §1.1-1.2: E4M3 everywhere (3 mantissa bits), so a quantized operand has
// relative rounding error <= 2^-4, RMS ~2^-4/sqrt(3) = 0.036. One GEMM of two quantized operands:
// relative Frobenius error ~sqrt(2) * 0.036 = 0.051 (independent per-term errors, no cancellation
// at random weights; the bf16 output rounding, 2^-8, is negligible). Independent stages add in
// quadrature. Output: three FP8 GEMMs in series (wq_a -> wq_b -> core -> wo; norms and the fp32
// core do not amplify relative error): sqrt(3) * 0.051 = 0.09 (measured 0.08), bound 0.18.
// Gradients: up to ~8 quantized GEMMs feed one (wo and wq_b/wkv_b dgrad, the forward GEMMs that
// shape q, k, v, and the wgrad itself, whose X is quantized twice, 1x128 then 128x1):
// sqrt(8) * 0.051 = 0.14 (measured <= 0.15), bound 0.3. Both keep 2x headroom and still fail on
// an unscaled or mis-transposed operand (relative error O(1)).
TEST(Attention, MlaFp8CloseToFp32) { check_close(true, Precision::kFP8, 0.18, 0.3); }
TEST(Attention, MhaFp8CloseToFp32) { check_close(false, Precision::kFP8, 0.18, 0.3); }

// BF16 (7 stored mantissa bits, u = 2^-8, RMS ~2^-8/sqrt(3) = 2.3e-3 per rounding); a BF16 GEMM
// rounds both operands and its output: sqrt(3) * 2.3e-3 = 4e-3 per GEMM. The same stage counts
// give sqrt(3) * 4e-3 = 7e-3 for the output and sqrt(8) * 4e-3 = 0.011 for gradients (measured
// <= 0.01); bound 0.03, 10x below the FP8 bound.
TEST(Attention, MlaBf16CloseToFp32) { check_close(true, Precision::kBF16, 0.03, 0.03); }
TEST(Attention, MhaBf16CloseToFp32) { check_close(false, Precision::kBF16, 0.03, 0.03); }

// ---- (d) micro-batch independence ----

void check_microbatches(bool mla, Precision p) {
  const config::Model m = small_model(mla);
  const std::vector<float> x0 = randn(kN * kHidden, 7), x1 = randn(kN * kHidden, 8);
  const std::vector<float> r0 = randn(kN * kHidden, 9), r1 = randn(kN * kHidden, 10);
  Layer seq(m, p), mix(m, p);
  const std::vector<float> y0 = seq.forward(0, x0), dx0 = seq.backward(0, r0);
  const std::vector<float> y1 = seq.forward(1, x1), dx1 = seq.backward(1, r1);
  // Interleaved: F0 F1 B1 B0 W0 W1 (deferred weight gradients, reverse order backwards).
  EXPECT_EQ(mix.forward(0, x0), y0);
  EXPECT_EQ(mix.forward(1, x1), y1);
  EXPECT_EQ(mix.backward(1, r1, /*weights=*/false), dx1);
  EXPECT_EQ(mix.backward(0, r0, /*weights=*/false), dx0);
  ASSERT_TRUE(mix.attn.backward_weight(mix.c, 0).ok());
  ASSERT_TRUE(mix.attn.backward_weight(mix.c, 1).ok());
  // Gradients sum the same two micro-batch terms; only the fp32 accumulation order may differ.
  const auto gs = seq.grads(), gm = mix.grads();
  for (const auto& [name, g] : gs) EXPECT_LT(rel_frob(gm.at(name), g), 1e-6) << name;
  EXPECT_FALSE(mix.attn.backward_input(mix.c, 0, mix.tensor(r0, kHidden)).ok())
      << "saved state of micro-batch 0 must be freed by its backward";
}

TEST(Attention, MlaMicrobatchIndependence) { check_microbatches(true, Precision::kFP32); }
TEST(Attention, MhaMicrobatchIndependence) { check_microbatches(false, Precision::kFP32); }
TEST(Attention, MlaMicrobatchIndependenceFp8) { check_microbatches(true, Precision::kFP8); }

// ---- (f) recomputed MLA up-projections (train.recompute=mla_up_proj) ----

// The schedule of check_microbatches (F0 F1 B1 B0 W0 W1: deferred weight gradients), once keeping
// q, k, v and once rebuilding them in the backward: outputs, input gradients and every weight
// gradient are bitwise equal. After both forwards the recomputing layer holds exactly the q, k
// and v of two micro-batches less, plus their rotated shared RoPE keys: per token
// 4 bytes x (2 H (nope + rope) + H v - rope).
void check_recompute(int q_lora, Precision p) {
  const config::Model m = small_model(true, q_lora);
  const std::vector<float> x0 = randn(kN * kHidden, 7), x1 = randn(kN * kHidden, 8);
  const std::vector<float> r0 = randn(kN * kHidden, 9), r1 = randn(kN * kHidden, 10);
  Layer keep(m, p), re(m, p);
  re.c.recompute_mla_up = true;
  EXPECT_EQ(re.be->memory().in_use, keep.be->memory().in_use);
  EXPECT_EQ(re.forward(0, x0), keep.forward(0, x0));
  EXPECT_EQ(re.forward(1, x1), keep.forward(1, x1));
  const auto& a = m.mla();
  const int64_t per_token = 2 * kHeads * (a.qk_nope_head_dim() + a.qk_rope_head_dim()) +
                            kHeads * a.v_head_dim() - a.qk_rope_head_dim();
  EXPECT_EQ(keep.be->memory().in_use - re.be->memory().in_use,
            2 * kN * per_token * static_cast<int64_t>(sizeof(float)));
  EXPECT_EQ(re.backward(1, r1, /*weights=*/false), keep.backward(1, r1, /*weights=*/false));
  EXPECT_EQ(re.backward(0, r0, /*weights=*/false), keep.backward(0, r0, /*weights=*/false));
  for (int mb : {0, 1}) {
    ASSERT_TRUE(keep.attn.backward_weight(keep.c, mb).ok());
    ASSERT_TRUE(re.attn.backward_weight(re.c, mb).ok());
  }
  const auto gk = keep.grads(), gr = re.grads();
  for (const auto& [name, g] : gk) EXPECT_EQ(gr.at(name), g) << name;
  EXPECT_EQ(re.be->memory().in_use, keep.be->memory().in_use) << "all saved state freed";
}

TEST(Attention, RecomputedUpProjectionsGiveTheSameBits) {
  for (Precision p : {Precision::kFP32, Precision::kBF16, Precision::kFP8}) {
    for (int q_lora : {32, 0}) {
      SCOPED_TRACE(testing::Message()
                   << "precision " << static_cast<int>(p) << " q_lora " << q_lora);
      check_recompute(q_lora, p);
    }
  }
}

// A recompute after a weight update would not rebuild the forward's q, k, v: refused.
// ---- (g) precision.attn_out_cache: the output held from F to B as bf16, E5M6 or W_o's FP8 ----

struct CacheRun {
  std::vector<float> y, dx;
  std::map<std::string, std::vector<float>> g;
  int64_t held = 0;  // bytes held between the forward and the backward
  int64_t left = 0;  // bytes held after the backward and the weight gradients
};

CacheRun run_cache(const config::Model& m, Precision p, ModelCtx::AttnOutCache cache) {
  Layer l(m, p);
  l.c.attn_out_cache = cache;
  const std::vector<float> x = randn(kN * kHidden, 5), r = randn(kN * kHidden, 6);
  const int64_t base = l.be->memory().in_use;
  CacheRun out;
  out.y = l.forward(0, x);
  out.held = l.be->memory().in_use - base;
  out.dx = l.backward(0, r);
  out.left = l.be->memory().in_use - base;
  out.g = l.grads();
  return out;
}

// The output is the same bits under every cache (W_o reads the same bf16 values either way), and
// what is held differs by exactly the cache's bytes for n = 16 tokens x 64 output columns (one
// 1x128 group per row): bf16 2 bytes an element; E5M6 1.5, packed, plus a 4-byte scale per
// group; e4m3 W_o's own 1-byte FP8 input and its scales, so nothing besides it.
// Gradients, by what reads the cache:
//  - the core's backward reads the output only in D = rowsum(dO o), which shapes dq and dk, not
//    dv: MHA's wv gradient is the same bits under every cache;
//  - W_o's weight gradient: e4m3 re-quantizes the forward's FP8 input, as the bf16 cache's
//    re-prepared input does (the same bits); E5M6 quantizes 128x1 from its own values;
//  - the rest move, by far less than the FP8 error itself (every path stays within check_close's
//    FP8 bounds against FP32), and E4M3's 2^-4 rounding moves them more than E5M6's 2^-7.
TEST(Attention, OutputCacheHoldsItsBytesAndKeepsTheGradientsClose) {
  using Cache = ModelCtx::AttnOutCache;
  const int64_t n = kN * kHeads * 16;  // output elements: H x v_head_dim per token
  for (bool mla : {true, false}) {
    SCOPED_TRACE(mla ? "MLA" : "MHA");
    const config::Model m = small_model(mla);
    const CacheRun ref = run_cache(m, Precision::kFP32, Cache::kBf16);
    const CacheRun b = run_cache(m, Precision::kFP8, Cache::kBf16);
    const CacheRun e = run_cache(m, Precision::kFP8, Cache::kE5M6);
    const CacheRun f = run_cache(m, Precision::kFP8, Cache::kE4M3);
    EXPECT_EQ(e.y, b.y);
    EXPECT_EQ(f.y, b.y);
    EXPECT_EQ(b.held - e.held, 2 * n - ((3 * n + 1) / 2 + 4 * kN));
    EXPECT_EQ(b.held - f.held, 2 * n - (n + 4 * kN));
    EXPECT_EQ(e.left, b.left);
    EXPECT_EQ(f.left, b.left);
    const double de = rel_frob(e.dx, b.dx), df = rel_frob(f.dx, b.dx);
    EXPECT_GT(de, 0.0) << "the E5M6 values must reach the backward";
    EXPECT_GT(df, de) << "E4M3's coarser rounding must show";
    for (const CacheRun* r : {&e, &f}) {
      EXPECT_LT(rel_frob(r->dx, ref.dx), 0.3);
      for (const auto& [name, g] : ref.g) EXPECT_LT(rel_frob(r->g.at(name), g), 0.3) << name;
    }
    const std::string wo = std::string(kPrefix) + ".wo.weight";
    EXPECT_EQ(f.g.at(wo), b.g.at(wo));
    EXPECT_NE(e.g.at(wo), b.g.at(wo));
    if (!mla) {
      const std::string wv = std::string(kPrefix) + ".wv.weight";
      EXPECT_EQ(e.g.at(wv), b.g.at(wv));
      EXPECT_EQ(f.g.at(wv), b.g.at(wv));
    }
  }
}

// FP32 keeps the fp32 output whatever the cache asks; BF16 ignores e4m3, which needs W_o's FP8
// input, and takes E5M6, W_o's bf16 input re-prepared from the cached values. With bf16 GEMMs
// (rounding 2^-9) no FP8 rounding amplifies the cache's own error, so the gradients move by about
// E5M6's relative rounding, 2^-7 = 0.0078 (measured <= 0.0074); bound 0.02.
TEST(Attention, OutputCacheOutsideFp8) {
  using Cache = ModelCtx::AttnOutCache;
  const config::Model m = small_model(true);
  const CacheRun f32 = run_cache(m, Precision::kFP32, Cache::kBf16);
  const CacheRun f32e = run_cache(m, Precision::kFP32, Cache::kE5M6);
  EXPECT_EQ(f32e.dx, f32.dx);
  EXPECT_EQ(f32e.g, f32.g);
  EXPECT_EQ(f32e.held, f32.held);
  const CacheRun bf = run_cache(m, Precision::kBF16, Cache::kBf16);
  const CacheRun bfe = run_cache(m, Precision::kBF16, Cache::kE5M6);
  const CacheRun bff = run_cache(m, Precision::kBF16, Cache::kE4M3);
  EXPECT_EQ(bff.dx, bf.dx);
  EXPECT_EQ(bff.held, bf.held);
  EXPECT_EQ(bfe.y, bf.y);
  const int64_t n = kN * kHeads * 16;
  EXPECT_EQ(bf.held - bfe.held, 2 * n - ((3 * n + 1) / 2 + 4 * kN));
  const double d = rel_frob(bfe.dx, bf.dx);
  EXPECT_GT(d, 0.0);
  EXPECT_LT(d, 0.02);
  for (const auto& [name, g] : bf.g) EXPECT_LT(rel_frob(bfe.g.at(name), g), 0.02) << name;
}

TEST(Attention, RecomputeRefusesAnUpdatedWeight) {
  Layer l(small_model(true), Precision::kFP8);
  l.c.recompute_mla_up = true;
  const std::vector<float> x = randn(kN * kHidden, 7);
  l.forward(0, x);
  ++l.c.weight_version;
  auto dx = l.attn.backward_input(l.c, 0, l.tensor(x, kHidden));
  ASSERT_FALSE(dx.ok());
  EXPECT_NE(dx.status().to_string().find("after a weight update"), std::string::npos)
      << dx.status().to_string();
}

TEST(Attention, LongerSequenceRuns) {
  Layer l(small_model(true));
  const std::vector<float> x = randn(kB * 16 * kHidden, 12);
  EXPECT_EQ(l.forward(0, x, /*T=*/16).size(), x.size());
  EXPECT_EQ(l.backward(0, x).size(), x.size());
}

TEST(Attention, RejectsBadInputShape) {
  Layer l(small_model(true));
  Tensor x = l.tensor(randn(kN * 32, 13), 32);
  EXPECT_FALSE(l.attn.forward(l.c, 0, x, kB, kT).ok());
}

}  // namespace
}  // namespace fp8pipe::model
