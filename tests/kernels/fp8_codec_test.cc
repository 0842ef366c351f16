// Checks fp8_codec.h against references built here from the format definitions (FP8.md §4): a
// decoder from (-1)^s 2^(e-bias) (1 + m/2^mbits), and encoders picking the nearest decoded value in
// double arithmetic (ties to even mantissa), exhaustively over all 2^32 floats.
#include "kernels/cpu/fp8_codec.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace fp8pipe::kernels {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Fmt {
  Fp8Format id;
  int ebits, mbits, bias;
  bool fn;  // E4M3 "fn": no Inf, only S.1111.111 is NaN; otherwise IEEE-like (E5M2)
};
constexpr Fmt kE4M3{Fp8Format::kE4M3, 4, 3, 7, true};
constexpr Fmt kE5M2{Fp8Format::kE5M2, 5, 2, 15, false};
constexpr Fmt kBF16{Fp8Format::kE4M3, 8, 7, 127, false};  // id unused for BF16
constexpr Fmt kE5M6{Fp8Format::kE4M3, 5, 6, 15, false};   // id unused: float_to_e5m6

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// Reference decoder straight from the definition of the format.
double ref_decode(uint32_t code, const Fmt& f) {
  const int width = 1 + f.ebits + f.mbits;
  const double sign = (code >> (width - 1)) & 1 ? -1.0 : 1.0;
  const int e = static_cast<int>((code >> f.mbits) & ((1u << f.ebits) - 1));
  const int m = static_cast<int>(code & ((1u << f.mbits) - 1));
  const int e_all_ones = (1 << f.ebits) - 1;
  if (f.fn && e == e_all_ones && m == (1 << f.mbits) - 1) return kNaN;
  if (!f.fn && e == e_all_ones) return m == 0 ? sign * kInf : kNaN;
  if (e == 0) return sign * std::ldexp(m, 1 - f.bias - f.mbits);
  return sign * std::ldexp(1.0 + std::ldexp(m, -f.mbits), e - f.bias);
}

// Quantum (ulp) of the format at magnitude v > 0: 2^(max(floor(log2 v), emin) - mbits).
int quantum_exp(double v, const Fmt& f) { return std::max(std::ilogb(v), 1 - f.bias) - f.mbits; }

// Whether the significand of v (in units of its quantum) is even: the tie-breaking rule.
bool even_mantissa(double v, const Fmt& f) {
  if (v == 0) return true;
  return std::fmod(std::ldexp(v, -quantum_exp(v, f)), 2.0) == 0.0;
}

// Reference 1 (exhaustive sweeps): the sorted non-negative finite values of a format, plus a
// virtual value one quantum above the largest (E4M3 480, E5M2 65536, BF16 2^128) that stands
// for "overflow". mid[i] separates value i and i+1; a tie goes to the even mantissa.
struct Table {
  std::vector<double> val, mid;
  std::vector<uint32_t> code;   // code of val[i]; the last (virtual) entry has none
  std::vector<uint8_t> tie_up;  // tie at mid[i] rounds to val[i+1]
  size_t n = 0;                 // index of the overflow entry

  explicit Table(const Fmt& f) {
    const uint32_t half = 1u << (f.ebits + f.mbits);  // codes with the sign bit clear
    std::vector<std::pair<double, uint32_t>> vc;
    for (uint32_t c = 0; c < half; ++c) {
      const double v = ref_decode(c, f);
      if (std::isfinite(v)) vc.emplace_back(v, c);
    }
    std::sort(vc.begin(), vc.end());
    for (auto& [v, c] : vc) val.push_back(v), code.push_back(c);
    n = val.size();
    val.push_back(val.back() + std::ldexp(1.0, quantum_exp(val.back(), f)));
    for (size_t i = 0; i < n; ++i) {
      mid.push_back((val[i] + val[i + 1]) / 2);  // exact in double
      tie_up.push_back(even_mantissa(val[i + 1], f));
    }
    mid.push_back(kInf);  // sentinels: nothing walks past the overflow entry
    tie_up.push_back(0);
  }
  // Index of the rounding of d >= 0 (n = overflow), walking up from i (monotone sweeps).
  size_t walk(double d, size_t& i) const {
    while (d > mid[i]) ++i;
    return (d == mid[i] && tie_up[i]) ? i + 1 : i;
  }
};

