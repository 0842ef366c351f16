// CPU FP8 GEMM (fp8_gemm.h). kFast dequantizes exactly through a 256-entry table and calls
// cblas_sgemm; kExact runs FP8.md §2.4's tensor-core model (32-term truncating steps into a 14-bit
// accumulator, per-128 promotion into fp32) on pre-decoded operands, rows split over a few threads.
#include "kernels/cpu/fp8_gemm.h"

#include <cblas.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>

namespace fp8pipe::kernels {
namespace {

// The exact kernel is integer and exact-float code, so its bits do not depend on the ISA: on x86
// it is also compiled for AVX2 and picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FP8PIPE_ISA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FP8PIPE_ISA_CLONES
#endif
#define FP8PIPE_ALWAYS_INLINE inline __attribute__((always_inline))

constexpr int64_t kBlock = 128;  // promotion interval N_C (FP8.md §1.3)
constexpr int kStep = 32;        // one WGMMA k=32 group
// Alignment exponent of a zero code. Any sum with it is <= -100 + 15 = -85, below every real
// exponent-field sum (>= -28 for E5M2 x E5M2) and below floor(log2|c|) >= -41 of any nonzero
// accumulator produced inside a GEMM, so zero products never set emax.
constexpr int kZeroExp = -100;

int man_bits(Fp8Format f) { return f == Fp8Format::kE4M3 ? 3 : 2; }
int exp_bias(Fp8Format f) { return f == Fp8Format::kE4M3 ? 7 : 15; }

bool nonfinite_code(uint8_t c, Fp8Format f) {
  const int a = c & 0x7F;
  return f == Fp8Format::kE4M3 ? a == 0x7F : a >= 0x7C;
}

// A finite code as value = sig * 2^(exp - man_bits): exp is the §2.4 alignment exponent (exponent
// field - bias; the min-normal exponent for subnormals), sig the signed integer significand.
struct CodeParts {
  int exp;
  int sig;
};

CodeParts code_parts(uint8_t c, Fp8Format f) {
  const int mb = man_bits(f);
  const int a = c & 0x7F;
  const int field = a >> mb;
  const int mant = a & ((1 << mb) - 1);
  if (field == 0 && mant == 0) return {kZeroExp, 0};
  const int exp = (field == 0 ? 1 : field) - exp_bias(f);
  const int sig = field == 0 ? mant : (mant | (1 << mb));
  return {exp, (c & 0x80) ? -sig : sig};
}

// §2.4 output rounding: s (a multiple of u = 2^(emax-13)) truncated toward zero to 14 significant
// bits. All results fit a float exactly (at most 14 significant bits, exponent >= emax - 13).
float trunc14(int64_t s, int emax) {
  if (s == 0) return 0.0f;
  uint64_t mag = static_cast<uint64_t>(s < 0 ? -s : s);
  const int len = 64 - __builtin_clzll(mag);
  if (len > 14) mag &= ~((uint64_t{1} << (len - 14)) - 1);
  const double v = std::ldexp(static_cast<double>(mag), emax - 13);
  return static_cast<float>(s < 0 ? -v : v);
}

// NaN/Inf codes or accumulator: the model is not defined there; propagate as IEEE arithmetic does.
float nonfinite_step(float c, const uint8_t* a, const uint8_t* b, int n, Fp8Format fa,
                     Fp8Format fb) {
  float s = c;
  for (int t = 0; t < n; ++t) s += fp8_to_float(a[t], fa) * fp8_to_float(b[t], fb);
  return s;
}

// Scale of (row r, k-block kb) of an R-row operand, layouts of quantize.h.
float scale_at(const Fp8Operand& x, int64_t rows, int64_t nkb, int64_t r, int64_t kb) {
  switch (x.gran) {
    case Granularity::k1x128:
      return x.s[kb * rows + r];
    case Granularity::k128x128:
      return x.s[(r / kBlock) * pad4(nkb) + kb];
    default:
      return x.s[0];
  }
}

// ------------------------------------------------------------------------------------------------
// kFast

// x[r][k] = f32(decode(q) * s) for every element, decode through a 256-entry table.
void dequantize_lut(const Fp8Operand& x, int64_t rows, int64_t K, float* out) {
  std::array<float, 256> lut;
  for (int i = 0; i < 256; ++i) lut[i] = fp8_to_float(static_cast<uint8_t>(i), x.fmt);
  const int64_t nkb = ceil_div(K, kBlock);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const float s = scale_at(x, rows, nkb, r, kb);
      const int64_t k0 = kb * kBlock, len = std::min(kBlock, K - k0);
      const uint8_t* q = x.q + r * K + k0;
      float* o = out + r * K + k0;
      for (int64_t i = 0; i < len; ++i) o[i] = lut[q[i]] * s;
    }
  }
}

