// Tests of the CPU FP8 GEMM (kernels/cpu/fp8_gemm.h): both modes against an fp64 reference within
// bounds derived from the formats, bit-exact cases, hand-derived FP8.md §2.4 truncation cases, the
// optimized exact kernel against a composition of tc_step, and the three training GEMMs.
#include "kernels/cpu/fp8_gemm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cpu/fp8_codec.h"
#include "kernels/cpu/quantize.h"

namespace fp8pipe::kernels {
namespace {

constexpr Fp8Format kE4 = Fp8Format::kE4M3;
constexpr Fp8Format kE5 = Fp8Format::kE5M2;

uint8_t code(float v, Fp8Format f = kE4) {
  const uint8_t c = float_to_fp8(v, f);
  EXPECT_EQ(fp8_to_float(c, f), v) << "not an FP8 value";
  return c;
}

// An operand X[rows][K] owning its codes and scales (layouts of quantize.h).
struct Op {
  int64_t rows = 0, K = 0;
  Granularity gran = Granularity::k1x128;
  Fp8Format fmt = kE4;
  std::vector<uint8_t> q;
  std::vector<float> s;

  Fp8Operand view() const { return {q.data(), s.data(), gran, fmt}; }
  int64_t nkb() const { return ceil_div(K, 128); }
  float scale(int64_t r, int64_t kb) const {
    if (gran == Granularity::k1x128) return s[kb * rows + r];
    if (gran == Granularity::k128x128) return s[(r / 128) * pad4(nkb()) + kb];
    return s[0];
  }
};

// Random finite codes (a fraction of them zero) and random scales: powers of two in
// [2^-10, 2^-3] or fp32 values in [1e-3, 1e-2). 128x128 padding slots are NaN: never read.
Op random_op(int64_t rows, int64_t K, Granularity g, bool pow2, std::mt19937& rng,
             Fp8Format f = kE4) {
  Op op{rows, K, g, f, std::vector<uint8_t>(rows * K), {}};
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& c : op.q) {
    int v = byte(rng);
    while (std::isnan(fp8_to_float(static_cast<uint8_t>(v), f)) ||
           std::isinf(fp8_to_float(static_cast<uint8_t>(v), f)))
      v = byte(rng);
    c = (byte(rng) < 16) ? 0 : static_cast<uint8_t>(v);
  }
  op.s.assign(scale_count(g, rows, K), std::numeric_limits<float>::quiet_NaN());
  std::uniform_int_distribution<int> ex(-10, -3);
  std::uniform_real_distribution<float> fl(1e-3f, 1e-2f);
  const int64_t nkb = op.nkb();
  for (int64_t i = 0; i < static_cast<int64_t>(op.s.size()); ++i) {
    if (g == Granularity::k128x128 && i % pad4(nkb) >= nkb) continue;  // padding
    op.s[i] = pow2 ? std::ldexp(1.0f, ex(rng)) : fl(rng);
  }
  return op;
}

// Alignment exponent of FP8.md §2.4: exponent field - bias, subnormals at the min-normal exponent.
int exp_field(uint8_t c, Fp8Format f) {
  const int mb = f == kE4 ? 3 : 2, bias = f == kE4 ? 7 : 15;
  const int field = (c & 0x7F) >> mb;
  return (field == 0 ? 1 : field) - bias;
}

// fp64 reference of out[m][n] = sum_k decode(a)*sA * decode(b)*sB, with two error bounds:
//  fast:  terms f32(f32(qa*sa) * f32(qb*sb)) carry <= 3 roundings of 2^-24 relative; fp32
//         summation of K terms in any order (any BLAS blocking) adds <= (K-1)*2^-24*sum|terms|.
//         => |err| <= (K+3) * 2^-24 * sum|terms|  (x1.001 for second-order terms).
//  exact: per 32-step, each of the (terms + 1) addends (products and c) is truncated by < u, with
//         u = 2^(emax-13) <= 2^-13 * max(2^max_fields, |c|) and |c| <= C_prev (truncation toward
//         zero never grows magnitudes, so |c| <= sum of |products| already in the block); the
//         14-bit truncation loses < 2^-13 * |s| <= 2^-13 * C_cur. These are in product units, so
//         a block's bound E_b is scaled by |sA*sB|. Promotion: f32 of the scale product (or of
//         P_b*sA) and the fma each round by <= 2^-24 relative: <= (KB+2) * 2^-24 * sum|terms|.
//  bf16 output adds RNE to 8 significant bits: <= 2^-8 * (|ref| + bound)  (see bf16_bound).
struct Reference {
  std::vector<double> ref, fast, exact;
};

// Codes decoded once: unscaled values and 2^(alignment exponent).
struct DecodedOp {
  std::vector<double> v, field;
  explicit DecodedOp(const Op& op) : v(op.q.size()), field(op.q.size()) {
    for (size_t i = 0; i < op.q.size(); ++i) {
      v[i] = fp8_to_float(op.q[i], op.fmt);
      field[i] = std::ldexp(1.0, exp_field(op.q[i], op.fmt));
    }
  }
};

// One k-block of one output: sum of products, sum of |products|, and E_b (product units).
struct BlockRef {
  double sum = 0, abs = 0, bound = 0;
};

BlockRef block_ref(const DecodedOp& a, const DecodedOp& b, int64_t ia, int64_t ib, int64_t len) {
  BlockRef r;
  for (int64_t k0 = 0; k0 < len; k0 += 32) {
    double step_abs = 0, max_field = 0;
    const int64_t k1 = std::min(len, k0 + 32);
    for (int64_t k = k0; k < k1; ++k) {
      const double p = a.v[ia + k] * b.v[ib + k];
      if (p == 0) continue;
      r.sum += p;
      step_abs += std::fabs(p);
      max_field = std::max(max_field, a.field[ia + k] * b.field[ib + k]);
    }
    const double u = std::ldexp(std::max(max_field, r.abs), -13);
    r.bound += static_cast<double>(k1 - k0 + 1) * u + std::ldexp(r.abs + step_abs, -13);
    r.abs += step_abs;
  }
  return r;
}

Reference reference(const Op& a, const Op& b) {
  const int64_t M = a.rows, N = b.rows, K = a.K, nkb = a.nkb();
  const DecodedOp da(a), db(b);
  Reference r{std::vector<double>(M * N), std::vector<double>(M * N), std::vector<double>(M * N)};
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double ref = 0, abs = 0, eb = 0;
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const int64_t k0 = kb * 128;
        const BlockRef blk =
            block_ref(da, db, m * K + k0, n * K + k0, std::min<int64_t>(128, K - k0));
        const double ss = double{a.scale(m, kb)} * b.scale(n, kb);
        ref += ss * blk.sum;
        eb += std::fabs(ss) * blk.bound;
        abs += std::fabs(ss) * blk.abs;
      }
      r.ref[m * N + n] = ref;
      r.fast[m * N + n] = (K + 3) * std::ldexp(abs, -24) * 1.001 + 1e-38;
      r.exact[m * N + n] = eb * 1.001 + (nkb + 2) * std::ldexp(abs, -24) * 1.001 + 1e-38;
    }
  }
  return r;
}

