// Fine-grained FP8 quantization on the CPU (FP8.md §2.1–2.3): exact amax with the NaN policy, pow2
// or FP32 scales, one FP32 multiply, then RNE + SATFINITE, written in cuBLASLt's scale layouts.
// The encoder is a branch-free twin of float_to_fp8(.., true) so the group loops vectorise.
#include "kernels/cpu/quantize.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace fp8pipe::kernels {
namespace {

constexpr int64_t kG = 128;                 // group edge
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;  // clears the sign
constexpr uint32_t kMaxFiniteBits = 0x7F7FFFFFu;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) { return bf16_to_float(v); }

// |x| as bits: for non-NaN values their unsigned order is the order of |x|, NaN/Inf sort above all
// finite values, so an integer max gives the exact amax and detects non-finite inputs at once.
template <class T>
inline uint32_t abs_bits(T v) {
  return f32_bits(to_f32(v)) & kAbsMask;
}
inline float amax_from_bits(uint32_t m) { return m > kMaxFiniteBits ? kNaN : bits_f32(m); }

// The helpers below come in fixed 128-element pieces with restrict pointers so that GCC vectorises
// them even at -O2 (its "very cheap" cost model wants a known trip count and no alias checks).
template <class T>
inline uint32_t max_abs_128(const T* __restrict x) {
  uint32_t m = 0;
  for (int64_t i = 0; i < kG; ++i) m = std::max(m, abs_bits(x[i]));
  return m;
}
template <class T>
inline void max_abs_cols_128(const T* __restrict row, uint32_t* __restrict m) {
  for (int64_t i = 0; i < kG; ++i) m[i] = std::max(m[i], abs_bits(row[i]));
}
template <class T>
inline uint32_t max_abs_bits(const T* x, int64_t n, uint32_t m) {
  int64_t i = 0;
  for (; i + kG <= n; i += kG) m = std::max(m, max_abs_128(x + i));
  for (; i < n; ++i) m = std::max(m, abs_bits(x[i]));
  return m;
}

inline uint32_t select(bool c, uint32_t a, uint32_t b) {  // branch-free c ? a : b
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return (a & mask) | (b & ~mask);
}

// float -> FP8, RNE + SATFINITE, NaN -> 0x7F; equal to float_to_fp8(y, F, true) for every float y.
// Subnormal range: |y| * 2^(bias-1+man) rounded by the 2^23 magic addition. Normal range: round the
// float mantissa to `man` bits with ties to even, rebias, clamp to the largest finite code.
template <Fp8Format F>
inline uint8_t encode_sat(float y) {
  constexpr bool e4 = F == Fp8Format::kE4M3;
  constexpr uint32_t man = e4 ? 3 : 2, bias = e4 ? 7 : 15, max_code = e4 ? 0x7E : 0x7B;
  constexpr float sub_scale = e4 ? 512.0f : 65536.0f;
  constexpr uint32_t min_normal = (128u - bias) << 23, shift = 23 - man;
  const uint32_t u = f32_bits(y);
  const uint32_t a = u & kAbsMask;
  const uint32_t sub = f32_bits(bits_f32(a) * sub_scale + 8388608.0f) - 0x4B000000u;
  const uint32_t rounded = a + ((1u << (shift - 1)) - 1u) + ((a >> shift) & 1u);
  uint32_t norm = (rounded >> shift) - ((127u - bias) << man);
  norm = select(norm > max_code, max_code, norm);
  const uint32_t code = select(a < min_normal, sub, norm) | ((u >> 24) & 0x80u);
  return static_cast<uint8_t>(select(a > 0x7F800000u, 0x7Fu, code));
}

template <Fp8Format F, class T>
inline void encode_128(const T* __restrict x, float inv, uint8_t* __restrict q) {
  for (int64_t i = 0; i < kG; ++i) q[i] = encode_sat<F>(to_f32(x[i]) * inv);
}
template <Fp8Format F, class T>
inline void encode_cols_128(const T* __restrict x, const float* __restrict inv,
                            uint8_t* __restrict q) {
  for (int64_t i = 0; i < kG; ++i) q[i] = encode_sat<F>(to_f32(x[i]) * inv[i]);
}
template <Fp8Format F, class T>
inline void encode_span(const T* x, int64_t n, float inv, uint8_t* q) {
  int64_t i = 0;
  for (; i + kG <= n; i += kG) encode_128<F>(x + i, inv, q + i);
  for (; i < n; ++i) q[i] = encode_sat<F>(to_f32(x[i]) * inv);
}
template <Fp8Format F, class T>
inline void encode_cols(const T* x, int64_t n, const float* inv, uint8_t* q) {
  int64_t i = 0;
  for (; i + kG <= n; i += kG) encode_cols_128<F>(x + i, inv + i, q + i);
  for (; i < n; ++i) q[i] = encode_sat<F>(to_f32(x[i]) * inv[i]);
}

