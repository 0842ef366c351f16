// FP8 GEMM with fine-grained scales on the CPU, in the row-major "NT" form every training GEMM
// reduces to (FP8.md §2.5):   out[M][N] = sum_k A[m][k] * B[n][k]   (A, B K-contiguous).
//   Fprop  Y  = X . W^T    A = X  (1x128),          B = W   (128x128)
//   Dgrad  dX = dY . W     A = dY (1x128),          B = W^T (128x128, exact byte+scale transpose)
//   Wgrad  dW = dY^T . X   A = dY^T (1x128 along M), B = X^T (1x128 along M)
// Two modes (DESIGN.md §4): kFast dequantizes exactly and calls BLAS (fp32 accumulation); kExact
// runs FP8.md §2.4's tensor-core accumulation model, bit-identical to cuBLASLt 13.1 with splitK=1.
// Mapping to cuBLASLt: our A is cuBLASLt's B operand (n rows), our B is cuBLASLt's A (m rows).
#pragma once

#include <cstdint>

#include "kernels/cpu/quantize.h"

namespace fp8pipe::kernels {

enum class GemmMode : uint8_t { kFast, kExact };

// One FP8 operand X[rows][K]; scales in the layout of quantize.h for its granularity, which must be
// k1x128 (per row per 128 of K), k128x128 or kPerTensor.
struct Fp8Operand {
  const uint8_t* q = nullptr;
  const float* s = nullptr;
  Granularity gran = Granularity::k1x128;
  Fp8Format fmt = Fp8Format::kE4M3;
};

// Writes out[M][N] as fp32 (out_f32) or as bf16 bits rounded RNE from the fp32 accumulator
// (out_bf16); exactly one of the two is non-null. 128x128 x 128x128 is rejected (returns false),
// as in cuBLASLt.
bool fp8_gemm(const Fp8Operand& a, const Fp8Operand& b, int64_t M, int64_t N, int64_t K,
              GemmMode mode, float* out_f32, uint16_t* out_bf16);

// The §2.4 block partial of one 32-element tensor-core step, exposed for tests: c' from c and 32
// code pairs (a_t, b_t).
float tc_step(float c, const uint8_t* a, const uint8_t* b, int n, Fp8Format fa, Fp8Format fb);

}  // namespace fp8pipe::kernels