std::vector<double> bf16_bound(const std::vector<double>& ref, std::vector<double> bound) {
  for (size_t i = 0; i < ref.size(); ++i) bound[i] += std::ldexp(std::fabs(ref[i]) + bound[i], -8);
  return bound;
}

// Runs the GEMM and returns the outputs as doubles (fp32 or bf16 widened).
std::vector<double> run(const Op& a, const Op& b, GemmMode mode, bool bf16_out) {
  const int64_t M = a.rows, N = b.rows;
  std::vector<float> f(bf16_out ? 0 : M * N);
  std::vector<uint16_t> h(bf16_out ? M * N : 0);
  EXPECT_TRUE(fp8_gemm(a.view(), b.view(), M, N, a.K, mode, bf16_out ? nullptr : f.data(),
                       bf16_out ? h.data() : nullptr));
  std::vector<double> out(M * N);
  for (int64_t i = 0; i < M * N; ++i) out[i] = bf16_out ? bf16_to_float(h[i]) : f[i];
  return out;
}

void expect_within(const std::vector<double>& out, const std::vector<double>& ref,
                   const std::vector<double>& bound, const char* what) {
  int64_t bad = 0, worst = 0;
  double worst_ratio = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double ratio = std::fabs(out[i] - ref[i]) / bound[i];
    if (!(ratio <= 1.0)) ++bad;
    if (!(ratio <= worst_ratio)) worst_ratio = ratio, worst = static_cast<int64_t>(i);
  }
  EXPECT_EQ(bad, 0) << what << ": worst |err|/bound " << worst_ratio << " at " << worst << " out "
                    << out[worst] << " ref " << ref[worst];
}

