// Exhaustive GPU check of the conversion contract (FP8.md §4): CUDA's own conversions
// (__nv_cvt_float_to_fp8 E4M3/E5M2 x SATFINITE/NOSAT, __float2bfloat16_rn, FP8 decode) against
// kernels/cpu/fp8_codec.h compiled for the device, plus a dump of CUDA's results for host checks.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cuda/cuda_check.h"

namespace fp8pipe::kernels::gpu {

// The five float32 conversions compared, in this order everywhere.
enum CodecConv : int { kE4M3Sat = 0, kE4M3NoSat, kE5M2Sat, kE5M2NoSat, kBf16, kNumCodecConv };

// Device result block: mismatch counts and the smallest mismatching input bit pattern per
// conversion (0xFFFFFFFF'FFFFFFFF when none). Zero `count` and set `first` to all-ones first
// (codec_counts_reset does both).
struct CodecCounts {
  unsigned long long count[kNumCodecConv];
  unsigned long long first[kNumCodecConv];
};
Result codec_counts_reset(CodecCounts* d_counts, cudaStream_t stream);

// Float bit patterns [begin, begin + n) (begin + n <= 2^32): CUDA intrinsic vs fp8_codec.h on
// the device; mismatches accumulate into *d_counts.
Result codec_check_device(uint64_t begin, uint64_t n, CodecCounts* d_counts, cudaStream_t stream);

// CUDA intrinsic results for bit patterns [begin, begin + n): fp8x4[i] holds the four FP8 codes
// of input begin+i (byte j = conversion j of CodecConv), bf16[i] the bf16 bits.
Result codec_cuda_convert(uint64_t begin, uint64_t n, uint32_t* fp8x4, uint16_t* bf16,
                          cudaStream_t stream);

// All 256 codes of E4M3 and E5M2: hardware decode (cvt f16x2 <- e4m3x2/e5m2x2, then f32) vs
// fp8_to_float; counts mismatches (any NaN equals any NaN) into *d_mismatches (zero it first).
Result codec_check_decode(unsigned long long* d_mismatches, cudaStream_t stream);

}  // namespace fp8pipe::kernels::gpu
