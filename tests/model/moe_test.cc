// MoE layer (core/model/moe.cc) against independent fp64 references: gradients vs central finite
// differences, node-limited biased routing with unbiased gates, capacity drops, load statistics,
// the balance loss, FP8-vs-FP32 closeness and micro-batch independence.
#include "core/model/moe.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>
#include <set>

#include "tests/test_random.h"

namespace fp8pipe::model {
namespace {

using testutil::randn;

constexpr int64_t kHidden = 32, kE = 8, kK = 2, kGroups = 4, kMaxNodes = 2, kFfn = 16;
constexpr int64_t kB = 2, kT = 8, kN = kB * kT;
constexpr float kRouteScale = 2.5f;

config::Model small_model(float alpha, float cf) {
  config::Model m;
  m.set_hidden(kHidden);
  m.set_init_std(0.2f);  // router logits ~N(0, 1.3): well separated scores, O(1) outputs
  config::Moe* moe = m.mutable_moe();
  moe->set_routed_experts(kE);
  moe->set_shared_experts(1);
  moe->set_topk(kK);
  moe->set_expert_hidden(kFfn);
  moe->set_n_groups(kGroups);
  moe->set_max_nodes(kMaxNodes);
  moe->set_route_scale(kRouteScale);
  moe->set_seq_aux_alpha(alpha);
  moe->set_capacity_factor(cf);
  return m;
}

Tensor host_tensor(Backend& be, Shape shape, const std::vector<float>& v) {
  Tensor t = be.empty(shape, DType::kF32).value();
  std::copy(v.begin(), v.end(), t.data_as<float>());
  return t;
}

std::vector<float> values(const Tensor& t) {
  return std::vector<float>(t.data_as<float>(), t.data_as<float>() + t.numel());
}

struct Layer {
  std::unique_ptr<Backend> be = make_cpu_backend();
  ModelCtx c;
  MoE moe;
  std::map<std::string, Param*> by_name;
  explicit Layer(const config::Model& m, Precision p = Precision::kFP32) {
    c.be = be.get();
    c.precision = p;
    Status s = moe.init(c, "layers.1.ffn", m, /*seed=*/7);
    EXPECT_TRUE(s.ok()) << s.to_string();
    for (Param* q : moe.params()) by_name[q->name] = q;
  }
  Param& param(const std::string& suffix) { return *by_name.at("layers.1.ffn." + suffix); }
};

// ---- fp64 reference ---------------------------------------------------------------------------

struct Ref {
  std::vector<int32_t> idx;   // [n, K] selection
  std::vector<double> gates;  // [n, K] (unbiased, normalised, x route_scale)
  std::vector<uint8_t> kept;  // [n, K] survives the capacity
  std::vector<int64_t> load;  // per expert, after drops
  int64_t dropped = 0;
  double aux = 0;
  std::vector<double> y;  // [n, hidden]
};

std::vector<double> matvec(const Param& w, const double* x) {  // W [out, in] . x
  const int64_t out = w.value.dim(0), in = w.value.dim(1);
  std::vector<double> y(out, 0.0);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) y[o] += double{w.value.data_as<float>()[o * in + i]} * x[i];
  return y;
}

std::vector<double> swiglu_ref(Layer& L, const std::string& name, const double* x) {
  std::vector<double> g = matvec(L.param(name + ".w1.weight"), x);
  std::vector<double> u = matvec(L.param(name + ".w3.weight"), x);
  for (size_t j = 0; j < g.size(); ++j) g[j] = g[j] / (1.0 + std::exp(-g[j])) * u[j];
  return matvec(L.param(name + ".w2.weight"), g.data());
}

// DeepSeek-V3 routing of one token: top max_nodes groups by the sum of their top K/max_nodes
// biased scores, then top K biased scores among them (ties to the lower index).
std::vector<int32_t> select_ref(const std::vector<double>& s, const std::vector<double>& bias) {
  std::vector<double> b(kE);
  for (int64_t e = 0; e < kE; ++e) b[e] = s[e] + bias[e];
  const int64_t per = kE / kGroups;
  std::vector<std::pair<double, int>> gs;
  for (int g = 0; g < kGroups; ++g) {
    std::vector<double> v(b.begin() + g * per, b.begin() + (g + 1) * per);
    std::sort(v.rbegin(), v.rend());
    gs.push_back({-std::accumulate(v.begin(), v.begin() + kK / kMaxNodes, 0.0), g});
  }
  std::sort(gs.begin(), gs.end());
  std::vector<std::pair<double, int>> cand;
  for (int i = 0; i < kMaxNodes; ++i)
    for (int64_t e = gs[i].second * per; e < (gs[i].second + 1) * per; ++e)
      cand.push_back({-b[e], static_cast<int>(e)});
  std::sort(cand.begin(), cand.end());
  std::vector<int32_t> idx;
  for (int k = 0; k < kK; ++k) idx.push_back(cand[k].second);
  return idx;
}

// The whole layer in fp64 (routing from fp64 logits; capacity drops in token order).
// biased_gates: the wrong rule (gates from s + bias), to show the tests can tell the difference.
Ref reference(Layer& L, const std::vector<float>& x, float alpha, float cf,
              bool biased_gates = false) {
  Ref r;
  r.load.assign(kE, 0);
  r.y.assign(kN * kHidden, 0.0);
  std::vector<double> bias(kE);
  for (int64_t e = 0; e < kE; ++e) bias[e] = L.moe.bias().value.data_as<float>()[e];
  const int64_t cap = cf > 0 ? static_cast<int64_t>(std::ceil(double{cf} * kN * kK / kE)) : kN;
  std::vector<int64_t> seen(kE, 0);
  std::vector<std::vector<double>> sn(kN);  // s / sum(s) per token
  for (int64_t t = 0; t < kN; ++t) {
    std::vector<double> xt(x.begin() + t * kHidden, x.begin() + (t + 1) * kHidden);
    std::vector<double> s = matvec(L.param("gate.weight"), xt.data());
    for (double& v : s) v = 1.0 / (1.0 + std::exp(-v));
    const std::vector<int32_t> sel = select_ref(s, bias);
    double z = 0.0, S = std::accumulate(s.begin(), s.end(), 0.0);
    std::vector<double> gs = s;
    if (biased_gates)
      for (int64_t e = 0; e < kE; ++e) gs[e] += bias[e];
    for (int32_t e : sel) z += gs[e];
    for (double v : s) sn[t].push_back(v / S);
    std::vector<double> y = swiglu_ref(L, "shared_experts", xt.data());
    for (int64_t k = 0; k < kK; ++k) {
      const int32_t e = sel[k];
      const double g = gs[e] / z * kRouteScale;
      const bool keep = seen[e]++ < cap;
      r.idx.push_back(e), r.gates.push_back(g), r.kept.push_back(keep);
      if (!keep) {
        ++r.dropped;
        continue;
      }
      ++r.load[e];
      std::vector<double> ye = swiglu_ref(L, "experts." + std::to_string(e), xt.data());
      for (int64_t j = 0; j < kHidden; ++j) y[j] += g * ye[j];
    }
    std::copy(y.begin(), y.end(), r.y.begin() + t * kHidden);
  }
  for (int64_t b = 0; b < kB; ++b) {  // L_b = alpha sum_i f_i P_i; aux = mean_b L_b
    std::vector<double> f(kE, 0.0), P(kE, 0.0);
    for (int64_t t = b * kT; t < (b + 1) * kT; ++t) {
      for (int64_t k = 0; k < kK; ++k) f[r.idx[t * kK + k]] += double{kE} / (kK * kT);
      for (int64_t e = 0; e < kE; ++e) P[e] += sn[t][e] / kT;
    }
    for (int64_t e = 0; e < kE; ++e) r.aux += alpha * f[e] * P[e] / kB;
  }
  return r;
}

double max_rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double worst = 0.0, scale = 0.0;
  for (double w : want) scale = std::max(scale, std::abs(w));
  for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::abs(got[i] - want[i]));
  return worst / scale;
}