// Both modes, fp32 and bf16 outputs, within the derived bounds.
void check_both_modes(const Op& a, const Op& b) {
  const Reference r = reference(a, b);
  expect_within(run(a, b, GemmMode::kFast, false), r.ref, r.fast, "fast f32");
  expect_within(run(a, b, GemmMode::kExact, false), r.ref, r.exact, "exact f32");
  expect_within(run(a, b, GemmMode::kFast, true), r.ref, bf16_bound(r.ref, r.fast), "fast bf16");
  expect_within(run(a, b, GemmMode::kExact, true), r.ref, bf16_bound(r.ref, r.exact), "exact bf16");
}

// ---- Hand-constructed §2.4 steps. E4M3 codes: 1 = 0x38, 1.5 = 0x3C, 1.75 = 0x3E,
// 1.875 = 0x3F, 2 = 0x40, 0.25 = 0x28, 2^-6 = 0x08 (min normal), 2^-7 = 0x04 and 2^-9 = 0x01
// (subnormal: alignment exponent -6).

// A GEMM with M = N = 1 and per-tensor unit scales: out = fma(P_b, 1, 0) = P_b exactly, so hand
// cases of one block check the optimized kernel too.
float gemm_1x1(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b, Fp8Format fb = kE4) {
  const float one = 1.0f;
  const Fp8Operand oa{a.data(), &one, Granularity::kPerTensor, kE4};
  const Fp8Operand ob{b.data(), &one, Granularity::kPerTensor, fb};
  float out = -1;
  EXPECT_TRUE(
      fp8_gemm(oa, ob, 1, 1, static_cast<int64_t>(a.size()), GemmMode::kExact, &out, nullptr));
  return out;
}

struct Pairs {
  std::vector<uint8_t> a, b;
  void add(float x, float y, int times = 1, Fp8Format fb = kE4) {
    for (int i = 0; i < times; ++i) a.push_back(code(x)), b.push_back(code(y, fb));
  }
  float step(float c, Fp8Format fb = kE4) const {
    return tc_step(c, a.data(), b.data(), static_cast<int>(a.size()), kE4, fb);
  }
  float gemm(Fp8Format fb = kE4) const { return gemm_1x1(a, b, fb); }
};

TEST(Fp8GemmTcStep, ProductsBelowUVanishUnderLargeC) {
  // c = 1 (floor log2 = 0); 32 products 2^-7 * 2^-7 = 2^-14 with fields -6 + -6 = -12.
  // emax = max(-12, 0) = 0, u = 2^-13; each 2^-14 / u = 0.5 truncates to 0, so c' = 1
  // (an fp32 sum would give 1 + 2^-9).
  Pairs p;
  p.add(0x1p-7f, 0x1p-7f, 32);
  EXPECT_EQ(p.step(1.0f), 1.0f);
  // Without c the same products align to emax = -12 and are exact: 32 * 2^-14 = 2^-9.
  EXPECT_EQ(p.step(0.0f), 0x1p-9f);
  EXPECT_EQ(p.gemm(), 0x1p-9f);
}

TEST(Fp8GemmTcStep, AlignmentUsesExponentFieldsNotTrueExponent) {
  // 1.875*1.875 = 3.515625 (fields 0+0, true exponent 1), -1.875*1 (fields 0), 2^-6*2^-7 = 2^-13
  // (fields -6-6). emax = 0 from the fields, u = 2^-13: all three exact, s = 1.640625 + 2^-13,
  // floor log2 s = 0 so the 14-bit truncation keeps 2^-13: c' = 1.6407470703125.
  // A true-exponent model (emax = 1, u = 2^-12) would drop 2^-13 and give 1.640625.
  Pairs p;
  p.add(1.875f, 1.875f);
  p.add(-1.875f, 1.0f);
  p.add(0x1p-6f, 0x1p-7f);
  EXPECT_EQ(p.step(0.0f), 1.640625f + 0x1p-13f);
  EXPECT_EQ(p.gemm(), 1.640625f + 0x1p-13f);
}