struct Mismatch {
  uint64_t count[4] = {0, 0, 0, 0};
  uint32_t first[4] = {0, 0, 0, 0};
  void add(int slot, bool bad, uint32_t u) {
    if (bad && count[slot]++ == 0) first[slot] = u;
  }
  void merge(const Mismatch& o) {
    for (int j = 0; j < 4; ++j) {
      if (count[j] == 0 && o.count[j] != 0) first[j] = o.first[j];
      count[j] += o.count[j];
    }
  }
};

// Runs body(u0, u1, mismatch) over [0, 2^31) (magnitude bit patterns) split across all cores.
template <class Body>
Mismatch parallel_sweep(Body body) {
  const uint32_t nt = std::max(1u, std::thread::hardware_concurrency());
  const uint64_t total = 1ull << 31;
  std::vector<Mismatch> res(nt);
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < nt; ++t) {
    const auto u0 = static_cast<uint32_t>(total * t / nt);
    const auto u1 = static_cast<uint32_t>(total * (t + 1) / nt);
    threads.emplace_back([&body, &res, t, u0, u1] { body(u0, u1, res[t]); });
  }
  for (auto& th : threads) th.join();
  Mismatch all;
  for (auto& r : res) all.merge(r);
  return all;
}

// All 2^32 floats: slots 0..3 = +x SAT, +x NOSAT, -x SAT, -x NOSAT. The rules of FP8.md §4 once
// the rounding index k of |x| is known: a code; overflow gives the largest finite code (SAT) or
// E4M3 0x7F / E5M2 Inf 0x7C (NOSAT), sign kept; NaN gives 0x7F whatever the sign. `flatten` lets
// the codec inline with its format fixed, which halves the sweep's time.
template <Fp8Format F>
__attribute__((flatten)) void sweep_fp8_range(const Table& t, const uint32_t* sat,
                                              const uint32_t* nosat, uint32_t u0, uint32_t u1,
                                              Mismatch& mm) {
  size_t i = 0;
  for (uint32_t u = u0; u < u1; ++u) {
    const float pos = float_of(u), neg = float_of(u | 0x80000000u);
    uint32_t es = 0x7F, en = 0x7F, ns = 0;  // NaN, either sign
    if (u <= 0x7F800000u) {
      const size_t k = t.walk(static_cast<double>(pos), i);
      es = sat[k], en = nosat[k], ns = 0x80;
    }
    mm.add(0, float_to_fp8(pos, F, true) != es, u);
    mm.add(1, float_to_fp8(pos, F, false) != en, u);
    mm.add(2, float_to_fp8(neg, F, true) != (es | ns), u | 0x80000000u);
    mm.add(3, float_to_fp8(neg, F, false) != (en | ns), u | 0x80000000u);
  }
}

template <Fp8Format F>
Mismatch sweep_fp8(const Fmt& f) {
  const Table t(f);
  std::vector<uint32_t> sat(t.code), nosat(t.code);
  sat.push_back(t.code[t.n - 1]);
  nosat.push_back(f.fn ? 0x7Fu : 0x7Cu);
  return parallel_sweep([&](uint32_t u0, uint32_t u1, Mismatch& mm) {
    sweep_fp8_range<F>(t, sat.data(), nosat.data(), u0, u1, mm);
  });
}

void expect_clean(const Mismatch& m, const char* what) {
  const char* slot[4] = {"+SAT", "+NOSAT", "-SAT", "-NOSAT"};
  for (int j = 0; j < 4; ++j) {
    EXPECT_EQ(m.count[j], 0u) << what << " " << slot[j] << ": first mismatch at float bits 0x"
                              << std::hex << m.first[j];
  }
}

TEST(Fp8Codec, E4M3AllFloatsSatAndNosat) {
  expect_clean(sweep_fp8<Fp8Format::kE4M3>(kE4M3), "E4M3");
}
TEST(Fp8Codec, E5M2AllFloatsSatAndNosat) {
  expect_clean(sweep_fp8<Fp8Format::kE5M2>(kE5M2), "E5M2");
}

