// Tests of the CPU quantizer (FP8.md §2.1–2.3): scale math against a frexp-based formula, the
// documented scale layouts, error bounds derived from the formats, partial tiles, the transposed
// and bf16 variants, the NaN/Inf policy, and exactness of dequantize and the 128x128 transpose.
#include "kernels/cpu/quantize.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <vector>

namespace fp8pipe::kernels {
namespace {

using G = Granularity;
constexpr G kAllG[] = {G::k1x128, G::k128x1, G::k128x128, G::kPerTensor};
constexpr Fp8Format kFmts[] = {Fp8Format::kE4M3, Fp8Format::kE5M2};
constexpr float kNaNf = std::numeric_limits<float>::quiet_NaN();
constexpr float kInff = std::numeric_limits<float>::infinity();

struct Shape {
  int64_t r, c;
};
constexpr Shape kShapes[] = {{1, 1}, {3, 5}, {128, 128}, {129, 257}, {200, 300}, {256, 384}};

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
bool same(float a, float b) { return (std::isnan(a) && std::isnan(b)) || bits_of(a) == bits_of(b); }

// The layouts documented in quantize.h, written out independently of the implementation.
int64_t slot(G g, int64_t rows, int64_t cols, int64_t r, int64_t c) {
  const int64_t kb_pad = (cols + 127) / 128 + 3 - ((cols + 127) / 128 + 3) % 4;
  switch (g) {
    case G::k1x128:
      return (c / 128) * rows + r;
    case G::k128x1:
      return (r / 128) * cols + c;
    case G::k128x128:
      return (r / 128) * kb_pad + c / 128;
    case G::kPerTensor:
      return 0;
  }
  return -1;
}
bool is_padding(G g, int64_t cols, int64_t idx) {
  const int64_t kb = (cols + 127) / 128;
  return g == G::k128x128 && idx % pad4(kb) >= kb;
}

// Reference scale (FP8.md §2.2) via frexp: t = m 2^e, m in [0.5, 1); ceil to a power of two.
void ref_scale(float amax, QuantParams p, float* sf, float* inv) {
  if (!std::isfinite(amax)) {
    *sf = *inv = kNaNf;
    return;
  }
  const float t = std::max(amax, 1e-4f) / (p.fmt == Fp8Format::kE4M3 ? 448.0f : 57344.0f);
  int e;
  const float m = std::frexp(t, &e);
  *sf = !p.pow2 ? t : (m == 0.5f ? t : std::ldexp(1.0f, e));
  *inv = 1.0f / *sf;
}

// Group amax per scale slot with the NaN policy (NaN/Inf anywhere -> NaN).
std::vector<float> group_amax(const std::vector<float>& x, int64_t rows, int64_t cols, G g) {
  std::vector<float> a(static_cast<size_t>(scale_count(g, rows, cols)), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      float& m = a[slot(g, rows, cols, r, c)];
      const float v = x[r * cols + c];
      m = (std::isnan(m) || !std::isfinite(v)) ? kNaNf : std::max(m, std::fabs(v));
    }
  }
  return a;
}

struct Quant {
  std::vector<uint8_t> q;
  std::vector<float> s;
  int64_t bad = 0;
};
Quant run(const std::vector<float>& x, int64_t rows, int64_t cols, G g, QuantParams p) {
  Quant out{std::vector<uint8_t>(x.size()),
            std::vector<float>(static_cast<size_t>(scale_count(g, rows, cols)), -1.0f), 0};
  out.bad = quantize(x.data(), rows, cols, g, p, out.q.data(), out.s.data());
  return out;
}
// Element-by-element reference: ref_scale per group, one multiply, the codec with SATFINITE.
Quant naive(const std::vector<float>& x, int64_t rows, int64_t cols, G g, QuantParams p) {
  const std::vector<float> amax = group_amax(x, rows, cols, g);
  Quant out{std::vector<uint8_t>(x.size()), std::vector<float>(amax.size()), 0};
  std::vector<float> inv(amax.size());
  for (size_t i = 0; i < amax.size(); ++i) {
    ref_scale(amax[i], p, &out.s[i], &inv[i]);
    out.bad += std::isnan(amax[i]) && !is_padding(g, cols, static_cast<int64_t>(i)) ? 1 : 0;
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float y = x[r * cols + c] * inv[slot(g, rows, cols, r, c)];
      out.q[r * cols + c] = float_to_fp8(y, p.fmt, true);
    }
  }
  return out;
}