TEST(Fp8GemmTcStep, SubnormalCodeAlignsAtMinNormalExponent) {
  // A E4M3, B E5M2 (1 = 0x3C, 2^-14 = 0x04). 2^-9 (E4M3 subnormal 0x01, field exponent -6) * 1
  // has fields -6 + 0 = -6 although its value is 2^-9; 2^-6 * 2^-14 = 2^-20 has fields -20.
  // emax = -6, u = 2^-19: 2^-20 / u = 0.5 -> 0, so c' = 2^-9. Using the true exponent (-9,
  // u = 2^-22) would keep it: 2^-9 + 2^-20.
  Pairs p;
  p.add(0x1p-9f, 1.0f, 1, kE5);
  p.add(0x1p-6f, 0x1p-14f, 1, kE5);
  EXPECT_EQ(p.step(0.0f, kE5), 0x1p-9f);
  EXPECT_EQ(p.gemm(kE5), 0x1p-9f);
}

TEST(Fp8GemmTcStep, SumTruncatedTo14SignificantBitsTowardZero) {
  // 1.75*1 + 0.25*1 + 3 * (2^-6*2^-7): emax = 0, u = 2^-13, every product exact; s = 2 + 3*2^-13.
  // floor log2 s = 1, so c' is a multiple of 2^-12: 2 + 1.5*2^-12 truncates to 2 + 2^-12
  // (RNE would give 2 + 2^-11; fp32 keeps 2 + 3*2^-13).
  Pairs p;
  p.add(1.75f, 1.0f);
  p.add(0.25f, 1.0f);
  p.add(0x1p-6f, 0x1p-7f, 3);
  EXPECT_EQ(p.step(0.0f), 2.0f + 0x1p-12f);
  EXPECT_EQ(p.gemm(), 2.0f + 0x1p-12f);
  // Negated A: s = -(2 + 3*2^-13) truncates toward zero to -(2 + 2^-12), not to -(2 + 2^-11).
  Pairs n;
  n.add(-1.75f, 1.0f);
  n.add(-0.25f, 1.0f);
  n.add(-0x1p-6f, 0x1p-7f, 3);
  EXPECT_EQ(n.step(0.0f), -(2.0f + 0x1p-12f));
  EXPECT_EQ(n.gemm(), -(2.0f + 0x1p-12f));
}

TEST(Fp8GemmTcStep, NegativeProductTruncatesTowardZero) {
  // -1*1 and -2^-7*2^-7 = -2^-14: emax = 0, u = 2^-13; -2^-14/u = -0.5 truncates to 0 (floor
  // would give -u), so c' = -1 exactly.
  Pairs p;
  p.add(-1.0f, 1.0f);
  p.add(-0x1p-7f, 0x1p-7f);
  EXPECT_EQ(p.step(0.0f), -1.0f);
  EXPECT_EQ(p.gemm(), -1.0f);
}

TEST(Fp8GemmTcStep, AccumulatorIsTruncatedToU) {
  // c = 1 + 2^-13 and 2*1 (fields 1+0): emax = max(1, 0) = 1, u = 2^-12; c/u = 4096.5 -> 4096,
  // so c contributes 1 and c' = 3 (an fp32 sum gives 3 + 2^-13).
  Pairs p;
  p.add(2.0f, 1.0f);
  EXPECT_EQ(p.step(1.0f + 0x1p-13f), 3.0f);
}

TEST(Fp8GemmTcStep, NanPropagates) {
  Pairs p;
  p.add(1.0f, 1.0f);
  p.a[0] = 0x7F;  // E4M3 NaN
  EXPECT_TRUE(std::isnan(p.step(0.0f)));
}