// ---- forward/backward drivers ------------------------------------------------------------------

struct Pass {
  std::vector<float> y, dx;
};

Pass fwd_bwd(Layer& L, int mb, const Tensor& x, const Tensor& dy) {
  Pass p;
  Tensor y = L.moe.forward(L.c, mb, x, kB, kT).value();
  p.y = values(y);
  L.c.loss_scale = 1.0f;
  p.dx = values(L.moe.backward_input(L.c, mb, dy).value());
  EXPECT_TRUE(L.moe.backward_weight(L.c, mb).ok());
  return p;
}

// L = sum r*y + aux, without touching the accumulated gradients: the state saved by the forward
// is released by a backward with dy = 0 and loss_scale = 0, which adds exact zeros. `size`
// receives sum |r*y| + aux, the magnitude that sets L's fp32 rounding noise.
double objective(Layer& L, const Tensor& x, const std::vector<float>& r, double* size = nullptr) {
  constexpr int kScratch = 99;
  L.moe.reset_stats();
  Tensor y = L.moe.forward(L.c, kScratch, x, kB, kT).value();
  double loss = L.moe.stats().aux_loss, mag = loss;
  for (int64_t i = 0; i < y.numel(); ++i) {
    loss += double{r[i]} * y.data_as<float>()[i];
    mag += std::abs(double{r[i]} * y.data_as<float>()[i]);
  }
  if (size) *size = mag;
  Tensor zero = L.be->zeros({kN, kHidden}, DType::kF32).value();
  L.c.loss_scale = 0.0f;
  EXPECT_TRUE(L.moe.backward_input(L.c, kScratch, zero).ok());
  EXPECT_TRUE(L.moe.backward_weight(L.c, kScratch).ok());
  L.c.loss_scale = 1.0f;
  return loss;
}