void expect_same_quant(const Quant& a, const Quant& b, G g, int64_t cols, const char* what) {
  ASSERT_EQ(a.q.size(), b.q.size());
  int64_t bad_q = 0, bad_s = 0;
  for (size_t i = 0; i < a.q.size(); ++i) bad_q += a.q[i] != b.q[i];
  for (size_t i = 0; i < a.s.size(); ++i) {
    bad_s += !is_padding(g, cols, static_cast<int64_t>(i)) && !same(a.s[i], b.s[i]);
  }
  EXPECT_EQ(bad_q, 0) << what;
  EXPECT_EQ(bad_s, 0) << what;
  EXPECT_EQ(a.bad, b.bad) << what;
}

// Log-uniform magnitudes over [2^lo, 2^hi), random signs, ~2% exact zeros.
std::vector<float> random_matrix(int64_t rows, int64_t cols, uint32_t seed, double lo, double hi) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> ex(lo, hi);
  std::uniform_int_distribution<int> coin(0, 99);
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (float& v : x) {
    const int k = coin(rng);
    v = k < 2 ? 0.0f : static_cast<float>(std::exp2(ex(rng))) * (k % 2 ? -1.0f : 1.0f);
  }
  return x;
}

template <class T>
std::vector<T> transpose(const std::vector<T>& x, int64_t rows, int64_t cols) {
  std::vector<T> t(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = x[r * cols + c];
  }
  return t;
}

TEST(Quantize, ScaleCount) {
  EXPECT_EQ(scale_count(G::k1x128, 200, 300), 3 * 200);
  EXPECT_EQ(scale_count(G::k128x1, 200, 300), 2 * 300);
  EXPECT_EQ(scale_count(G::k128x128, 200, 300), 2 * 4);
  EXPECT_EQ(scale_count(G::k128x128, 130, 5 * 128), 2 * 8);
  EXPECT_EQ(scale_count(G::k128x128, 1, 4 * 128), 4);
  EXPECT_EQ(scale_count(G::kPerTensor, 200, 300), 1);
}

TEST(Quantize, EmptyTensors) {
  for (G g : kAllG) {
    float s[1] = {-1.0f};
    uint8_t q[1] = {0};
    const float x[1] = {0.0f};
    EXPECT_EQ(quantize(x, 0, 5, g, {}, q, s), 0);
    EXPECT_EQ(quantize(x, 5, 0, g, {}, q, s), 0);
    if (g == G::kPerTensor) {
      EXPECT_EQ(s[0], 0x1p-22f);  // amax 0 -> the 1e-4 floor
    }
  }
}

TEST(Quantize, ComputeScaleMatchesFormula) {
  const float flt_max = std::numeric_limits<float>::max();
  const float tiny = std::numeric_limits<float>::denorm_min();
  std::vector<float> amaxes = {0.0f, tiny,   1e-30f,   1e-4f,   std::nextafter(1e-4f, 1.0f),
                               1.0f, 448.0f, 57344.0f, 3.0e38f, flt_max};
  for (int k = -40; k <= 100; ++k) {
    const float b = std::ldexp(448.0f, k);
    amaxes.insert(amaxes.end(), {b, std::nextafter(b, 0.0f), std::nextafter(b, kInff)});
  }
  std::mt19937 rng(1);
  std::uniform_real_distribution<double> ex(-140, 127);
  for (int i = 0; i < 20000; ++i) amaxes.push_back(static_cast<float>(std::exp2(ex(rng))));
  for (Fp8Format fmt : kFmts) {
    const double fmax = fmt == Fp8Format::kE4M3 ? 448.0 : 57344.0;
    for (bool pow2 : {true, false}) {
      for (float amax : amaxes) {
        float sf, inv, rsf, rinv;
        compute_scale(amax, {fmt, pow2}, &sf, &inv);
        ref_scale(amax, {fmt, pow2}, &rsf, &rinv);
        ASSERT_EQ(bits_of(sf), bits_of(rsf)) << amax << " pow2 " << pow2;
        ASSERT_EQ(bits_of(inv), bits_of(rinv)) << amax << " pow2 " << pow2;
        const double a = std::max(amax, 1e-4f);
        if (!pow2) continue;
        int e;
        ASSERT_EQ(std::frexp(sf, &e), 0.5f) << amax;  // a power of two
        EXPECT_EQ(static_cast<double>(sf) * inv, 1.0) << amax;
        EXPECT_GE(sf * fmax, a) << amax;
        EXPECT_LT(sf * fmax, 2 * a * (1 + 0x1p-23)) << amax;  // the smallest such power
      }
    }
    for (float amax : {kNaNf, kInff, -kInff}) {
      float sf = 0, inv = 0;
      compute_scale(amax, {fmt, true}, &sf, &inv);
      EXPECT_TRUE(std::isnan(sf) && std::isnan(inv));
    }
  }
}