// All 2^32 floats through a one-mode encoder (slots 0 and 2: +x, -x) against reference 1: the
// rounding index k of |x| gives t.code[k], or `overflow` at the overflow entry; the sign bit is
// `sign`; NaN gives `nan` whatever the sign.
template <class Encode>
Mismatch sweep_one_mode(const Table& t, Encode encode, uint32_t overflow, uint32_t sign,
                        uint32_t nan) {
  return parallel_sweep([&](uint32_t u0, uint32_t u1, Mismatch& mm) {
    size_t i = 0;
    for (uint32_t u = u0; u < u1; ++u) {
      uint32_t ep = nan, en = nan;
      if (u <= 0x7F800000u) {
        const size_t k = t.walk(static_cast<double>(float_of(u)), i);
        ep = k < t.n ? t.code[k] : overflow;
        en = ep | sign;
      }
      mm.add(0, encode(float_of(u)) != ep, u);
      mm.add(2, encode(float_of(u | 0x80000000u)) != en, u | 0x80000000u);
    }
  });
}

TEST(Fp8Codec, Bf16AllFloats) {
  const Table t(kBF16);  // overflow entry = 2^128 -> Inf
  const auto enc = [](float x) { return static_cast<uint32_t>(float_to_bf16(x)); };
  expect_clean(sweep_one_mode(t, enc, 0x7F80u, 0x8000u, 0x7FFFu), "BF16");
}

// Reference 2: the encoder of the format definition in double arithmetic, q = nearbyint(|x| /
// quantum) (RNE), then the overflow rules; the code is found by value in the decoded table.
class RefEncoder {
 public:
  explicit RefEncoder(const Fmt& f) : f_(f), t_(f) {}
  uint32_t operator()(float x, bool sat) const {
    if (std::isnan(x)) return 0x7F;
    const uint32_t s = std::signbit(x) ? 0x80u : 0u;
    const double d = std::fabs(static_cast<double>(x));
    double r = 0;
    if (d != 0) {
      const int qe = quantum_exp(d, f_);
      r = std::ldexp(std::nearbyint(std::ldexp(d, -qe)), qe);  // exact scaling, RNE
    }
    if (r > t_.val[t_.n - 1]) return (sat ? t_.code[t_.n - 1] : (f_.fn ? 0x7Fu : 0x7Cu)) | s;
    const auto it = std::lower_bound(t_.val.begin(), t_.val.begin() + t_.n, r);
    return t_.code[it - t_.val.begin()] | s;
  }

 private:
  Fmt f_;
  Table t_;
};

// Reference 2 against the codec on a stride-251 sample of all floats and on every float within
// 300 ulps of each rounding boundary (both signs, both modes).
TEST(Fp8Codec, FormulaReferenceOnSamplesAndBoundaries) {
  for (const Fmt& f : {kE4M3, kE5M2}) {
    const RefEncoder ref(f);
    const Table t(f);
    auto check = [&](uint32_t u) {
      const float x = float_of(u);
      for (bool sat : {true, false}) {
        ASSERT_EQ(float_to_fp8(x, f.id, sat), ref(x, sat))
            << "bits 0x" << std::hex << u << " sat " << sat << " fmt " << f.ebits;
      }
    };
    for (uint64_t u = 0; u < (1ull << 32); u += 251) check(static_cast<uint32_t>(u));
    for (double m : t.mid) {
      const uint32_t b = bits_of(static_cast<float>(m));
      for (uint32_t d = 0; d <= 600; ++d) check(b - 300 + d), check((b - 300 + d) | 0x80000000u);
    }
  }
}

TEST(Fp8Codec, DecodeAllCodes) {
  for (const Fmt& f : {kE4M3, kE5M2}) {
    for (uint32_t c = 0; c < 256; ++c) {
      const double ref = ref_decode(c, f);
      const float got = fp8_to_float(static_cast<uint8_t>(c), f.id);
      if (std::isnan(ref)) {
        EXPECT_TRUE(std::isnan(got)) << "code " << c;
      } else {
        EXPECT_EQ(bits_of(got), bits_of(static_cast<float>(ref))) << "code " << c;
      }
    }
  }
  for (uint32_t b = 0; b < 65536; ++b) {
    const double ref = ref_decode(b, kBF16);
    const float got = bf16_to_float(static_cast<uint16_t>(b));
    if (std::isnan(ref)) {
      EXPECT_TRUE(std::isnan(got)) << "bf16 " << b;
    } else {
      EXPECT_EQ(bits_of(got), bits_of(static_cast<float>(ref))) << "bf16 " << b;
    }
  }
}