// ---- (a) gradients ------------------------------------------------------------------------------

struct GradCase {
  float alpha, cf;
  bool main_loss;  // false: L = aux only (isolates the balance-loss gradient)
};

class MoEGradTest : public ::testing::TestWithParam<GradCase> {};

// Directional derivative of L along v on `target` (a parameter value or the input): central
// difference, with the selection checked equal at both ends by the fp64 reference (eps halves
// until it is), compared with the analytic <grad, v>.
//
// Tolerance. L is an fp32 computation (summed in double) whose rounding noise grows with
// S = sum |r y| + aux; the central difference turns two such noises into an error we measured at
// ~0.07 u S / eps (u = 2^-24; halving eps doubles it: it is noise, not bias). We allow
// 0.5 u S / eps, ~7x that, plus `rel` |an| for the O(eps^2) truncation: 1e-4 for random tensor
// directions at eps = 1e-3 (measured <= 7e-5, quartering when eps halves) and 1e-3 for single
// router coordinates at eps = 1e-2 (measured <= 1e-4). The bound scales with the case: for
// L = aux alone (S ~ 0.3) it is ~1e-7 against derivatives ~1e-3, so a wrong or missing
// balance-loss gradient fails; with the main loss (S ~ 450) it is ~1.5e-2 against derivatives
// of 1..200, and any wrong term of the gate / quotient rule is O(1) relative.
struct Probe {
  Layer& L;
  Tensor& x;
  const std::vector<float>& r;
  const Ref& base;
  GradCase gc;

  void check(Tensor& target, const std::vector<float>& v, double an, const std::string& what,
             double eps = 1e-3, double rel = 1e-4) {
    const std::vector<float> theta = values(target);
    for (int tries = 0; tries < 8; ++tries, eps /= 2) {
      double l[2], size[2];
      bool same = true;
      for (int side = 0; side < 2; ++side) {
        const double sgn = side ? -1.0 : 1.0;
        for (size_t i = 0; i < theta.size(); ++i)
          target.data_as<float>()[i] = static_cast<float>(theta[i] + sgn * eps * v[i]);
        same = same && reference(L, values(x), gc.alpha, gc.cf).idx == base.idx;
        l[side] = objective(L, x, r, &size[side]);
      }
      std::copy(theta.begin(), theta.end(), target.data_as<float>());
      if (!same) continue;
      const double fd = (l[0] - l[1]) / (2 * eps);
      const double tol =
          0.5 * std::ldexp(std::max(size[0], size[1]), -24) / eps + rel * std::abs(an);
      EXPECT_NEAR(fd, an, tol) << what << " eps " << eps;
      return;
    }
    ADD_FAILURE() << what << ": routing flips for every eps tried";
  }
};