TEST(Quantize, AmaxNaNPolicy) {
  std::vector<float> x = {1.0f, -3.5f, 2.0f, -0.0f, 0.25f, 7.0f};
  EXPECT_EQ(amax_f32(x.data(), 6), 7.0f);
  EXPECT_EQ(amax_f32(x.data(), 3, 2), 2.0f);      // 1, 2, 0.25
  EXPECT_EQ(amax_f32(x.data() + 1, 2, 2), 3.5f);  // -3.5, -0
  EXPECT_EQ(amax_f32(x.data(), 0), 0.0f);
  for (float bad : {kNaNf, -kNaNf, kInff, -kInff}) {
    for (size_t at : {size_t{0}, size_t{3}, size_t{5}}) {
      std::vector<float> y = x;
      y[at] = bad;
      EXPECT_TRUE(std::isnan(amax_f32(y.data(), 6))) << at;
    }
  }
  std::vector<float> big(1000, 1.0f);
  big[999] = -1e30f;
  EXPECT_EQ(amax_f32(big.data(), 1000), 1e30f);
}

// Bitwise against the element-by-element reference, all shapes (partial tiles included).
TEST(Quantize, MatchesNaiveReference) {
  uint32_t seed = 10;
  for (Shape sh : kShapes) {
    const auto x = random_matrix(sh.r, sh.c, ++seed, -40, 20);
    for (G g : kAllG) {
      for (Fp8Format fmt : kFmts) {
        for (bool pow2 : {true, false}) {
          const QuantParams p{fmt, pow2};
          expect_same_quant(run(x, sh.r, sh.c, g, p), naive(x, sh.r, sh.c, g, p), g, sh.c,
                            "shape/granularity/format mismatch");
        }
      }
    }
  }
}

// |x - dq| <= max(2^-(man+1) |x|, sf 2^(emin-man-1)): half an ulp relative in the normal range,
// half the subnormal quantum absolute below it. Exact dequantization in pow2 mode; FP32 mode adds
// three FP32 roundings (inv, x*inv, q*sf).
void check_bounds(const std::vector<float>& x, int64_t rows, int64_t cols, G g, QuantParams p) {
  const Quant qt = run(x, rows, cols, g, p);
  std::vector<float> dq(x.size());
  dequantize(qt.q.data(), qt.s.data(), rows, cols, g, p.fmt, dq.data());
  const bool e4 = p.fmt == Fp8Format::kE4M3;
  const double fmax = e4 ? 448 : 57344, rel = e4 ? 0x1p-4 : 0x1p-3, sub = e4 ? 0x1p-10 : 0x1p-17;
  const std::vector<float> amax = group_amax(x, rows, cols, g);
  for (size_t i = 0; i < amax.size(); ++i) {
    if (is_padding(g, cols, static_cast<int64_t>(i))) continue;
    const double sf = qt.s[i], a = std::max(amax[i], 1e-4f);
    int e;
    if (p.pow2) {
      ASSERT_EQ(std::frexp(qt.s[i], &e), 0.5f) << "scale not a power of two";
    }
    ASSERT_GE(sf * fmax, a * (p.pow2 ? 1 : 1 - 0x1p-23)) << "scale below amax/fmax";
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const size_t i = static_cast<size_t>(r * cols + c), k = slot(g, rows, cols, r, c);
      const double xv = x[i], sf = qt.s[k], err = std::fabs(xv - dq[i]);
      double bound = std::max(rel * std::fabs(xv), sf * sub);
      if (!p.pow2) bound = bound * (1 + 0x1p-20) + 0x1p-20 * std::fabs(xv);
      ASSERT_LE(err, bound) << "x=" << xv << " dq=" << dq[i] << " sf=" << sf;
      const double d = std::fabs(fp8_to_float(qt.q[i], p.fmt));
      ASSERT_LE(d, fmax);
      if (std::fabs(xv) == amax[k] && p.pow2 && amax[k] >= 1e-4f) {
        ASSERT_GE(d, fmax / 2) << "amax element does not use the top binade";
      }
    }
  }
}