TEST(Fp8Codec, RoundTripAllCodes) {
  for (const Fmt& f : {kE4M3, kE5M2}) {
    for (uint32_t c = 0; c < 256; ++c) {
      const float v = fp8_to_float(static_cast<uint8_t>(c), f.id);
      if (std::isnan(v)) continue;
      EXPECT_EQ(float_to_fp8(v, f.id, false), c) << "code " << c;
      const uint32_t sat_expect = std::isinf(v) ? (c & 0x80u) | 0x7Bu : c;  // Inf saturates
      EXPECT_EQ(float_to_fp8(v, f.id, true), sat_expect) << "code " << c;
    }
  }
  for (uint32_t b = 0; b < 65536; ++b) {
    const float v = bf16_to_float(static_cast<uint16_t>(b));
    if (!std::isnan(v)) {
      EXPECT_EQ(float_to_bf16(v), b) << "bf16 " << b;
    }
  }
}

// The worked rules of FP8.md §4, spelled out.
TEST(Fp8Codec, SpecExamples) {
  const auto e4 = Fp8Format::kE4M3;
  const auto e5 = Fp8Format::kE5M2;
  EXPECT_EQ(float_to_fp8(464.0f, e4, true), 0x7E);
  EXPECT_EQ(float_to_fp8(464.0f, e4, false), 0x7E);
  EXPECT_EQ(float_to_fp8(std::nextafter(464.0f, 1e9f), e4, true), 0x7E);
  EXPECT_EQ(float_to_fp8(std::nextafter(464.0f, 1e9f), e4, false), 0x7F);
  EXPECT_EQ(float_to_fp8(-std::numeric_limits<float>::infinity(), e4, true), 0xFE);
  EXPECT_EQ(float_to_fp8(-std::numeric_limits<float>::infinity(), e4, false), 0xFF);
  EXPECT_EQ(float_to_fp8(61440.0f, e5, true), 0x7B);
  EXPECT_EQ(float_to_fp8(61440.0f, e5, false), 0x7C);
  EXPECT_EQ(float_to_fp8(-61440.0f, e5, false), 0xFC);
  EXPECT_EQ(float_to_fp8(std::nextafter(61440.0f, 0.0f), e5, false), 0x7B);
  EXPECT_EQ(float_to_fp8(std::ldexp(1.0f, -10), e4), 0x00);
  EXPECT_EQ(float_to_fp8(-std::ldexp(1.0f, -10), e4), 0x80);
  EXPECT_EQ(float_to_fp8(std::nextafter(std::ldexp(1.0f, -10), 1.0f), e4), 0x01);
  EXPECT_EQ(float_to_fp8(std::ldexp(1.0f, -17), e5), 0x00);
  EXPECT_EQ(float_to_fp8(std::nextafter(std::ldexp(1.0f, -17), 1.0f), e5), 0x01);
  EXPECT_EQ(float_to_fp8(-0.0f, e4), 0x80);
  EXPECT_EQ(float_to_fp8(float_of(0xFFC00001u), e4, true), 0x7F);  // NaN sign dropped
  EXPECT_EQ(float_to_fp8(float_of(0xFFC00001u), e5, false), 0x7F);
  EXPECT_EQ(float_to_bf16(float_of(0xFFC00001u)), 0x7FFF);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7F80);
  EXPECT_EQ(float_to_bf16(float_of(0x00000001u)), 0x0000);  // tiny subnormal rounds to 0
  EXPECT_EQ(float_to_bf16(float_of(0x00008001u)), 0x0001);  // subnormals kept, no FTZ
  EXPECT_EQ(fp8_max(e4), 448.0f);
  EXPECT_EQ(fp8_max(e5), 57344.0f);
}

// ---- E5M6, the attention-output cache format (binary16 with 4 fewer mantissa bits), SATFINITE