TEST(Fp8GemmExact, HandCasesThroughGemm) {
  // Step 1 leaves c = 1 (1*1, rest zero); step 2 adds 32 products of 2^-14 that vanish (u = 2^-13).
  std::vector<uint8_t> a(64, 0), b(64, 0);
  a[0] = b[0] = code(1.0f);
  for (int k = 32; k < 64; ++k) a[k] = b[k] = code(0x1p-7f);
  EXPECT_EQ(gemm_1x1(a, b), 1.0f);
  // One step (K = 16, a partial step): -(1.75 + 0.25 + 3*2^-13) -> -(2 + 2^-12), see above.
  std::vector<uint8_t> c = {code(-1.75f), code(-0.25f), code(-0x1p-6f), code(-0x1p-6f),
                            code(-0x1p-6f)};
  std::vector<uint8_t> d = {code(1.0f), code(1.0f), code(0x1p-7f), code(0x1p-7f), code(0x1p-7f)};
  c.resize(16, 0);
  d.resize(16, 0);
  EXPECT_EQ(gemm_1x1(c, d), -(2.0f + 0x1p-12f));
  // A new block starts from c = 0: block 0 = 1 (c = 1), block 1 = 32 * 2^-14 = 2^-9 exactly,
  // promoted in fp32: 1 + 2^-9 (the same products vanished when they shared a block with c = 1).
  std::vector<uint8_t> e(256, 0), f(256, 0);
  e[0] = f[0] = code(1.0f);
  for (int k = 128; k < 160; ++k) e[k] = f[k] = code(0x1p-7f);
  EXPECT_EQ(gemm_1x1(e, f), 1.0f + 0x1p-9f);
}

// ---- Exact-arithmetic GEMMs: small-integer values and power-of-two scales in [2^-2, 2^2]. Every
// product is a multiple of 2^-2 and <= 16, u <= 2^-9, each block sum <= 128*16 = 2^11 (< 2^14 in
// units of 2^-2, so 14 bits hold it), and acc is a multiple of 2^-6 below 2^17*KB (< 2^24 units
// for KB <= 7): nothing is ever truncated or rounded, and both modes equal the fp64 value.

Op small_int_op(int64_t rows, int64_t K, Granularity g, std::mt19937& rng) {
  static const float vals[] = {0, 0.5f, 1, 1.5f, 2, 3, 4, -0.5f, -1, -1.5f, -2, -3, -4};
  Op op{rows, K, g, kE4, std::vector<uint8_t>(rows * K), {}};
  std::uniform_int_distribution<int> vi(0, 12), ei(-2, 2);
  for (auto& c : op.q) c = code(vals[vi(rng)]);
  op.s.assign(scale_count(g, rows, K), std::numeric_limits<float>::quiet_NaN());
  for (int64_t i = 0; i < static_cast<int64_t>(op.s.size()); ++i) {
    if (g != Granularity::k128x128 || i % pad4(op.nkb()) < op.nkb())
      op.s[i] = std::ldexp(1.0f, ei(rng));
  }
  return op;
}

TEST(Fp8GemmExact, BitExactOnExactlyRepresentableSums) {
  using G = Granularity;
  const G pairs[][2] = {{G::k1x128, G::k128x128},
                        {G::k128x128, G::k1x128},
                        {G::k1x128, G::k1x128},
                        {G::kPerTensor, G::kPerTensor}};
  std::mt19937 rng(7);
  for (const auto& gp : pairs) {
    for (int64_t K : {16, 48, 256, 320}) {
      const Op a = small_int_op(12, K, gp[0], rng), b = small_int_op(136, K, gp[1], rng);
      const Reference r = reference(a, b);
      for (GemmMode mode : {GemmMode::kExact, GemmMode::kFast}) {
        const auto f = run(a, b, mode, false);
        const auto h = run(a, b, mode, true);
        for (size_t i = 0; i < f.size(); ++i) {
          ASSERT_EQ(f[i], r.ref[i]) << "K=" << K << " i=" << i;
          ASSERT_EQ(h[i], bf16_to_float(float_to_bf16(static_cast<float>(r.ref[i]))));
        }
      }
    }
  }
}

// ---- The optimized exact kernel against the model written with tc_step: bit for bit.