// One rectangular group [r0,r1) x [c0,c1) of X[.][cols]: amax, scale, codes. Returns 1 if the
// group's amax is not finite (its scale is NaN and its codes 0x7F), else 0.
template <Fp8Format F, class T>
int64_t quantize_rect(const T* x, int64_t cols, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                      QuantParams p, uint8_t* q, float* s) {
  uint32_t m = 0;
  for (int64_t r = r0; r < r1; ++r) m = max_abs_bits(x + r * cols + c0, c1 - c0, m);
  const float amax = amax_from_bits(m);
  float inv;
  compute_scale(amax, p, s, &inv);
  for (int64_t r = r0; r < r1; ++r) {
    encode_span<F>(x + r * cols + c0, c1 - c0, inv, q + r * cols + c0);
  }
  return std::isfinite(amax) ? 0 : 1;
}

// Scales of the 128x1 groups of row block [r0,r1): one per column, computed over all rows at once
// so the amax loop runs along contiguous rows. Writes sf to s[c], inv to inv[c].
template <class T>
int64_t column_scales(const T* x, int64_t cols, int64_t r0, int64_t r1, QuantParams p, float* s,
                      float* inv) {
  std::vector<uint32_t> m(static_cast<size_t>(cols), 0u);
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = x + r * cols;
    int64_t c = 0;
    for (; c + kG <= cols; c += kG) max_abs_cols_128(row + c, m.data() + c);
    for (; c < cols; ++c) m[c] = std::max(m[c], abs_bits(row[c]));
  }
  int64_t bad = 0;
  for (int64_t c = 0; c < cols; ++c) {
    bad += m[c] > kMaxFiniteBits ? 1 : 0;
    compute_scale(amax_from_bits(m[c]), p, s + c, inv + c);
  }
  return bad;
}

template <Fp8Format F, class T>
int64_t quantize_128x1(const T* x, int64_t rows, int64_t cols, QuantParams p, uint8_t* q,
                       float* s) {
  std::vector<float> inv(static_cast<size_t>(cols));
  int64_t bad = 0;
  for (int64_t r0 = 0; r0 < rows; r0 += kG) {
    const int64_t r1 = std::min(rows, r0 + kG);
    bad += column_scales(x, cols, r0, r1, p, s + (r0 / kG) * cols, inv.data());
    for (int64_t r = r0; r < r1; ++r) encode_cols<F>(x + r * cols, cols, inv.data(), q + r * cols);
  }
  return bad;
}

template <Fp8Format F, class T>
int64_t quantize_blocks(const T* x, int64_t rows, int64_t cols, Granularity g, QuantParams p,
                        uint8_t* q, float* s) {
  const int64_t kb_n = ceil_div(cols, kG), rb_n = ceil_div(rows, kG);
  int64_t bad = 0;
  if (g == Granularity::kPerTensor) return quantize_rect<F>(x, cols, 0, rows, 0, cols, p, q, s);
  if (g == Granularity::k1x128) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t kb = 0; kb < kb_n; ++kb) {
        const int64_t c0 = kb * kG, c1 = std::min(cols, c0 + kG);
        bad += quantize_rect<F>(x, cols, r, r + 1, c0, c1, p, q, s + kb * rows + r);
      }
    }
    return bad;
  }
  const int64_t ld = pad4(kb_n);  // k128x128
  for (int64_t rb = 0; rb < rb_n; ++rb) {
    const int64_t r0 = rb * kG, r1 = std::min(rows, r0 + kG);
    for (int64_t kb = 0; kb < kb_n; ++kb) {
      const int64_t c0 = kb * kG, c1 = std::min(cols, c0 + kG);
      bad += quantize_rect<F>(x, cols, r0, r1, c0, c1, p, q, s + rb * ld + kb);
    }
    std::fill(s + rb * ld + kb_n, s + (rb + 1) * ld, 0.0f);  // padding, never read
  }
  return bad;
}

template <Fp8Format F, class T>
int64_t quantize_fmt(const T* x, int64_t rows, int64_t cols, Granularity g, QuantParams p,
                     uint8_t* q, float* s) {
  if (g == Granularity::k128x1) return quantize_128x1<F>(x, rows, cols, p, q, s);
  return quantize_blocks<F>(x, rows, cols, g, p, q, s);
}