double dot(const float* g, const std::vector<float>& v) {
  double s = 0.0;
  for (size_t i = 0; i < v.size(); ++i) s += double{g[i]} * v[i];
  return s;
}

TEST_P(MoEGradTest, MatchesCentralDifferences) {
  const GradCase gc = GetParam();
  Layer L(small_model(gc.alpha, gc.cf));
  Tensor x = host_tensor(*L.be, {kN, kHidden}, randn(kN * kHidden, 11));
  std::vector<float> r = gc.main_loss ? randn(kN * kHidden, 12) : std::vector<float>(kN * kHidden);
  const Ref base = reference(L, values(x), gc.alpha, gc.cf);
  if (gc.cf > 0) {
    EXPECT_GT(base.dropped, 0) << "the capacity case must actually drop";
  }
  const Pass p = fwd_bwd(L, 0, x, host_tensor(*L.be, {kN, kHidden}, r));
  Probe probe{L, x, r, base, gc};
  uint32_t seed = 100;
  const std::vector<float> vx = randn(kN * kHidden, seed++);
  probe.check(x, vx, dot(p.dx.data(), vx), "input");
  for (Param* q : L.moe.params()) {
    const std::vector<float> v = randn(q->value.numel(), seed++);
    probe.check(q->value, v, dot(q->grad.data_as<float>(), v), q->name);
  }
  Param& gate = L.param("gate.weight");
  for (int64_t i : {0, 37, 70, 101, 150, 203, 255}) {  // single router coordinates, all experts
    std::vector<float> v(gate.value.numel(), 0.0f);
    v[i] = 1.0f;
    probe.check(gate.value, v, gate.grad.data_as<float>()[i],
                "gate.weight[" + std::to_string(i) + "]", /*eps=*/1e-2, /*rel=*/1e-3);
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, MoEGradTest,
                         ::testing::Values(GradCase{0.3f, 0.0f, true},    // main + balance
                                           GradCase{0.3f, 0.0f, false},   // balance loss alone
                                           GradCase{0.0f, 1.0f, true}));  // with drops

// ---- (b) routing --------------------------------------------------------------------------------

TEST(MoERouting, NodeLimitedBiasSelectsButGatesStayUnbiased) {
  Layer L(small_model(0.01f, 0.0f));
  Tensor x = host_tensor(*L.be, {kN, kHidden}, randn(kN * kHidden, 21));
  const Ref plain = reference(L, values(x), 0.01f, 0.0f);
  const std::vector<float> y0 = values(L.moe.forward(L.c, 0, x, kB, kT).value());
  EXPECT_LT(max_rel_err(y0, plain.y), 1e-5);
  EXPECT_EQ(L.moe.stats().load, plain.load);
  EXPECT_NEAR(L.moe.stats().aux_loss, plain.aux, 1e-7 * plain.aux);
  for (int64_t t = 0; t < kN; ++t) {
    std::set<int> groups;
    for (int64_t k = 0; k < kK; ++k) groups.insert(plain.idx[t * kK + k] / (kE / kGroups));
    EXPECT_LE(groups.size(), static_cast<size_t>(kMaxNodes)) << "token " << t;
  }
  // A bias pulls tokens to experts 5 and 6 (different groups); gates must still be s / sum s.
  float* b = L.moe.bias().value.data_as<float>();
  b[5] = 0.4f, b[6] = 0.3f;
  L.moe.reset_stats();
  const Ref biased = reference(L, values(x), 0.01f, 0.0f);
  EXPECT_NE(biased.idx, plain.idx);
  const std::vector<float> y1 = values(L.moe.forward(L.c, 1, x, kB, kT).value());
  EXPECT_LT(max_rel_err(y1, biased.y), 1e-5);
  EXPECT_EQ(L.moe.stats().load, biased.load);
  EXPECT_GT(biased.load[5] + biased.load[6], plain.load[5] + plain.load[6]);
  // The check discriminates: gates from the biased scores would give a clearly different output.
  const Ref wrong = reference(L, values(x), 0.01f, 0.0f, /*biased_gates=*/true);
  EXPECT_GT(max_rel_err(y1, wrong.y), 1e-2);
  for (int64_t t = 0; t < kN; ++t) {
    double z = 0.0;
    for (int64_t k = 0; k < kK; ++k) z += biased.gates[t * kK + k];
    EXPECT_NEAR(z, kRouteScale, 1e-12);
  }
}

// ---- (c) capacity, (e) load statistics ----------------------------------------------------------

TEST(MoECapacity, DropsTheOverflowInTokenOrderAndCountsIt) {
  for (float cf : {1.0f, 1.5f}) {
    Layer L(small_model(0.0f, cf));
    L.moe.bias().value.data_as<float>()[0] = 0.5f;  // everyone wants expert 0: it overflows
    Tensor x = host_tensor(*L.be, {kN, kHidden}, randn(kN * kHidden, 31));
    const Ref ref = reference(L, values(x), 0.0f, cf);
    // Independent overflow: per expert, assignments beyond ceil(cf * n * K / E).
    const int64_t cap = static_cast<int64_t>(std::ceil(cf * kN * kK / double{kE}));
    std::vector<int64_t> count(kE, 0);
    for (int32_t e : ref.idx) ++count[e];
    int64_t overflow = 0;
    for (int64_t e = 0; e < kE; ++e) overflow += std::max<int64_t>(0, count[e] - cap);
    ASSERT_GT(overflow, 0) << "cf " << cf;
    const std::vector<float> y = values(L.moe.forward(L.c, 0, x, kB, kT).value());
    EXPECT_EQ(L.moe.stats().dropped, overflow) << "cf " << cf;
    EXPECT_EQ(ref.dropped, overflow);
    EXPECT_EQ(L.moe.stats().load, ref.load);
    EXPECT_LT(max_rel_err(y, ref.y), 1e-5) << "dropped assignments contribute nothing";
  }
}

TEST(MoEStats, LoadSumsToAssignmentsMinusDropsAndAccumulates) {
  Layer L(small_model(0.01f, 1.0f));
  L.moe.bias().value.data_as<float>()[3] = 0.5f;
  int64_t want_aux_n = 0;
  double want_aux = 0.0;
  for (int mb = 0; mb < 2; ++mb) {
    Tensor x = host_tensor(*L.be, {kN, kHidden}, randn(kN * kHidden, 41 + mb));
    want_aux += reference(L, values(x), 0.01f, 1.0f).aux;
    ASSERT_TRUE(L.moe.forward(L.c, mb, x, kB, kT).ok());
    ++want_aux_n;
    const MoeStepStats& st = L.moe.stats();
    const int64_t sum = std::accumulate(st.load.begin(), st.load.end(), int64_t{0});
    EXPECT_EQ(sum, want_aux_n * kN * kK - st.dropped);
    EXPECT_GT(st.dropped, 0);
    EXPECT_NEAR(st.aux_loss, want_aux, 1e-7 * want_aux);
  }
  L.moe.reset_stats();
  EXPECT_EQ(L.moe.stats().load, std::vector<int64_t>(kE, 0));
  EXPECT_EQ(L.moe.stats().dropped, 0);
  EXPECT_EQ(L.moe.stats().aux_loss, 0.0);
}

// ---- (d) FP8 vs FP32 ----------------------------------------------------------------------------

double rel_frobenius(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double{a[i]} - b[i]) * (double{a[i]} - b[i]);
    den += double{b[i]} * b[i];
  }
  return std::sqrt(num / den);
}