// All 2^32 floats against reference 1 built from E5M6's definition: overflow saturates to the
// largest finite code 0x7BF (65024), NaN gives 0x7FF whatever the sign, the sign bit is 0x800.
TEST(Fp8Codec, E5M6AllFloats) {
  const Table t(kE5M6);
  ASSERT_EQ(t.val[t.n - 1], 65024.0);
  const auto enc = [](float x) { return static_cast<uint32_t>(float_to_e5m6(x)); };
  // overflow saturates to the largest finite code
  expect_clean(sweep_one_mode(t, enc, t.code[t.n - 1], 0x800u, 0x7FFu), "E5M6");
}

TEST(Fp8Codec, E5M6DecodeAndRoundTripAllCodes) {
  for (uint32_t c = 0; c < 4096; ++c) {
    const double ref = ref_decode(c, kE5M6);
    const float got = e5m6_to_float(static_cast<uint16_t>(c));
    if (std::isnan(ref)) {
      EXPECT_TRUE(std::isnan(got)) << "code " << c;
      continue;
    }
    EXPECT_EQ(bits_of(got), bits_of(static_cast<float>(ref))) << "code " << c;
    const uint32_t back = std::isinf(ref) ? (c & 0x800u) | 0x7BFu : c;  // Inf saturates
    EXPECT_EQ(float_to_e5m6(got), back) << "code " << c;
  }
}

TEST(Fp8Codec, E5M6SpecExamples) {
  EXPECT_EQ(float_to_e5m6(1.0f), 0x3C0);                // exponent field 15
  EXPECT_EQ(float_to_e5m6(1.0f + 0x1p-7f), 0x3C0);      // tie to even mantissa 0
  EXPECT_EQ(float_to_e5m6(1.0f + 3 * 0x1p-7f), 0x3C2);  // tie to even mantissa 2
  EXPECT_EQ(float_to_e5m6(65024.0f), 0x7BF);            // largest finite
  EXPECT_EQ(float_to_e5m6(65280.0f), 0x7BF);            // tie toward overflow: SAT
  EXPECT_EQ(float_to_e5m6(-std::numeric_limits<float>::infinity()), 0xFBF);
  EXPECT_EQ(float_to_e5m6(0x1p-20f), 0x001);  // smallest subnormal
  EXPECT_EQ(float_to_e5m6(0x1p-21f), 0x000);  // tie to even: zero
  EXPECT_EQ(float_to_e5m6(std::nextafter(0x1p-21f, 1.0f)), 0x001);
  EXPECT_EQ(float_to_e5m6(0x1p-14f - 0x1p-21f), 0x040);  // rounds up to 2^-14
  EXPECT_EQ(float_to_e5m6(-0.0f), 0x800);
  EXPECT_EQ(float_to_e5m6(float_of(0xFFC00001u)), 0x7FF);  // NaN sign dropped
  EXPECT_EQ(e5m6_to_float(0x7C0), std::numeric_limits<float>::infinity());
  EXPECT_EQ(kE5M6Max, 65024.0f);
}

// Two codes to three bytes, element order, and an odd tail using one byte and a nibble.
TEST(Fp8Codec, E5M6Packing) {
  EXPECT_EQ(e5m6_bytes(0), 0);
  EXPECT_EQ(e5m6_bytes(1), 2);
  EXPECT_EQ(e5m6_bytes(2), 3);
  EXPECT_EQ(e5m6_bytes(7), 11);
  uint8_t p[3];
  e5m6_pack_pair(0xABC, 0x123, p);
  EXPECT_EQ(p[0], 0xBC);
  EXPECT_EQ(p[1], 0x3A);  // high nibble of 0xABC low, low nibble of 0x123 high
  EXPECT_EQ(p[2], 0x12);
  std::vector<uint8_t> buf(e5m6_bytes(5), 0);
  const uint16_t codes[5] = {0x001, 0xFFF, 0x800, 0x7BF, 0x3C2};
  for (int j = 0; j < 2; ++j) e5m6_pack_pair(codes[2 * j], codes[2 * j + 1], &buf[3 * j]);
  buf[6] = codes[4] & 0xFF;
  buf[7] = codes[4] >> 8;
  for (int i = 0; i < 5; ++i) EXPECT_EQ(e5m6_load(buf.data(), i), codes[i]) << i;
}

}  // namespace
}  // namespace fp8pipe::kernels