TEST(Quantize, ErrorBoundsAllModes) {
  for (auto [lo, hi] : {std::pair{-40.0, 20.0}, std::pair{-3.0, 3.0}}) {
    const auto x = random_matrix(200, 300, 77, lo, hi);
    for (G g : kAllG) {
      for (Fp8Format fmt : kFmts) {
        for (bool pow2 : {true, false}) check_bounds(x, 200, 300, g, {fmt, pow2});
      }
    }
  }
}

// A single large value in a zero tensor lifts exactly the documented scale slot.
TEST(Quantize, LayoutOfPlantedValue) {
  const float floor_sf = 0x1p-22f, big_sf = 4.0f;  // ceil_pow2(1e-4/448), ceil_pow2(1000/448)
  for (Shape sh : {Shape{200, 300}, Shape{130, 5 * 128 + 1}}) {
    for (auto [pr, pc] :
         {std::pair<int64_t, int64_t>{0, 0}, {5, 200}, {129, 299}, {sh.r - 1, 130}}) {
      std::vector<float> x(static_cast<size_t>(sh.r * sh.c), 0.0f);
      x[pr * sh.c + pc] = 1000.0f;
      for (G g : kAllG) {
        const Quant qt = run(x, sh.r, sh.c, g, {});
        const int64_t want = slot(g, sh.r, sh.c, pr, pc);
        for (int64_t i = 0; i < static_cast<int64_t>(qt.s.size()); ++i) {
          if (is_padding(g, sh.c, i)) continue;
          EXPECT_EQ(qt.s[i], i == want ? big_sf : floor_sf) << "slot " << i << " want " << want;
        }
        EXPECT_EQ(fp8_to_float(qt.q[pr * sh.c + pc], Fp8Format::kE4M3) * big_sf, 1024.0f);
      }
      std::vector<uint8_t> qt(x.size());
      std::vector<float> st(static_cast<size_t>(scale_count(G::k128x1, sh.r, sh.c)));
      quantize_128x1_transposed(x.data(), sh.r, sh.c, {}, qt.data(), st.data());
      EXPECT_EQ(st[(pr / 128) * sh.c + pc], big_sf);
      EXPECT_EQ(qt[pc * sh.r + pr], 0x78);  // 256 = 2^8: exponent field 15, mantissa 0
    }
  }
}

TEST(Quantize, Transposed128x1EqualsExplicitTranspose) {
  for (Shape sh : kShapes) {
    const auto x = random_matrix(sh.r, sh.c, 5, -30, 10);
    const auto xt = transpose(x, sh.r, sh.c);
    for (Fp8Format fmt : kFmts) {
      for (bool pow2 : {true, false}) {
        const QuantParams p{fmt, pow2};
        Quant got{std::vector<uint8_t>(x.size()),
                  std::vector<float>(static_cast<size_t>(scale_count(G::k128x1, sh.r, sh.c))), 0};
        got.bad = quantize_128x1_transposed(x.data(), sh.r, sh.c, p, got.q.data(), got.s.data());
        expect_same_quant(got, run(xt, sh.c, sh.r, G::k1x128, p), G::k1x128, sh.r, "vs X^T 1x128");
        const Quant plain = run(x, sh.r, sh.c, G::k128x1, p);
        EXPECT_EQ(transpose(plain.q, sh.r, sh.c), got.q) << "vs 128x1, transposed";
        EXPECT_EQ(got.s, plain.s);
      }
    }
  }
}