template <class T>
int64_t quantize_any(const T* x, int64_t rows, int64_t cols, Granularity g, QuantParams p,
                     uint8_t* q, float* s) {
  if (p.fmt == Fp8Format::kE4M3) return quantize_fmt<Fp8Format::kE4M3>(x, rows, cols, g, p, q, s);
  return quantize_fmt<Fp8Format::kE5M2>(x, rows, cols, g, p, q, s);
}

// Row block [r0,r1) of the 128x1 quantization, written transposed into qt[cols][rows]. Encodes
// tiles of 128 columns row-major into a local buffer, then transposes the tile out.
template <Fp8Format F>
void encode_transposed(const float* x, int64_t rows, int64_t cols, int64_t r0, int64_t r1,
                       const float* inv, uint8_t* qt) {
  uint8_t tile[kG][kG];
  for (int64_t c0 = 0; c0 < cols; c0 += kG) {
    const int64_t nc = std::min(kG, cols - c0);
    for (int64_t r = r0; r < r1; ++r) encode_cols<F>(x + r * cols + c0, nc, inv + c0, tile[r - r0]);
    for (int64_t j = 0; j < nc; ++j) {
      uint8_t* out = qt + (c0 + j) * rows + r0;
      for (int64_t i = 0; i < r1 - r0; ++i) out[i] = tile[i][j];
    }
  }
}

template <Fp8Format F>
int64_t quantize_128x1_t(const float* x, int64_t rows, int64_t cols, QuantParams p, uint8_t* qt,
                         float* s) {
  std::vector<float> inv(static_cast<size_t>(cols));
  int64_t bad = 0;
  for (int64_t r0 = 0; r0 < rows; r0 += kG) {
    const int64_t r1 = std::min(rows, r0 + kG);
    bad += column_scales(x, cols, r0, r1, p, s + (r0 / kG) * cols, inv.data());
    encode_transposed<F>(x, rows, cols, r0, r1, inv.data(), qt);
  }
  return bad;
}

// Scale of element (r, c) at granularity g (layouts of quantize.h).
inline float scale_at(const float* s, Granularity g, int64_t rows, int64_t cols, int64_t r,
                      int64_t c) {
  switch (g) {
    case Granularity::k1x128:
      return s[(c / kG) * rows + r];
    case Granularity::k128x1:
      return s[(r / kG) * cols + c];
    case Granularity::k128x128:
      return s[(r / kG) * pad4(ceil_div(cols, kG)) + c / kG];
    case Granularity::kPerTensor:
      break;
  }
  return s[0];
}

}  // namespace

int64_t scale_count(Granularity g, int64_t rows, int64_t cols) {
  switch (g) {
    case Granularity::k1x128:
      return ceil_div(cols, kG) * rows;
    case Granularity::k128x1:
      return ceil_div(rows, kG) * cols;
    case Granularity::k128x128:
      return ceil_div(rows, kG) * pad4(ceil_div(cols, kG));
    case Granularity::kPerTensor:
      break;
  }
  return 1;
}

void compute_scale(float amax, QuantParams p, float* sf, float* inv) {
  compute_scale_max(amax, fp8_max(p.fmt), p.pow2, sf, inv);
}

void compute_scale_max(float amax, float fmax, bool pow2, float* sf, float* inv) {
  if (!std::isfinite(amax)) {
    *sf = kNaN;
    *inv = kNaN;
    return;
  }
  const float a = amax > 1e-4f ? amax : 1e-4f;
  const float t = a / fmax;
  if (!pow2) {
    *sf = t;
    *inv = 1.0f / t;
    return;
  }
  const uint32_t bits = f32_bits(t);
  const int e = static_cast<int>(bits >> 23) + ((bits & 0x7FFFFFu) != 0 ? 1 : 0);  // t > 0
  *sf = std::ldexp(1.0f, e - 127);
  *inv = std::ldexp(1.0f, 127 - e);
}

float amax_f32(const float* x, int64_t n, int64_t stride) {
  if (stride == 1) return amax_from_bits(max_abs_bits(x, n, 0u));
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, abs_bits(x[i * stride]));
  return amax_from_bits(m);
}

int64_t quantize(const float* x, int64_t rows, int64_t cols, Granularity g, QuantParams p,
                 uint8_t* q, float* s) {
  return quantize_any(x, rows, cols, g, p, q, s);
}

int64_t quantize_bf16(const uint16_t* x, int64_t rows, int64_t cols, Granularity g, QuantParams p,
                      uint8_t* q, float* s) {
  return quantize_any(x, rows, cols, g, p, q, s);
}

int64_t quantize_128x1_transposed(const float* x, int64_t rows, int64_t cols, QuantParams p,
                                  uint8_t* qt, float* s) {
  if (p.fmt == Fp8Format::kE4M3) return quantize_128x1_t<Fp8Format::kE4M3>(x, rows, cols, p, qt, s);
  return quantize_128x1_t<Fp8Format::kE5M2>(x, rows, cols, p, qt, s);
}

