// Fused FP8 quantize / dequantize / transpose kernels for Hopper, bit-identical to the CPU
// reference in kernels/cpu/quantize.h (same amax NaN policy, scale math and scale layouts), so the
// CUDA backend can be checked against the CPU one byte for byte. Host-includable (no device code).
//
// All pointers are device pointers; every call is asynchronous on `stream`. `nonfinite` (nullable)
// is a device int that each group whose amax is NaN/Inf increments (atomicAdd): the caller zeroes
// it and reads it back when it wants the count the CPU quantize() returns. Scale layouts
// (FP8.md §3.2, see quantize.h): 1x128 s[kb*R+r]; 128x1 s[rb*C+c]; 128x128 s[rb*pad4(KB)+kb]
// (padding slots written as 0); per-tensor s[0].
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cpu/quantize.h"
#include "kernels/cuda/cuda_check.h"

namespace fp8pipe::kernels::gpu {

// Quantize X[rows][cols] (fp32, or bf16 bits) at granularity g into q[rows][cols] and s.
// Per-tensor is a memset + three launches (amax, encode, finalize) using s[0] as the amax scratch.
Result quantize(const float* x, int64_t rows, int64_t cols, Granularity g, QuantParams p,
                uint8_t* q, float* s, int* nonfinite, cudaStream_t stream);
Result quantize_bf16(const uint16_t* x, int64_t rows, int64_t cols, Granularity g, QuantParams p,
                     uint8_t* q, float* s, int* nonfinite, cudaStream_t stream);

// 128x1 quantization written transposed, qt[cols][rows] with s[rb*cols+c] (the Wgrad operand:
// 1x128 along the token dimension of X^T).
Result quantize_128x1_transposed(const float* x, int64_t rows, int64_t cols, QuantParams p,
                                 uint8_t* qt, float* s, int* nonfinite, cudaStream_t stream);
Result quantize_128x1_transposed_bf16(const uint16_t* x, int64_t rows, int64_t cols, QuantParams p,
                                      uint8_t* qt, float* s, int* nonfinite, cudaStream_t stream);

// out[r][c] = f32(decode(q[r][c]) * s[group(r,c)]).
Result dequantize(const uint8_t* q, const float* s, int64_t rows, int64_t cols, Granularity g,
                  Fp8Format fmt, float* out, cudaStream_t stream);

// Exact transpose of a 128x128-quantized tensor: qt[cols][rows] and st (block scales transposed,
// padded layout of the transposed shape, padding written as 0).
Result transpose_128x128(const uint8_t* q, const float* s, int64_t rows, int64_t cols, uint8_t* qt,
                         float* st, cudaStream_t stream);

}  // namespace fp8pipe::kernels::gpu