float model_out(const Op& a, const Op& b, int64_t m, int64_t n) {
  const bool vv = a.gran == Granularity::k1x128 && b.gran == Granularity::k1x128;
  float acc = 0.0f;
  for (int64_t kb = 0; kb < a.nkb(); ++kb) {
    float c = 0.0f;
    for (int64_t k = kb * 128; k < std::min(a.K, kb * 128 + 128); k += 32) {
      const int cnt = static_cast<int>(std::min<int64_t>(32, a.K - k));
      c = tc_step(c, &a.q[m * a.K + k], &b.q[n * b.K + k], cnt, a.fmt, b.fmt);
    }
    const float sa = a.scale(m, kb), sb = b.scale(n, kb);
    acc = vv ? std::fma(c * sa, sb, acc) : std::fma(c, sa * sb, acc);
  }
  return acc;
}

TEST(Fp8GemmExact, MatchesTcStepComposition) {
  using G = Granularity;
  std::mt19937 rng(11);
  struct Case {
    G ga, gb;
    Fp8Format fa, fb;
  } cases[] = {{G::k1x128, G::k128x128, kE4, kE4},
               {G::k128x128, G::k1x128, kE4, kE5},
               {G::k1x128, G::k1x128, kE5, kE4},
               {G::kPerTensor, G::kPerTensor, kE4, kE4}};
  for (const Case& cs : cases) {
    const Op a = random_op(9, 272, cs.ga, false, rng, cs.fa);
    const Op b = random_op(140, 272, cs.gb, false, rng, cs.fb);
    const auto out = run(a, b, GemmMode::kExact, false);
    for (int64_t m = 0; m < a.rows; ++m) {
      for (int64_t n = 0; n < b.rows; ++n) {
        ASSERT_EQ(static_cast<float>(out[m * b.rows + n]), model_out(a, b, m, n))
            << "m=" << m << " n=" << n << " gran " << int(cs.ga) << "x" << int(cs.gb);
      }
    }
  }
}

TEST(Fp8GemmExact, VecVecPromotionScalesPartialByOurAFirst) {
  // VEC x VEC: acc = fma(f32(P_b * s_ourA), s_ourB, acc). With fp32 scales that differs from
  // fma(P_b, f32(sA*sB), acc) and from the swapped order on some outputs; the GEMM must give
  // exactly the prescribed one.
  std::mt19937 rng(5);
  const Op a = random_op(16, 512, Granularity::k1x128, false, rng);
  const Op b = random_op(64, 512, Granularity::k1x128, false, rng);
  const auto out = run(a, b, GemmMode::kExact, false);
  int64_t differs_prod = 0, differs_swap = 0;
  for (int64_t m = 0; m < a.rows; ++m) {
    for (int64_t n = 0; n < b.rows; ++n) {
      float acc_p = 0, acc_s = 0, acc = 0;
      for (int64_t kb = 0; kb < a.nkb(); ++kb) {
        float c = 0;
        for (int64_t k = kb * 128; k < kb * 128 + 128; k += 32)
          c = tc_step(c, &a.q[m * a.K + k], &b.q[n * b.K + k], 32, kE4, kE4);
        const float sa = a.scale(m, kb), sb = b.scale(n, kb);
        acc = std::fma(c * sa, sb, acc);
        acc_p = std::fma(c, sa * sb, acc_p);
        acc_s = std::fma(c * sb, sa, acc_s);
      }
      ASSERT_EQ(static_cast<float>(out[m * b.rows + n]), acc);
      differs_prod += acc_p != acc;
      differs_swap += acc_s != acc;
    }
  }
  EXPECT_GT(differs_prod, 0);  // the test can tell the formulas apart
  EXPECT_GT(differs_swap, 0);
}

// ---- fp64 reference with derived bounds, random codes over the full FP8 range.

TEST(Fp8GemmReference, PartialTilesAllScaleModes) {
  using G = Granularity;
  const G pairs[][2] = {{G::k1x128, G::k128x128},
                        {G::k128x128, G::k1x128},
                        {G::k1x128, G::k1x128},
                        {G::kPerTensor, G::kPerTensor}};
  std::mt19937 rng(3);
  for (const auto& gp : pairs) {
    for (bool pow2 : {true, false}) {
      SCOPED_TRACE(::testing::Message() << int(gp[0]) << "x" << int(gp[1]) << " pow2 " << pow2);
      check_both_modes(random_op(200, 320, gp[0], pow2, rng),
                       random_op(136, 320, gp[1], pow2, rng));
    }
  }
}