void write_bf16(const float* acc, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(acc[i]);
}

// Per-thread scratch reused across calls, so repeated GEMMs do not page-fault fresh buffers in;
// requests above 64 MiB get a one-off allocation instead of being kept.
float* scratch(int64_t n, std::unique_ptr<float[]>* oneoff) {
  constexpr int64_t kKeepFloats = int64_t{16} << 20;
  thread_local std::vector<float> buf;
  if (n > kKeepFloats) {
    oneoff->reset(new float[n]);
    return oneoff->get();
  }
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

void gemm_fast(const Fp8Operand& a, const Fp8Operand& b, int64_t M, int64_t N, int64_t K,
               float* out_f32, uint16_t* out_bf16) {
  std::unique_ptr<float[]> oneoff;
  float* xa = scratch(M * K + N * K + (out_f32 ? 0 : M * N), &oneoff);
  float* xb = xa + M * K;
  float* c = out_f32 ? out_f32 : xb + N * K;
  if ((M + N) * K >= (int64_t{1} << 20) && std::thread::hardware_concurrency() > 1) {
    std::thread tb(dequantize_lut, std::cref(b), N, K, xb);  // large operands: concurrently
    dequantize_lut(a, M, K, xa);
    tb.join();
  } else {
    dequantize_lut(a, M, K, xa);
    dequantize_lut(b, N, K, xb);
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(N),
              static_cast<int>(K), 1.0f, xa, static_cast<int>(K), xb, static_cast<int>(K), 0.0f, c,
              static_cast<int>(N));
  if (out_bf16) write_bf16(c, M * N, out_bf16);
}

// ------------------------------------------------------------------------------------------------
// kExact

// An operand decoded once: alignment exponents and signed significands, K zero-padded to whole
// 128-blocks; row-major scales [rows][KB]; per (row, block) flag for NaN/Inf codes.
struct Decoded {
  int64_t rows = 0, nkb = 0, kpad = 0;
  std::vector<int8_t> exp, sig;
  std::vector<float> scale;
  std::vector<uint8_t> bad;
};

Decoded decode_operand(const Fp8Operand& x, int64_t rows, int64_t K) {
  Decoded d;
  d.rows = rows;
  d.nkb = ceil_div(K, kBlock);
  d.kpad = d.nkb * kBlock;
  std::array<int8_t, 256> le, ls;
  std::array<uint8_t, 256> lb;
  for (int i = 0; i < 256; ++i) {
    const auto c = static_cast<uint8_t>(i);
    lb[i] = nonfinite_code(c, x.fmt);
    const CodeParts p = lb[i] ? CodeParts{kZeroExp, 0} : code_parts(c, x.fmt);
    le[i] = static_cast<int8_t>(p.exp);
    ls[i] = static_cast<int8_t>(p.sig);
  }
  d.exp.assign(static_cast<size_t>(rows * d.kpad), static_cast<int8_t>(kZeroExp));
  d.sig.assign(static_cast<size_t>(rows * d.kpad), 0);
  d.scale.resize(static_cast<size_t>(rows * d.nkb));
  d.bad.assign(static_cast<size_t>(rows * d.nkb), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t c = x.q[r * K + k];
      d.exp[r * d.kpad + k] = le[c];
      d.sig[r * d.kpad + k] = ls[c];
      d.bad[r * d.nkb + k / kBlock] |= lb[c];
    }
    for (int64_t kb = 0; kb < d.nkb; ++kb)
      d.scale[r * d.nkb + kb] = scale_at(x, rows, d.nkb, r, kb);
  }
  return d;
}