TEST(Quantize, Transpose128x128IsExact) {
  for (Shape sh : {Shape{200, 300}, Shape{130, 641}, Shape{128, 128}, Shape{1, 7}}) {
    const auto x = random_matrix(sh.r, sh.c, 9, -20, 20);
    const Quant a = run(x, sh.r, sh.c, G::k128x128, {});
    std::vector<uint8_t> qt(x.size());
    std::vector<float> st(static_cast<size_t>(scale_count(G::k128x128, sh.c, sh.r)), -1.0f);
    transpose_128x128(a.q.data(), a.s.data(), sh.r, sh.c, qt.data(), st.data());
    for (int64_t r = 0; r < sh.r; ++r) {
      for (int64_t c = 0; c < sh.c; ++c) {
        ASSERT_EQ(qt[c * sh.r + r], a.q[r * sh.c + c]);
        ASSERT_EQ(st[slot(G::k128x128, sh.c, sh.r, c, r)],
                  a.s[slot(G::k128x128, sh.r, sh.c, r, c)]);
      }
    }
    std::vector<float> d(x.size()), dt(x.size());
    dequantize(a.q.data(), a.s.data(), sh.r, sh.c, G::k128x128, Fp8Format::kE4M3, d.data());
    dequantize(qt.data(), st.data(), sh.c, sh.r, G::k128x128, Fp8Format::kE4M3, dt.data());
    const auto d_t = transpose(d, sh.r, sh.c);
    for (size_t i = 0; i < d.size(); ++i) ASSERT_EQ(bits_of(dt[i]), bits_of(d_t[i]));
  }
}

TEST(Quantize, Bf16InputEqualsFp32Input) {
  for (Shape sh : kShapes) {
    auto x = random_matrix(sh.r, sh.c, 21, -40, 20);
    std::vector<uint16_t> xb(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      xb[i] = float_to_bf16(x[i]);
      if (i % 997 == 5) xb[i] = i % 2 ? 0x7FC0 : 0xFF80;  // NaN, -Inf
      x[i] = bf16_to_float(xb[i]);
    }
    for (G g : kAllG) {
      for (Fp8Format fmt : kFmts) {
        for (bool pow2 : {true, false}) {
          const QuantParams p{fmt, pow2};
          Quant b{std::vector<uint8_t>(x.size()),
                  std::vector<float>(static_cast<size_t>(scale_count(g, sh.r, sh.c))), 0};
          b.bad = quantize_bf16(xb.data(), sh.r, sh.c, g, p, b.q.data(), b.s.data());
          expect_same_quant(b, run(x, sh.r, sh.c, g, p), g, sh.c, "bf16 vs fp32");
        }
      }
    }
  }
}

TEST(Quantize, NonFiniteGroupsAreFlagged) {
  const int64_t R = 200, C = 300;
  const std::vector<std::pair<int64_t, int64_t>> at = {{5, 7}, {150, 290}, {199, 131}, {6, 8}};
  auto x = random_matrix(R, C, 3, -10, 10);
  const float vals[] = {kNaNf, kInff, -kInff, -kNaNf};
  for (size_t j = 0; j < at.size(); ++j) x[at[j].first * C + at[j].second] = vals[j];
  for (G g : kAllG) {
    std::set<int64_t> bad;
    for (auto [r, c] : at) bad.insert(slot(g, R, C, r, c));
    const Quant qt = run(x, R, C, g, {});
    EXPECT_EQ(qt.bad, static_cast<int64_t>(bad.size()));
    std::vector<float> dq(x.size());
    dequantize(qt.q.data(), qt.s.data(), R, C, g, Fp8Format::kE4M3, dq.data());
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k = slot(g, R, C, r, c);
        const bool flagged = bad.count(k) != 0;
        ASSERT_EQ(std::isnan(qt.s[k]), flagged) << r << "," << c;
        if (flagged) {
          ASSERT_EQ(qt.q[r * C + c], 0x7F) << r << "," << c;
        }
        ASSERT_EQ(std::isnan(dq[r * C + c]), flagged) << r << "," << c;
      }
    }
  }
  std::vector<uint8_t> qt(x.size());
  std::vector<float> st(static_cast<size_t>(scale_count(G::k128x1, R, C)));
  EXPECT_EQ(quantize_128x1_transposed(x.data(), R, C, {}, qt.data(), st.data()), 4);
}

