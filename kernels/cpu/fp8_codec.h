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

}  // namespace fp8pipe::kernels