TEST(Fp8GemmReference, MixedFormats) {
  std::mt19937 rng(4);
  const Op a = random_op(36, 208, Granularity::k1x128, true, rng, kE4);
  const Op b = random_op(40, 208, Granularity::k128x128, true, rng, kE5);
  check_both_modes(a, b);
  check_both_modes(b, a);
}

TEST(Fp8Gemm, RejectsUnsupported) {
  std::vector<uint8_t> q(128 * 128, 0x38);
  std::vector<float> s(4, 1.0f), out(128 * 128);
  std::vector<uint16_t> h(128 * 128);
  const Fp8Operand blk{q.data(), s.data(), Granularity::k128x128, kE4};
  const Fp8Operand vec{q.data(), s.data(), Granularity::kPerTensor, kE4};
  const Fp8Operand col{q.data(), s.data(), Granularity::k128x1, kE4};
  for (GemmMode mode : {GemmMode::kFast, GemmMode::kExact}) {
    EXPECT_FALSE(fp8_gemm(blk, blk, 128, 128, 128, mode, out.data(), nullptr));
    EXPECT_FALSE(fp8_gemm(vec, vec, 128, 128, 128, mode, out.data(), h.data()));
    EXPECT_FALSE(fp8_gemm(vec, vec, 128, 128, 128, mode, nullptr, nullptr));
    EXPECT_FALSE(fp8_gemm(col, vec, 128, 128, 128, mode, out.data(), nullptr));
    EXPECT_TRUE(fp8_gemm(vec, blk, 128, 128, 128, mode, out.data(), nullptr));
    EXPECT_EQ(out[0], 128.0f);
  }
}

TEST(Fp8Gemm, NanCodeAndNanScalePropagate) {
  std::mt19937 rng(9);
  Op a = random_op(8, 256, Granularity::k1x128, true, rng);
  const Op b = random_op(8, 256, Granularity::k128x128, true, rng);
  a.q[2 * 256 + 130] = 0xFF;                                 // NaN code in row 2, block 1
  a.s[0 * 8 + 5] = std::numeric_limits<float>::quiet_NaN();  // scale of row 5, block 0
  for (GemmMode mode : {GemmMode::kFast, GemmMode::kExact}) {
    const auto out = run(a, b, mode, false);
    for (int64_t m = 0; m < 8; ++m) {
      for (int64_t n = 0; n < 8; ++n) {
        EXPECT_EQ(std::isnan(out[m * 8 + n]), m == 2 || m == 5) << m << "," << n;
      }
    }
  }
}

// ---- Training GEMMs (FP8.md §2.5) built with quantize(), against the fp64 reference of the
// quantized operands; the original float product checks the operand wiring (layouts, transpose).