// Values q * 2^k with one +-fmax * 2^k per group are exactly representable at the scale 2^k
// the group gets, so quantize then dequantize returns them bit for bit (including -0).
TEST(Quantize, DequantizeOfRepresentableValuesIsExact) {
  const int64_t R = 200, C = 300;
  std::mt19937 rng(4);
  for (Fp8Format fmt : kFmts) {
    std::vector<uint8_t> codes;
    for (int c = 0; c < 256; ++c) {
      if (std::isfinite(fp8_to_float(static_cast<uint8_t>(c), fmt))) codes.push_back(c);
    }
    const float fmax = fp8_max(fmt);
    for (G g : kAllG) {
      std::vector<int> k(static_cast<size_t>(scale_count(g, R, C)));
      for (int& v : k) v = static_cast<int>(rng() % 41) - 20;
      std::vector<bool> planted(k.size(), false);
      std::vector<float> x(static_cast<size_t>(R * C));
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t s = slot(g, R, C, r, c);
          const float v = planted[s] ? fp8_to_float(codes[rng() % codes.size()], fmt)
                                     : (rng() % 2 ? fmax : -fmax);
          planted[s] = true;
          x[r * C + c] = std::ldexp(v, k[s]);
        }
      }
      const Quant qt = run(x, R, C, g, {fmt, true});
      std::vector<float> dq(x.size());
      dequantize(qt.q.data(), qt.s.data(), R, C, g, fmt, dq.data());
      for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(bits_of(dq[i]), bits_of(x[i])) << i;
    }
  }
}

// With a unit scale (amax = fmax), quantize is the codec itself: sweep every 61st float bit
// pattern up to fmax and every pattern within 2048 ulps of each rounding boundary, both signs.
int64_t encoder_mismatches(std::vector<float>& x, Fp8Format fmt) {
  x[0] = fp8_max(fmt);  // the chunk's amax: pow2 scale 1
  std::vector<uint8_t> q(x.size());
  float s = 0;
  quantize(x.data(), 1, static_cast<int64_t>(x.size()), G::kPerTensor, {fmt, true}, q.data(), &s);
  int64_t bad = s == 1.0f ? 0 : 1;
  for (size_t i = 0; i < x.size(); ++i) bad += q[i] != float_to_fp8(x[i], fmt, true);
  x.clear();
  return bad;
}

TEST(Quantize, EncoderEqualsCodecOverInputRange) {
  for (Fp8Format fmt : kFmts) {
    const uint32_t top = bits_of(fp8_max(fmt));
    int64_t bad = 0;
    std::vector<float> x;
    auto add = [&](uint32_t u) {
      float v;
      std::memcpy(&v, &u, 4);
      x.push_back(v);
      x.push_back(-v);
      if (x.size() >= (1u << 20)) bad += encoder_mismatches(x, fmt);
    };
    for (uint64_t u = 0; u <= top; u += 61) add(static_cast<uint32_t>(u));
    for (int c = 0; c < 0x7F; ++c) {
      const float lo = fp8_to_float(static_cast<uint8_t>(c), fmt);
      const float hi = fp8_to_float(static_cast<uint8_t>(c + 1), fmt);
      if (!(hi <= fp8_max(fmt))) break;
      const uint32_t mid = bits_of((lo + hi) / 2);  // exact
      for (uint32_t u = mid - std::min(mid, 2048u); u <= std::min(mid + 2048, top); ++u) add(u);
    }
    if (!x.empty()) bad += encoder_mismatches(x, fmt);
    EXPECT_EQ(bad, 0);
  }
}

// ---- E5M6 1x128 (the attention-output cache)