// E4M3 keeps 3 mantissa bits: round-to-nearest moves an operand by at most 2^-4 relative, and by
// ~2^-4/sqrt(3) = 0.036 rms for values spread over a binade. A GEMM output carries the errors of
// both operands (0.036 * sqrt(2) = 0.05 rms relative); an expert chains w1/w3 then w2, and the
// backward chains dgrad through both again, so we allow 0.15 on the output and dx (about 3
// independent 0.05 errors adding in quadrature is 0.09; the margin covers the amax-driven scales
// of 1x128 groups) and 0.25 on weight gradients, which are one more FP8 GEMM (128x1 re-quantized
// operands) deep. The router stays BF16 (2^-9 relative), so the selection must be identical.
TEST(MoEPrecision, Fp8TracksFp32WithinE4M3Bound) {
  const config::Model m = small_model(0.01f, 0.0f);
  Layer f32(m, Precision::kFP32), f8(m, Precision::kFP8);
  const std::vector<float> xv = randn(kN * kHidden, 51), rv = randn(kN * kHidden, 52);
  const Pass a = fwd_bwd(f32, 0, host_tensor(*f32.be, {kN, kHidden}, xv),
                         host_tensor(*f32.be, {kN, kHidden}, rv));
  const Pass b = fwd_bwd(f8, 0, host_tensor(*f8.be, {kN, kHidden}, xv),
                         host_tensor(*f8.be, {kN, kHidden}, rv));
  ASSERT_EQ(f8.moe.stats().load, f32.moe.stats().load) << "routing must not flip";
  EXPECT_EQ(f8.c.nonfinite_groups, 0);
  const double ey = rel_frobenius(b.y, a.y), edx = rel_frobenius(b.dx, a.dx);
  EXPECT_GT(ey, 1e-4) << "FP8 path did not run";
  EXPECT_LT(ey, 0.15);
  EXPECT_LT(edx, 0.15);
  std::vector<Param*> pa = f32.moe.params(), pb = f8.moe.params();
  for (size_t i = 0; i < pa.size(); ++i) {
    const std::vector<float> ga = values(pa[i]->grad), gb = values(pb[i]->grad);
    if (std::all_of(ga.begin(), ga.end(), [](float v) { return v == 0.0f; })) {
      EXPECT_EQ(ga, gb) << pa[i]->name << ": an expert without tokens has no gradient";
      continue;
    }
    EXPECT_LT(rel_frobenius(gb, ga), 0.25) << pa[i]->name;
  }
}