// One §2.4 step on decoded codes (all finite), with c == 0 or |c| >= 2^-41 (always so inside a
// GEMM). Float arithmetic here is exact: sig products have <= 8 bits and are scaled by powers of
// two; the float->int conversion truncates toward zero; all integers stay below 2^21.
// lsb_bias = 13 - man_bits(A) - man_bits(B), so a product over u is sa*sb*2^(ea+eb+lsb_bias-emax).
FP8PIPE_ALWAYS_INLINE float fast_step(float c, const int8_t* ea, const int8_t* sa, const int8_t* eb,
                                      const int8_t* sb, int lsb_bias) {
  int emax = 2 * kZeroExp;
  for (int t = 0; t < kStep; ++t) emax = std::max(emax, ea[t] + eb[t]);
  if (c != 0.0f) emax = std::max(emax, static_cast<int>((f32_bits(c) >> 23) & 0xFF) - 127);
  if (emax <= kZeroExp + 15) return 0.0f;  // no nonzero product and c == 0
  const int base = lsb_bias - emax + 127;  // biased float exponent of 2^(lsb_bias - emax)
  int32_t s = 0;
  for (int t = 0; t < kStep; ++t) {
    // Clamping to exponent field 1 keeps |p| < 1 (truncates to 0) for products far below u.
    const int k = std::max(ea[t] + eb[t] + base, 1);
    const float p = static_cast<float>(sa[t] * sb[t]) * bits_f32(static_cast<uint32_t>(k) << 23);
    s += static_cast<int32_t>(p);
  }
  if (c != 0.0f) s += static_cast<int32_t>(c * bits_f32(static_cast<uint32_t>(140 - emax) << 23));
  if (s == 0) return 0.0f;
  uint32_t mag = static_cast<uint32_t>(s < 0 ? -s : s);
  const int len = 32 - __builtin_clz(mag);
  if (len > 14) mag &= ~((1u << (len - 14)) - 1u);
  const float v = static_cast<float>(mag) * bits_f32(static_cast<uint32_t>(emax + 114) << 23);
  return s < 0 ? -v : v;  // as trunc14(s, emax): 14 bits, exponent >= -41, exact in float
}

struct ExactJob {
  const Fp8Operand* a;
  const Fp8Operand* b;
  const Decoded* da;
  const Decoded* db;
  int64_t M, N, K;
  bool vec_vec;  // both 1x128: VEC x VEC promotion order
  float* out_f32;
  uint16_t* out_bf16;
};

// P_b of (row m of A, row n of B, block kb): steps from c = 0; a block with NaN/Inf codes goes
// through the general tc_step on the raw codes.
FP8PIPE_ALWAYS_INLINE float block_partial(const ExactJob& j, int64_t m, int64_t n, int64_t kb) {
  const int64_t k0 = kb * kBlock, len = std::min(kBlock, j.K - k0);
  const int nsteps = static_cast<int>(ceil_div(len, kStep));
  float c = 0.0f;
  if (j.da->bad[m * j.da->nkb + kb] | j.db->bad[n * j.db->nkb + kb]) {
    for (int st = 0; st < nsteps; ++st) {
      const int64_t ks = k0 + st * kStep;
      const int cnt = static_cast<int>(std::min<int64_t>(kStep, j.K - ks));
      c = tc_step(c, j.a->q + m * j.K + ks, j.b->q + n * j.K + ks, cnt, j.a->fmt, j.b->fmt);
    }
    return c;
  }
  const int lsb_bias = 13 - man_bits(j.a->fmt) - man_bits(j.b->fmt);
  const int64_t oa = m * j.da->kpad + k0, ob = n * j.db->kpad + k0;
  for (int st = 0; st < nsteps; ++st) {
    const int64_t o = st * kStep;
    c = fast_step(c, &j.da->exp[oa + o], &j.da->sig[oa + o], &j.db->exp[ob + o], &j.db->sig[ob + o],
                  lsb_bias);
  }
  return c;
}

// out[m][n] for m in [m0, m1): promotion of each P_b into the fp32 accumulator, blocks in
// increasing k: VEC x VEC (both 1x128) acc = fma(f32(P_b * s_ourA), s_ourB, acc) (cuBLASLt's
// fma(f32(P_b*sB), sA, acc) with its operands swapped); every other pair (VEC x BLK, BLK x VEC,
// per-tensor) acc = fma(P_b, f32(sA * sB), acc). B rows are walked in tiles that stay in cache.
FP8PIPE_ISA_CLONES void exact_rows(const ExactJob& j, int64_t m0, int64_t m1) {
  const int64_t nkb = j.da->nkb;
  const int64_t tile = std::max<int64_t>(1, (int64_t{256} << 10) / (2 * j.db->kpad));
  for (int64_t n0 = 0; n0 < j.N; n0 += tile) {
    const int64_t n1 = std::min(j.N, n0 + tile);
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t n = n0; n < n1; ++n) {
        float acc = 0.0f;
        for (int64_t kb = 0; kb < nkb; ++kb) {
          const float p = block_partial(j, m, n, kb);
          const float sa = j.da->scale[m * nkb + kb], sb = j.db->scale[n * nkb + kb];
          acc = j.vec_vec ? std::fma(p * sa, sb, acc) : std::fma(p, sa * sb, acc);
        }
        if (j.out_f32) j.out_f32[m * j.N + n] = acc;
        if (j.out_bf16) j.out_bf16[m * j.N + n] = float_to_bf16(acc);
      }
    }
  }
}