// The scale of each 1x128 group is the smallest power of two s with s * 65024 >= max(amax, 1e-4)
// (worked out here with frexp in double), each code is the E5M6 rounding of x / s (fp8_codec.h,
// whose encoder the codec tests check against the format's definition), and the dequantized value
// lies within half an E5M6 quantum of x: 2^-7 relative for normal codes.
TEST(QuantizeE5m6, ScalesCodesAndErrorBound) {
  for (const Shape sh :
       {Shape{1, 1}, Shape{3, 5}, Shape{129, 257}, Shape{64, 256}, Shape{7, 129}}) {
    std::mt19937 rng(static_cast<uint32_t>(sh.r * 1000 + sh.c));
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_real_distribution<float> mag(-30.0f, 30.0f);
    std::vector<float> x(sh.r * sh.c);
    for (float& v : x) v = nd(rng) * std::exp2(mag(rng) / 4);  // +-2^7.5 spread within groups
    std::vector<uint8_t> q(e5m6_bytes(sh.r * sh.c) + 1, 0xEE);
    std::vector<float> sc(scale_count(G::k1x128, sh.r, sh.c)), y(x.size());
    EXPECT_EQ(quantize_e5m6(x.data(), sh.r, sh.c, q.data(), sc.data()), 0);
    EXPECT_EQ(q.back(), 0xEE) << "wrote past e5m6_bytes";
    dequantize_e5m6(q.data(), sc.data(), sh.r, sh.c, y.data());
    for (int64_t r = 0; r < sh.r; ++r) {
      for (int64_t kb = 0; kb * 128 < sh.c; ++kb) {
        double amax = 1e-4;
        for (int64_t c = kb * 128; c < std::min<int64_t>(sh.c, kb * 128 + 128); ++c) {
          amax = std::max(amax, std::fabs(static_cast<double>(x[r * sh.c + c])));
        }
        int e;
        std::frexp(amax / 65024.0, &e);  // amax/65024 in [2^(e-1), 2^e)
        double want = std::ldexp(1.0, e);
        if (std::ldexp(want, -1) * 65024.0 >= amax) want /= 2;  // an exact power of two
        const float s = sc[kb * sh.r + r];
        ASSERT_EQ(static_cast<double>(s), want) << "row " << r << " block " << kb;
        for (int64_t c = kb * 128; c < std::min<int64_t>(sh.c, kb * 128 + 128); ++c) {
          const int64_t i = r * sh.c + c;
          ASSERT_EQ(e5m6_load(q.data(), i), float_to_e5m6(x[i] / s)) << i;
          const double err = std::fabs(static_cast<double>(y[i]) - x[i]);
          EXPECT_LE(err, 0x1p-7 * std::fabs(x[i]) + std::ldexp(s, -21))
              << i;  // or half a subnormal quantum
        }
      }
    }
  }
}

// bf16 inputs give the codes of their fp32 values; a group holding NaN or Inf gets a NaN scale
// and NaN codes (counted), the others are untouched.
TEST(QuantizeE5m6, Bf16InputAndNonFiniteGroups) {
  const int64_t R = 5, C = 300;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::vector<float> x(R * C);
  std::vector<uint16_t> xb(R * C);
  for (size_t i = 0; i < x.size(); ++i) {
    xb[i] = static_cast<uint16_t>(bits_of(nd(rng)) >> 16);
    x[i] = bf16_to_float(xb[i]);
  }
  std::vector<uint8_t> qf(e5m6_bytes(R * C)), qb(e5m6_bytes(R * C));
  std::vector<float> sf(scale_count(G::k1x128, R, C)), sb(sf.size());
  EXPECT_EQ(quantize_e5m6(x.data(), R, C, qf.data(), sf.data()), 0);
  EXPECT_EQ(quantize_e5m6_bf16(xb.data(), R, C, qb.data(), sb.data()), 0);
  EXPECT_EQ(qf, qb);
  EXPECT_EQ(sf, sb);
  x[2 * C + 130] = kNaNf;   // row 2, block 1
  x[4 * C + 299] = -kInff;  // row 4, block 2 (partial)
  EXPECT_EQ(quantize_e5m6(x.data(), R, C, qf.data(), sf.data()), 2);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      const bool bad = (r == 2 && c / 128 == 1) || (r == 4 && c / 128 == 2);
      EXPECT_EQ(std::isnan(sf[(c / 128) * R + r]), bad) << r << "," << c;
      if (bad) {
        EXPECT_EQ(e5m6_load(qf.data(), r * C + c), 0x7FF) << r << "," << c;
      } else {
        EXPECT_EQ(sf[(c / 128) * R + r], sb[(c / 128) * R + r]);
        EXPECT_EQ(e5m6_load(qf.data(), r * C + c), e5m6_load(qb.data(), r * C + c));
      }
    }
  }
}

}  // namespace
}  // namespace fp8pipe::kernels
