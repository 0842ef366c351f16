// Bit-exact conversions between float32 and E4M3 / E5M2 / BF16, identical to CUDA's
// __nv_cvt_float_to_fp8 and __float2bfloat16_rn (FP8.md §4). Pure integer code, usable from host
// and device (FP8PIPE_HD), so the CPU and CUDA backends share one definition of every bit.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FP8PIPE_HD __host__ __device__ __forceinline__
#else
#define FP8PIPE_HD inline
#endif

namespace fp8pipe::kernels {

enum class Fp8Format : uint8_t { kE4M3, kE5M2 };

FP8PIPE_HD uint32_t f32_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#endif
}
FP8PIPE_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#endif
}

// float32 -> FP8 with round-to-nearest-even on the exact value. `saturate` = SATFINITE (overflow
// and Inf go to +-max finite); otherwise NOSAT (E4M3: NaN with sign kept; E5M2: +-Inf). NaN ->
// 0x7F.
FP8PIPE_HD uint8_t float_to_fp8(float x, Fp8Format fmt, bool saturate = true) {
  const bool e4 = fmt == Fp8Format::kE4M3;
  const int man_bits = e4 ? 3 : 2;
  const int bias = e4 ? 7 : 15;
  const uint32_t u = f32_bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return 0x7F;  // NaN, sign dropped
  const uint8_t max_code = e4 ? 0x7E : 0x7B;
  const uint8_t ovf_code = e4 ? 0x7F : 0x7C;
  if (a == 0x7F800000u) return sign | (saturate ? max_code : ovf_code);
  // Decompose |x| = m * 2^(e) with m an integer significand (24 bits for normals).
  int exp_field = static_cast<int>(a >> 23);
  uint32_t mant = a & 0x7FFFFFu;
  int e;  // unbiased exponent of the leading bit of mant (after adding the hidden bit)
  if (exp_field == 0) {
    if (mant == 0) return sign;  // signed zero
    e = -126;                    // float subnormal: value = mant * 2^(-149)
  } else {
    mant |= 0x800000u;
    e = exp_field - 127;
  }
  // value = mant * 2^(e - 23). Target quantum: 2^(max(E, emin) - man_bits), where E = floor(log2).
  int lead = 23;
  if (exp_field == 0) {
    lead = 31 - __builtin_clz(mant);
  }
  const int E = e - 23 + lead;  // floor(log2 |x|)
  const int emin = 1 - bias;
  const int q_exp = (E < emin ? emin : E) - man_bits;  // log2 of the quantum
  const int shift = q_exp - (e - 23);                  // right shift of mant to reach the quantum
  uint32_t q;                                          // |x| / quantum, rounded RNE
  if (shift <= 0) {
    q = mant << (-shift);  // exact (cannot happen for in-range FP8 values, kept for safety)
  } else if (shift >= 32) {
    q = 0;  // far below half a quantum
  } else {
    const uint32_t kept = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    q = kept + ((rem > half || (rem == half && (kept & 1u))) ? 1u : 0u);
  }
  if (q == 0) return sign;
  // q * 2^q_exp. Renormalise: q may have man_bits+2 bits after rounding up.
  int qe = q_exp;
  const uint32_t top = 1u << (man_bits + 1);
  if (q >= top) {  // rounding carried into a new binade; q is even then (q == top)
    q >>= 1;
    ++qe;
  }
  // Now q < 2^(man_bits+1). If q >= 2^man_bits the value is normal with exponent qe + man_bits.
  uint32_t code;
  if (q >= (1u << man_bits)) {
    const int biased = qe + man_bits + bias;
    const int max_biased = e4 ? 15 : 30;
    if (biased > max_biased) return sign | (saturate ? max_code : ovf_code);
    code = (static_cast<uint32_t>(biased) << man_bits) | (q & ((1u << man_bits) - 1u));
    if (e4 && code > 0x7E) return sign | (saturate ? max_code : ovf_code);  // 0x7F is NaN
  } else {
    code = q;  // subnormal (qe == emin - man_bits)
  }
  return static_cast<uint8_t>(sign | code);
}

// FP8 -> float32, exact. NaN codes give 0x7FFFFFFF (as CUDA's decode through f16 does).
FP8PIPE_HD float fp8_to_float(uint8_t c, Fp8Format fmt) {
  const bool e4 = fmt == Fp8Format::kE4M3;
  const int man_bits = e4 ? 3 : 2;
  const int bias = e4 ? 7 : 15;
  const uint32_t sign = static_cast<uint32_t>(c & 0x80u) << 24;
  const uint32_t a = c & 0x7Fu;
  if (e4 ? a == 0x7F : a > 0x7C) return bits_f32(0x7FFFFFFFu);
  if (!e4 && a == 0x7C) return bits_f32(sign | 0x7F800000u);
  const uint32_t exp_field = a >> man_bits;
  uint32_t mant = a & ((1u << man_bits) - 1u);
  if (exp_field == 0) {
    if (mant == 0) return bits_f32(sign);
    // subnormal: mant * 2^(1 - bias - man_bits); normalise into a float normal.
    int e = 1 - bias;
    while (!(mant & (1u << man_bits))) {
      mant <<= 1;
      --e;
    }
    mant &= (1u << man_bits) - 1u;
    return bits_f32(sign | (static_cast<uint32_t>(e + 127) << 23) | (mant << (23 - man_bits)));
  }
  const int e = static_cast<int>(exp_field) - bias;
  return bits_f32(sign | (static_cast<uint32_t>(e + 127) << 23) | (mant << (23 - man_bits)));
}