void gemm_exact(const Fp8Operand& a, const Fp8Operand& b, int64_t M, int64_t N, int64_t K,
                float* out_f32, uint16_t* out_bf16) {
  const Decoded da = decode_operand(a, M, K), db = decode_operand(b, N, K);
  const bool vv = a.gran == Granularity::k1x128 && b.gran == Granularity::k1x128;
  const ExactJob job{&a, &b, &da, &db, M, N, K, vv, out_f32, out_bf16};
  const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  const int64_t nt = M * N * K < (int64_t{1} << 22) ? 1 : std::min<int64_t>({4, hw, M});
  if (nt == 1) return exact_rows(job, 0, M);
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < nt; ++t) {
    pool.emplace_back(exact_rows, std::cref(job), M * t / nt, M * (t + 1) / nt);
  }
  for (auto& th : pool) th.join();
}

bool valid_gran(Granularity g) {
  return g == Granularity::k1x128 || g == Granularity::k128x128 || g == Granularity::kPerTensor;
}

}  // namespace

float tc_step(float c, const uint8_t* a, const uint8_t* b, int n, Fp8Format fa, Fp8Format fb) {
  bool finite = std::isfinite(c);
  for (int t = 0; t < n; ++t)
    finite = finite && !nonfinite_code(a[t], fa) && !nonfinite_code(b[t], fb);
  if (!finite) return nonfinite_step(c, a, b, n, fa, fb);
  int emax = c != 0.0f ? std::ilogb(c) : INT_MIN;
  for (int t = 0; t < n; ++t) {
    const CodeParts pa = code_parts(a[t], fa), pb = code_parts(b[t], fb);
    if (pa.sig != 0 && pb.sig != 0) emax = std::max(emax, pa.exp + pb.exp);
  }
  if (emax == INT_MIN) return 0.0f;
  // c / u is exact in double and below 2^14 in magnitude since floor(log2|c|) <= emax.
  int64_t s = static_cast<int64_t>(std::trunc(std::ldexp(static_cast<double>(c), 13 - emax)));
  const int lsb_bias = 13 - man_bits(fa) - man_bits(fb) - emax;
  for (int t = 0; t < n; ++t) {
    const CodeParts pa = code_parts(a[t], fa), pb = code_parts(b[t], fb);
    if (pa.sig == 0 || pb.sig == 0) continue;
    const int64_t p = int64_t{pa.sig} * pb.sig;
    const int sh = pa.exp + pb.exp + lsb_bias;  // product / u = p * 2^sh, sh <= 9
    uint64_t mag = static_cast<uint64_t>(p < 0 ? -p : p);
    mag = sh >= 0 ? mag << sh : (sh <= -63 ? 0 : mag >> -sh);  // truncation toward zero
    s += p < 0 ? -static_cast<int64_t>(mag) : static_cast<int64_t>(mag);
  }
  return trunc14(s, emax);
}

bool fp8_gemm(const Fp8Operand& a, const Fp8Operand& b, int64_t M, int64_t N, int64_t K,
              GemmMode mode, float* out_f32, uint16_t* out_bf16) {
  if ((out_f32 == nullptr) == (out_bf16 == nullptr) || M < 0 || N < 0 || K < 0) return false;
  if (!valid_gran(a.gran) || !valid_gran(b.gran)) return false;
  if (a.gran == Granularity::k128x128 && b.gran == Granularity::k128x128) return false;
  if (M == 0 || N == 0) return true;
  if (K == 0) {
    for (int64_t i = 0; i < M * N; ++i) {
      if (out_f32) out_f32[i] = 0.0f;
      if (out_bf16) out_bf16[i] = 0;
    }
    return true;
  }
  if (!a.q || !a.s || !b.q || !b.s) return false;
  if (mode == GemmMode::kFast) {
    gemm_fast(a, b, M, N, K, out_f32, out_bf16);
  } else {
    gemm_exact(a, b, M, N, K, out_f32, out_bf16);
  }
  return true;
}

}  // namespace fp8pipe::kernels