// ModelCtx::expert_row_align pads each expert's rows with zero rows (for cuBLASLt's FP8 shape
// rules on a GPU). Zero rows only add exact zeros: the output, dx and every gradient are the same
// as without padding (bitwise in FP8: 1x128 row scales ignore other rows, the 128x1 wgrad scales
// see zeros, which do not raise an amax; FP32 and BF16 within BLAS summation-order noise).
TEST(MoEPadding, ZeroRowPaddingChangesNothing) {
  const config::Model m = small_model(0.01f, 0.0f);
  for (Precision p : {Precision::kFP32, Precision::kBF16, Precision::kFP8}) {
    SCOPED_TRACE(static_cast<int>(p));
    Layer plain(m, p), padded(m, p);
    padded.c.expert_row_align = 16;
    const std::vector<float> xv = randn(kN * kHidden, 81), rv = randn(kN * kHidden, 82);
    const Pass a = fwd_bwd(plain, 0, host_tensor(*plain.be, {kN, kHidden}, xv),
                           host_tensor(*plain.be, {kN, kHidden}, rv));
    const Pass b = fwd_bwd(padded, 0, host_tensor(*padded.be, {kN, kHidden}, xv),
                           host_tensor(*padded.be, {kN, kHidden}, rv));
    // at least one expert got a token count that is not a multiple of 16: padding happened
    bool odd = false;
    for (int64_t l : plain.moe.stats().load) odd |= l % 16 != 0;
    ASSERT_TRUE(odd);
    // FP32, and BF16 (OpenBLAS's sgemm on bf16-rounded operands): OpenBLAS picks its kernel (and
    // so its summation order) by M, which padding changes, and by CPU: last-bit differences
    // (BF16 was bitwise on an AVX-512 Xeon, not on an AVX2 EPYC). FP8 (its own GEMM): bitwise.
    const double tol = p == Precision::kFP8 ? 0.0 : 1e-6;
    EXPECT_LE(rel_frobenius(b.y, a.y), tol);
    EXPECT_LE(rel_frobenius(b.dx, a.dx), tol);
    std::vector<Param*> pa = plain.moe.params(), pb = padded.moe.params();
    for (size_t i = 0; i < pa.size(); ++i) {
      const std::vector<float> ga = values(pa[i]->grad), gb = values(pb[i]->grad);
      if (tol == 0.0) {
        EXPECT_EQ(gb, ga) << pa[i]->name;
      } else if (std::any_of(ga.begin(), ga.end(), [](float v) { return v != 0.0f; })) {
        EXPECT_LE(rel_frobenius(gb, ga), tol) << pa[i]->name;
      } else {
        EXPECT_EQ(gb, ga) << pa[i]->name << ": an expert without tokens has no gradient";
      }
    }
  }
}

