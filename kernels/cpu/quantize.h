// Fine-grained FP8 quantization on the CPU (FP8.md §2.1–2.3): amax per group, scale (power-of-two
// or FP32), one FP32 multiply, RNE + saturate. Bit-identical to the CUDA kernels by construction.
//
// Scale layouts are the ones cuBLASLt reads (FP8.md §3.2), so CPU and GPU tensors share them:
//   1x128   X[R][C]: one scale per (row r, column block kb), stored kb-major   s[kb*R + r]
//   128x1   X[R][C]: one scale per (row block rb, column c), stored           s[rb*C + c]
//           (the same array is the 1x128 scale of the transposed tensor X^T[C][R])
//   128x128 X[R][C]: one scale per block, rows of blocks padded to 4:          s[rb*pad4(KB) + kb]
//   tensor  X[R][C]: a single scale                                            s[0]
// Partial edge groups behave as if zero-padded. Scales are dequantization scales: x ~= q * s.
#pragma once

#include <cstdint>

#include "kernels/cpu/fp8_codec.h"

namespace fp8pipe::kernels {

enum class Granularity : uint8_t { k1x128, k128x1, k128x128, kPerTensor };

struct QuantParams {
  Fp8Format fmt = Fp8Format::kE4M3;
  bool pow2 = true;  // power-of-two scales (default of the numerics contract)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t pad4(int64_t n) { return (n + 3) / 4 * 4; }

// Number of floats in the scale array of an R x C tensor at granularity g.
int64_t scale_count(Granularity g, int64_t rows, int64_t cols);

// FP8.md §2.2: sf (dequant) and inv (quant) from a group's amax. A NaN/Inf amax yields NaN scales.
void compute_scale(float amax, QuantParams p, float* sf, float* inv);
// The same for a format whose largest finite value is fmax (E5M6: kE5M6Max).
void compute_scale_max(float amax, float fmax, bool pow2, float* sf, float* inv);

// amax with the NaN policy of FP8.md §2.1: NaN or Inf anywhere -> NaN.
float amax_f32(const float* x, int64_t n, int64_t stride = 1);

// Quantize X[R][C] (fp32 or bf16 bits) at granularity g into q[R][C] and s (layout above).
// Returns the number of groups whose amax was not finite (those groups decode to NaN).
int64_t quantize(const float* x, int64_t rows, int64_t cols, Granularity g, QuantParams p,
                 uint8_t* q, float* s);
int64_t quantize_bf16(const uint16_t* x, int64_t rows, int64_t cols, Granularity g, QuantParams p,
                      uint8_t* q, float* s);

// 128x1 quantization written transposed: qt[C][R] with the 128x1 scale array (= 1x128 of X^T).
// This is the Wgrad operand layout (FP8.md §2.5).
int64_t quantize_128x1_transposed(const float* x, int64_t rows, int64_t cols, QuantParams p,
                                  uint8_t* qt, float* s);

// x'[R][C] = f32(decode(q) * s) for the group of each element.
void dequantize(const uint8_t* q, const float* s, int64_t rows, int64_t cols, Granularity g,
                Fp8Format fmt, float* out);

// E5M6 (fp8_codec.h) 1x128 with power-of-two scales (DeepSeek-V3's attention-output cache, TR
// §3.3.3): X[R][C] (fp32 or bf16 bits) into e5m6_bytes(R*C) packed bytes and 1x128 scales in the
// layout above, amax and scale as quantize() with fmax 65024. Returns the non-finite groups (their
// scale is NaN and their codes 0x7FF). dequantize_e5m6 is the inverse: f32(decode(code) * s).
int64_t quantize_e5m6(const float* x, int64_t rows, int64_t cols, uint8_t* packed, float* s);
int64_t quantize_e5m6_bf16(const uint16_t* x, int64_t rows, int64_t cols, uint8_t* packed,
                           float* s);
void dequantize_e5m6(const uint8_t* packed, const float* s, int64_t rows, int64_t cols, float* out);

// Exact transpose of a 128x128-quantized tensor: bytes and block scales (FP8.md §1.4, Dgrad).
void transpose_128x128(const uint8_t* q, const float* s, int64_t rows, int64_t cols, uint8_t* qt,
                       float* st);

}  // namespace fp8pipe::kernels