std::vector<float> normal(int64_t n, std::mt19937& rng, float sigma = 1.0f) {
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

Op quantized(const std::vector<float>& x, int64_t rows, int64_t cols, Granularity g, bool pow2) {
  Op op{rows,
        cols,
        g,
        kE4,
        std::vector<uint8_t>(rows * cols),
        std::vector<float>(scale_count(g, rows, cols))};
  EXPECT_EQ(quantize(x.data(), rows, cols, g, {kE4, pow2}, op.q.data(), op.s.data()), 0);
  return op;
}

// X[R][C] quantized 128x1 and written transposed: an operand X^T[C][R] with 1x128 scales.
Op quantized_t(const std::vector<float>& x, int64_t rows, int64_t cols, bool pow2) {
  Op op{cols,
        rows,
        Granularity::k1x128,
        kE4,
        std::vector<uint8_t>(rows * cols),
        std::vector<float>(scale_count(Granularity::k128x1, rows, cols))};
  EXPECT_EQ(quantize_128x1_transposed(x.data(), rows, cols, {kE4, pow2}, op.q.data(), op.s.data()),
            0);
  return op;
}

// calc_diff of DeepGEMM: 1 - 2 sum(xy) / sum(x^2 + y^2).
double calc_diff(const std::vector<double>& x, const std::vector<double>& y) {
  double xy = 0, xx = 0;
  for (size_t i = 0; i < x.size(); ++i) xy += x[i] * y[i], xx += x[i] * x[i] + y[i] * y[i];
  return 1.0 - 2.0 * xy / xx;
}

// out[i][j] = sum_k x[i*sxi + k*sxk] * y[j*syj + k*syk] in double (the unquantized product).
std::vector<double> float_gemm(const float* x, int64_t sxi, int64_t sxk, const float* y,
                               int64_t syj, int64_t syk, int64_t I, int64_t J, int64_t K) {
  std::vector<double> out(I * J, 0.0);
  for (int64_t i = 0; i < I; ++i)
    for (int64_t j = 0; j < J; ++j)
      for (int64_t k = 0; k < K; ++k)
        out[i * J + j] += double{x[i * sxi + k * sxk]} * y[j * syj + k * syk];
  return out;
}

void check_training(const Op& a, const Op& b, const std::vector<double>& hp) {
  check_both_modes(a, b);
  EXPECT_LT(calc_diff(reference(a, b).ref, hp), 2e-3);  // FP8 quantization noise only
}

TEST(Fp8GemmTraining, FpropDgradWgrad) {
  const int64_t M = 200, N = 136, K = 320;  // tokens, out features, in features
  std::mt19937 rng(21);
  const auto x = normal(M * K, rng), w = normal(N * K, rng, 0.05f), dy = normal(M * N, rng);
  for (bool pow2 : {true, false}) {
    SCOPED_TRACE(pow2 ? "pow2 scales" : "fp32 scales");
    // Fprop Y[M][N] = X . W^T: A = X (1x128), B = W (128x128).
    check_training(quantized(x, M, K, Granularity::k1x128, pow2),
                   quantized(w, N, K, Granularity::k128x128, pow2),
                   float_gemm(x.data(), K, 1, w.data(), K, 1, M, N, K));
    // Dgrad dX[M][K] = dY . W: A = dY (1x128 along N), B = W^T[K][N] (exact 128x128 transpose).
    const Op wq = quantized(w, N, K, Granularity::k128x128, pow2);
    Op wt{K,
          N,
          Granularity::k128x128,
          kE4,
          std::vector<uint8_t>(N * K),
          std::vector<float>(scale_count(Granularity::k128x128, K, N))};
    transpose_128x128(wq.q.data(), wq.s.data(), N, K, wt.q.data(), wt.s.data());
    check_training(quantized(dy, M, N, Granularity::k1x128, pow2), wt,
                   float_gemm(dy.data(), N, 1, w.data(), 1, K, M, K, N));
    // Wgrad dW[N][K] = dY^T . X: A = dY^T[N][M], B = X^T[K][M], both 128x1 quantized, transposed.
    check_training(quantized_t(dy, M, N, pow2), quantized_t(x, M, K, pow2),
                   float_gemm(dy.data(), 1, N, x.data(), 1, K, N, K, M));
  }
}

TEST(Fp8GemmTraining, RelativeErrorAtK4096InFp8MdRange) {
  // FP8.md §2.4: block-scaled, fp32 out, K = 4096: max|err|/rms ~ 6.5e-4 vs the exact FP8 product.
  const int64_t M = 64, N = 192, K = 4096;  // (M+N)*K >= 2^20: concurrent dequantization
  std::mt19937 rng(42);
  const auto x = normal(M * K, rng), w = normal(N * K, rng);
  const Op a = quantized(x, M, K, Granularity::k1x128, true);
  const Op b = quantized(w, N, K, Granularity::k128x128, true);
  const auto ref = reference(a, b).ref;
  double ss = 0;
  for (double r : ref) ss += r * r;
  const double rms = std::sqrt(ss / ref.size());
  for (GemmMode mode : {GemmMode::kExact, GemmMode::kFast}) {
    const auto out = run(a, b, mode, false);
    double max_err = 0;
    for (size_t i = 0; i < out.size(); ++i) max_err = std::max(max_err, std::fabs(out[i] - ref[i]));
    EXPECT_LT(max_err / rms, mode == GemmMode::kExact ? 2e-3 : 1e-5);
    EXPECT_LT(calc_diff(out, ref), 1e-7);
  }
}

}  // namespace
}  // namespace fp8pipe::kernels