// Without an ep group and without a capacity factor the dispatch runs on the backend
// (Backend::sort_assignments; router_grad reads the gate gradients through the assignments'
// places); with a capacity factor that no expert reaches, the same routing takes the records'
// path (host sort, gate gradients by assignment). Same bits: output, dx, every gradient, loads
// and the balance loss, in every precision, with and without padding.
TEST(MoEDispatch, DirectEqualsRecordsBitwise) {
  for (Precision p : {Precision::kFP32, Precision::kBF16, Precision::kFP8}) {
    for (int64_t align : {1, 16}) {
      SCOPED_TRACE(static_cast<int>(p) * 100 + align);
      // capacity = ceil(cf * n * K / E) with cf = E is n * K: nothing drops
      Layer direct(small_model(0.3f, 0.0f), p), records(small_model(0.3f, float{kE}), p);
      direct.c.expert_row_align = records.c.expert_row_align = align;
      const std::vector<float> xv = randn(kN * kHidden, 91), rv = randn(kN * kHidden, 92);
      const Pass a = fwd_bwd(direct, 0, host_tensor(*direct.be, {kN, kHidden}, xv),
                             host_tensor(*direct.be, {kN, kHidden}, rv));
      const Pass b = fwd_bwd(records, 0, host_tensor(*records.be, {kN, kHidden}, xv),
                             host_tensor(*records.be, {kN, kHidden}, rv));
      EXPECT_EQ(a.y, b.y);
      EXPECT_EQ(a.dx, b.dx);
      EXPECT_EQ(direct.moe.stats().load, records.moe.stats().load);
      EXPECT_EQ(records.moe.stats().dropped, 0);
      EXPECT_GT(direct.moe.stats().aux_loss, 0.0);
      EXPECT_EQ(direct.moe.stats().aux_loss, records.moe.stats().aux_loss);
      const std::vector<Param*> pa = direct.moe.params(), pb = records.moe.params();
      ASSERT_EQ(pa.size(), pb.size());
      for (size_t i = 0; i < pa.size(); ++i)
        EXPECT_EQ(values(pa[i]->grad), values(pb[i]->grad)) << pa[i]->name;
      // the router's gradient is in the comparison and is not zero
      const std::vector<float> gr = values(direct.param("gate.weight").grad);
      EXPECT_TRUE(std::any_of(gr.begin(), gr.end(), [](float v) { return v != 0.0f; }));
    }
  }
}

// ---- (f) micro-batch independence, names
// ---------------------------------------------------------

TEST(MoEMicrobatch, InterleavedEqualsSequential) {
  const config::Model m = small_model(0.3f, 1.0f);
  Layer seq(m), inter(m);
  std::vector<Tensor> xs, dys;
  for (int mb = 0; mb < 2; ++mb) {
    xs.push_back(host_tensor(*seq.be, {kN, kHidden}, randn(kN * kHidden, 61 + mb)));
    dys.push_back(host_tensor(*seq.be, {kN, kHidden}, randn(kN * kHidden, 71 + mb)));
  }
  const Pass s0 = fwd_bwd(seq, 0, xs[0], dys[0]), s1 = fwd_bwd(seq, 1, xs[1], dys[1]);
  // F0 F1 B1 B0 W0 W1 (the W order fixes the fp32 accumulation order of the gradients).
  const std::vector<float> y0 = values(inter.moe.forward(inter.c, 0, xs[0], kB, kT).value());
  const std::vector<float> y1 = values(inter.moe.forward(inter.c, 1, xs[1], kB, kT).value());
  const std::vector<float> dx1 = values(inter.moe.backward_input(inter.c, 1, dys[1]).value());
  const std::vector<float> dx0 = values(inter.moe.backward_input(inter.c, 0, dys[0]).value());
  ASSERT_TRUE(inter.moe.backward_weight(inter.c, 0).ok());
  ASSERT_TRUE(inter.moe.backward_weight(inter.c, 1).ok());
  EXPECT_EQ(y0, s0.y);
  EXPECT_EQ(y1, s1.y);
  EXPECT_EQ(dx0, s0.dx);
  EXPECT_EQ(dx1, s1.dx);
  std::vector<Param*> pa = seq.moe.params(), pb = inter.moe.params();
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_EQ(values(pa[i]->grad), values(pb[i]->grad));
  EXPECT_EQ(seq.moe.stats().load, inter.moe.stats().load);
  EXPECT_EQ(seq.moe.stats().aux_loss, inter.moe.stats().aux_loss);
  EXPECT_FALSE(inter.moe.backward_weight(inter.c, 0).ok()) << "state was released";
}