// float32 -> bfloat16 bits, RNE, NaN -> 0x7FFF (sign dropped), overflow to +-Inf, no FTZ.
FP8PIPE_HD uint16_t float_to_bf16(float x) {
  const uint32_t u = f32_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
FP8PIPE_HD float bf16_to_float(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

// Largest finite magnitude of each format (448 and 57344).
FP8PIPE_HD float fp8_max(Fp8Format fmt) { return fmt == Fp8Format::kE4M3 ? 448.0f : 57344.0f; }

// E5M6: DeepSeek-V3's 12-bit cache format for the attention output (TR §3.3.3), which the report
// names but does not spell out. Defined here as IEEE binary16 with 4 fewer mantissa bits, as E5M2
// is binary16 with 8 fewer: sign, 5 exponent bits (bias 15, field 31 = Inf/NaN), 6 mantissa bits,
// subnormals. Largest finite 65024 = (2 - 2^-6) * 2^15, smallest normal 2^-14, smallest subnormal
// 2^-20. Codes are the low 12 bits of a uint16_t.
constexpr float kE5M6Max = 65024.0f;
constexpr uint16_t kE5M6MaxCode = 0x7BF, kE5M6NaN = 0x7FF, kE5M6Sign = 0x800;

// float32 -> E5M6, RNE on the exact value, SATFINITE (overflow and Inf go to +-65024), NaN ->
// 0x7FF. The normal range rounds the float's mantissa to 6 bits with ties to even (a carry moves
// into the exponent); below 2^-14, |x| * 2^20 is rounded to an integer by adding 2^23.
FP8PIPE_HD uint16_t float_to_e5m6(float x) {
  const uint32_t u = f32_bits(x);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return kE5M6NaN;
  const uint32_t sign = (u >> 20) & kE5M6Sign;
  uint32_t mag;
  if (a < (113u << 23)) {  // below 2^-14: subnormal (or zero)
    mag = f32_bits(bits_f32(a) * 1048576.0f + 8388608.0f) - 0x4B000000u;
  } else {
    mag = ((a + 0xFFFFu + ((a >> 17) & 1u)) >> 17) - (112u << 6);
    if (mag > kE5M6MaxCode) mag = kE5M6MaxCode;
  }
  return static_cast<uint16_t>(sign | mag);
}

// E5M6 -> float32, exact (every E5M6 value is a float). NaN codes give 0x7FFFFFFF.
FP8PIPE_HD float e5m6_to_float(uint16_t c) {
  const uint32_t sign = static_cast<uint32_t>(c & kE5M6Sign) << 20;
  const uint32_t exp_field = (c >> 6) & 31u, mant = c & 63u;
  if (exp_field == 31) return bits_f32(mant ? 0x7FFFFFFFu : (sign | 0x7F800000u));
  if (exp_field == 0) return bits_f32(sign | f32_bits(static_cast<float>(mant) * 0x1p-20f));
  return bits_f32(sign | ((exp_field + 112u) << 23) | (mant << 17));
}

// E5M6 tensors are packed two codes to three bytes, in element order: element 2j's code in
// byte 3j and the low nibble of 3j+1, element 2j+1's in the high nibble of 3j+1 and byte 3j+2.
// An odd last element uses bytes 3j and the low nibble of 3j+1.
FP8PIPE_HD int64_t e5m6_bytes(int64_t n) { return (3 * n + 1) / 2; }
FP8PIPE_HD void e5m6_pack_pair(uint16_t c0, uint16_t c1, uint8_t* p) {
  p[0] = static_cast<uint8_t>(c0 & 0xFFu);
  p[1] = static_cast<uint8_t>(((c0 >> 8) & 0xFu) | ((c1 & 0xFu) << 4));
  p[2] = static_cast<uint8_t>((c1 >> 4) & 0xFFu);
}
// Code of element i of a packed E5M6 array.
FP8PIPE_HD uint16_t e5m6_load(const uint8_t* packed, int64_t i) {
  const uint8_t* p = packed + 3 * (i >> 1);
  if (i & 1) return static_cast<uint16_t>((p[1] >> 4) | (p[2] << 4));
  return static_cast<uint16_t>(p[0] | ((p[1] & 0xFu) << 8));
}

}  // namespace fp8pipe::kernels
