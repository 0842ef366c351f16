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

// Row groups as the kernels read them (RowGroups::dev in core/backend.h): group g of n is rows
// off[g] .. off[g+1]; tiles[g] counts the 128-row tiles of the groups before g. off == nullptr
// means no groups (one group of all rows).
struct GroupsDev {
  const int32_t* off = nullptr;
  const int32_t* tiles = nullptr;
  int n = 0;
};

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

// Batched 128x128 (a MoE layer's expert weights in one launch): `count` fp32 tensors of one
// [rows][cols] shape (xs: a device table of their pointers, host_xs the same pointers on the
// host), tensor z's codes at q + z*rows*cols and scales at s + z*scale_count(128x128, rows, cols),
// each bit-identical to quantize() of that tensor; and `count` exact transposes of such stacked
// tensors into stacked [cols][rows] (transpose_128x128 of each).
Result quantize_128x128_batch(const float* const* xs, const float* const* host_xs, int64_t count,
                              int64_t rows, int64_t cols, QuantParams p, uint8_t* q, float* s,
                              int* nonfinite, cudaStream_t stream);
Result transpose_128x128_batch(const uint8_t* q, const float* s, int64_t count, int64_t rows,
                               int64_t cols, uint8_t* qt, float* st, cudaStream_t stream);

// Grouped variants (the MoE experts in one launch), each group bit-identical to the plain kernel
// on its rows alone: 1x128 with each group's scales in the VEC128 layout of its own rows at
// s[off[g] * ceil(cols / 128)]; 128x1 transposed with group g's qt [cols][n_g] at qt[cols *
// off[g]] and its scales at s[cols * tiles[g]] (`tiles`: the groups' tile count); dequantize of the
// 1x128 layout.
Result quantize_1x128_groups(const float* x, int64_t rows, int64_t cols, GroupsDev groups,
                             QuantParams p, uint8_t* q, float* s, int* nonfinite,
                             cudaStream_t stream);
Result quantize_128x1_transposed_groups(const float* x, int64_t rows, int64_t cols,
                                        GroupsDev groups, int64_t tiles, QuantParams p, uint8_t* qt,
                                        float* s, int* nonfinite, cudaStream_t stream);
// quantize_128x1_transposed_groups of dequantize_1x128_groups(q, s) in one pass (the fp32
// values live only in shared memory): bit-identical to the two calls.
Result requantize_128x1_transposed_groups(const uint8_t* q, const float* s, Fp8Format in_fmt,
                                          int64_t rows, int64_t cols, GroupsDev groups,
                                          int64_t tiles, QuantParams p, uint8_t* qt, float* so,
                                          cudaStream_t stream);
// Backend::gather_fp8_groups: rows of a 1x128-quantized [n][K] (codes q, scales s in the
// grouped VEC128 layout of in_groups) into the grouped layout of quantize_1x128_groups; output
// row j takes q's row rows[i], i = pad ? pad[j] : j, or zeros (codes 0, scale zero_scale) where
// i < 0.
Result gather_fp8_rows(const uint8_t* q, const float* s, int64_t n, int64_t K, GroupsDev in_groups,
                       const int32_t* rows, const int32_t* pad, int64_t M, GroupsDev groups,
                       float zero_scale, uint8_t* out, float* so, cudaStream_t stream);
// The same for one 1x128-quantized tensor: quantize_128x1_transposed(dequantize(q, s)).
Result requantize_128x1_transposed(const uint8_t* q, const float* s, Fp8Format in_fmt, int64_t rows,
                                   int64_t cols, QuantParams p, uint8_t* qt, float* so,
                                   int* nonfinite, cudaStream_t stream);
Result dequantize_1x128_groups(const uint8_t* q, const float* s, int64_t rows, int64_t cols,
                               GroupsDev groups, Fp8Format fmt, float* out, cudaStream_t stream);

// E5M6 1x128 with power-of-two scales (kernels/cpu/quantize.h quantize_e5m6, bit-identical):
// packed codes (e5m6_bytes(rows * cols) bytes) and s[kb*rows+r]; and its inverse.
Result quantize_e5m6(const float* x, int64_t rows, int64_t cols, uint8_t* packed, float* s,
                     int* nonfinite, cudaStream_t stream);
Result quantize_e5m6_bf16(const uint16_t* x, int64_t rows, int64_t cols, uint8_t* packed, float* s,
                          int* nonfinite, cudaStream_t stream);
Result dequantize_e5m6(const uint8_t* packed, const float* s, int64_t rows, int64_t cols,
                       float* out, cudaStream_t stream);

// Exact transpose of a 128x128-quantized tensor: qt[cols][rows] and st (block scales transposed,
// padded layout of the transposed shape, padding written as 0).
Result transpose_128x128(const uint8_t* q, const float* s, int64_t rows, int64_t cols, uint8_t* qt,
                         float* st, cudaStream_t stream);

}  // namespace fp8pipe::kernels::gpu