// The trainer scales dy by its loss scale and sets ModelCtx::loss_scale to the same value; the
// balance-loss gradient must follow it. A power of two commutes with every rounding: exact.
TEST(MoEMicrobatch, LossScaleScalesTheBalanceLossGradientToo) {
  const config::Model m = small_model(0.3f, 0.0f);
  Layer one(m), eight(m);
  Tensor x = host_tensor(*one.be, {kN, kHidden}, randn(kN * kHidden, 81));
  std::vector<float> r = randn(kN * kHidden, 82), r8 = r;
  for (float& v : r8) v *= 8.0f;
  const Pass a = fwd_bwd(one, 0, x, host_tensor(*one.be, {kN, kHidden}, r));
  ASSERT_TRUE(eight.moe.forward(eight.c, 0, x, kB, kT).ok());
  eight.c.loss_scale = 8.0f;
  const std::vector<float> dx8 = values(
      eight.moe.backward_input(eight.c, 0, host_tensor(*eight.be, {kN, kHidden}, r8)).value());
  ASSERT_TRUE(eight.moe.backward_weight(eight.c, 0).ok());
  for (size_t i = 0; i < dx8.size(); ++i) ASSERT_EQ(dx8[i], 8.0f * a.dx[i]) << i;
  const std::vector<float> g1 = values(one.param("gate.weight").grad);
  const std::vector<float> g8 = values(eight.param("gate.weight").grad);
  for (size_t i = 0; i < g1.size(); ++i) ASSERT_EQ(g8[i], 8.0f * g1[i]) << i;
}

TEST(MoEParams, DeepSeekNamesAndFlags) {
  Layer L(small_model(0.0f, 0.0f));
  const std::vector<Param*> ps = L.moe.params();
  EXPECT_EQ(ps.size(), 1u + 3u + 3u * kE);
  EXPECT_EQ(ps[0]->name, "layers.1.ffn.gate.weight");
  EXPECT_EQ(ps[0]->value.shape(), (Shape{kE, kHidden}));
  EXPECT_FALSE(ps[0]->expert);
  EXPECT_EQ(L.param("shared_experts.w1.weight").value.shape(), (Shape{kFfn, kHidden}));
  EXPECT_FALSE(L.param("shared_experts.w2.weight").expert);
  EXPECT_EQ(L.param("experts.7.w2.weight").value.shape(), (Shape{kHidden, kFfn}));
  EXPECT_TRUE(L.param("experts.7.w3.weight").expert);
  Param& b = L.moe.bias();
  EXPECT_EQ(b.name, "layers.1.ffn.gate.e_score_correction_bias");
  EXPECT_FALSE(b.decay);
  EXPECT_EQ(values(b.value), std::vector<float>(kE, 0.0f));
  for (Param* p : ps) EXPECT_NE(p, &b);
  config::Model none = small_model(0.0f, 0.0f);
  none.mutable_moe()->set_shared_experts(0);
  Layer L0(none);
  EXPECT_EQ(L0.moe.params().size(), 1u + 3u * kE);
}

}  // namespace
}  // namespace fp8pipe::model