void dequantize(const uint8_t* q, const float* s, int64_t rows, int64_t cols, Granularity g,
                Fp8Format fmt, float* out) {
  float lut[256];
  for (int c = 0; c < 256; ++c) lut[c] = fp8_to_float(static_cast<uint8_t>(c), fmt);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* qrow = q + r * cols;
    float* orow = out + r * cols;
    if (g == Granularity::k128x1) {  // a scale per column
      const float* srow = s + (r / kG) * cols;
      for (int64_t c = 0; c < cols; ++c) orow[c] = lut[qrow[c]] * srow[c];
      continue;
    }
    for (int64_t c0 = 0; c0 < cols; c0 += kG) {  // a scale per 128 columns
      const float sf = scale_at(s, g, rows, cols, r, c0);
      const int64_t c1 = std::min(cols, c0 + kG);
      for (int64_t c = c0; c < c1; ++c) orow[c] = lut[qrow[c]] * sf;
    }
  }
}

namespace {
// Element i's value scaled and encoded; pairs of elements go out as three bytes.
template <class T>
int64_t quantize_e5m6_any(const T* x, int64_t rows, int64_t cols, uint8_t* packed, float* s) {
  const int64_t kb_n = ceil_div(cols, kG);
  std::vector<float> inv(static_cast<size_t>(cols));  // the inverse scale of each column, this row
  int64_t bad = 0;
  uint16_t pending = 0;  // the code of an even element whose pair is not written yet
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * cols;
    for (int64_t kb = 0; kb < kb_n; ++kb) {
      const int64_t c0 = kb * kG, c1 = std::min(cols, c0 + kG);
      const float amax = amax_from_bits(max_abs_bits(row + c0, c1 - c0, 0u));
      compute_scale_max(amax, kE5M6Max, /*pow2=*/true, s + kb * rows + r, &inv[c0]);
      std::fill(inv.begin() + c0 + 1, inv.begin() + c1, inv[c0]);
      bad += std::isfinite(amax) ? 0 : 1;
    }
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      const uint16_t code = float_to_e5m6(to_f32(row[c]) * inv[c]);
      if (i & 1) {
        e5m6_pack_pair(pending, code, packed + 3 * (i >> 1));
      } else {
        pending = code;
      }
    }
  }
  const int64_t n = rows * cols;
  if (n & 1) {  // the odd last element: its byte and the low nibble of the next
    uint8_t tail[3];
    e5m6_pack_pair(pending, 0, tail);
    packed[3 * (n >> 1)] = tail[0];
    packed[3 * (n >> 1) + 1] = tail[1];
  }
  return bad;
}
}  // namespace

int64_t quantize_e5m6(const float* x, int64_t rows, int64_t cols, uint8_t* packed, float* s) {
  return quantize_e5m6_any(x, rows, cols, packed, s);
}
int64_t quantize_e5m6_bf16(const uint16_t* x, int64_t rows, int64_t cols, uint8_t* packed,
                           float* s) {
  return quantize_e5m6_any(x, rows, cols, packed, s);
}

void dequantize_e5m6(const uint8_t* packed, const float* s, int64_t rows, int64_t cols,
                     float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      out[i] = e5m6_to_float(e5m6_load(packed, i)) * s[(c / kG) * rows + r];
    }
  }
}

void transpose_128x128(const uint8_t* q, const float* s, int64_t rows, int64_t cols, uint8_t* qt,
                       float* st) {
  constexpr int64_t kT = 64;  // byte tiles, cache friendly both ways
  for (int64_t r0 = 0; r0 < rows; r0 += kT) {
    for (int64_t c0 = 0; c0 < cols; c0 += kT) {
      const int64_t r1 = std::min(rows, r0 + kT), c1 = std::min(cols, c0 + kT);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = r0; r < r1; ++r) qt[c * rows + r] = q[r * cols + c];
      }
    }
  }
  // X^T[cols][rows]: its block rows are X's block columns; rows of blocks padded to 4.
  const int64_t rb_n = ceil_div(rows, kG), kb_n = ceil_div(cols, kG);
  const int64_t ld = pad4(kb_n), ldt = pad4(rb_n);
  for (int64_t kb = 0; kb < kb_n; ++kb) {
    for (int64_t rb = 0; rb < rb_n; ++rb) st[kb * ldt + rb] = s[rb * ld + kb];
    std::fill(st + kb * ldt + rb_n, st + (kb + 1) * ldt, 0.0f);
  }
}

}  // namespace fp8pipe::kernels
