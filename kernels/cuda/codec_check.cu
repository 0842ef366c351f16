// Exhaustive device-side check of kernels/cpu/fp8_codec.h against CUDA's own conversions over
// float bit patterns (FP8.md §4: "checked exhaustively over all 2^32 float inputs on the GPU"),
// and a dump of CUDA's results so the test can compare the host-compiled codec too.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cpu/fp8_codec.h"
#include "kernels/cuda/codec_check.h"

namespace fp8pipe::kernels::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 132 * 16;

// CUDA's conversions of one input, in CodecConv order.
__device__ __forceinline__ void cuda_convert(float x, uint8_t f8[4], uint16_t* bf) {
  f8[kE4M3Sat] = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
  f8[kE4M3NoSat] = __nv_cvt_float_to_fp8(x, __NV_NOSAT, __NV_E4M3);
  f8[kE5M2Sat] = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2);
  f8[kE5M2NoSat] = __nv_cvt_float_to_fp8(x, __NV_NOSAT, __NV_E5M2);
  *bf = __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

__global__ void __launch_bounds__(kThreads)
    codec_check_kernel(uint64_t begin, uint64_t n, CodecCounts* counts) {
  __shared__ unsigned long long block_count[kNumCodecConv];
  if (threadIdx.x < kNumCodecConv) block_count[threadIdx.x] = 0;
  __syncthreads();
  unsigned int local[kNumCodecConv] = {0, 0, 0, 0, 0};
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kThreads;
  for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += stride) {
    const uint64_t bits = begin + i;
    const float x = __uint_as_float(static_cast<uint32_t>(bits));
    uint8_t ref[4];
    uint16_t ref_bf;
    cuda_convert(x, ref, &ref_bf);
    const uint8_t ours[4] = {
        float_to_fp8(x, Fp8Format::kE4M3, true), float_to_fp8(x, Fp8Format::kE4M3, false),
        float_to_fp8(x, Fp8Format::kE5M2, true), float_to_fp8(x, Fp8Format::kE5M2, false)};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (ours[j] != ref[j]) {
        ++local[j];
        atomicMin(&counts->first[j], static_cast<unsigned long long>(bits));
      }
    }
    if (float_to_bf16(x) != ref_bf) {
      ++local[kBf16];
      atomicMin(&counts->first[kBf16], static_cast<unsigned long long>(bits));
    }
  }
#pragma unroll
  for (int j = 0; j < kNumCodecConv; ++j) {
    if (local[j]) atomicAdd(&block_count[j], static_cast<unsigned long long>(local[j]));
  }
  __syncthreads();
  if (threadIdx.x < kNumCodecConv && block_count[threadIdx.x]) {
    atomicAdd(&counts->count[threadIdx.x], block_count[threadIdx.x]);
  }
}

__global__ void __launch_bounds__(kThreads)
    codec_convert_kernel(uint64_t begin, uint64_t n, uint32_t* fp8x4, uint16_t* bf16) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kThreads;
  for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += stride) {
    uint8_t f8[4];
    cuda_convert(__uint_as_float(static_cast<uint32_t>(begin + i)), f8, &bf16[i]);
    fp8x4[i] = f8[0] | (uint32_t{f8[1]} << 8) | (uint32_t{f8[2]} << 16) | (uint32_t{f8[3]} << 24);
  }
}

__global__ void codec_reset_kernel(CodecCounts* c) {
  if (threadIdx.x < kNumCodecConv) {
    c->count[threadIdx.x] = 0;
    c->first[threadIdx.x] = ~0ull;
  }
}

__device__ __forceinline__ bool same_float(float a, float b) {
  if (a != a && b != b) return true;  // any NaN equals any NaN (FP8.md §4)
  return __float_as_uint(a) == __float_as_uint(b);
}

// Thread i: code i & 255, format i >> 8.
__global__ void codec_decode_kernel(unsigned long long* mismatches) {
  const int i = threadIdx.x;
  const uint8_t code = static_cast<uint8_t>(i & 255);
  const bool e4 = i < 256;
  const __half_raw h = __nv_cvt_fp8_to_halfraw(code, e4 ? __NV_E4M3 : __NV_E5M2);
  const float hw = __half2float(__half(h));
  const float ours = fp8_to_float(code, e4 ? Fp8Format::kE4M3 : Fp8Format::kE5M2);
  if (!same_float(hw, ours)) atomicAdd(mismatches, 1ull);
}

int grid_for(uint64_t n) {
  return static_cast<int>(std::min<uint64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

}  // namespace

Result codec_counts_reset(CodecCounts* d_counts, cudaStream_t stream) {
  codec_reset_kernel<<<1, 32, 0, stream>>>(d_counts);
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}

Result codec_check_device(uint64_t begin, uint64_t n, CodecCounts* d_counts, cudaStream_t stream) {
  FP8PIPE_REQUIRE(begin + n <= (uint64_t{1} << 32), "codec_check_device: range beyond 2^32");
  if (n == 0) return Result::Ok();
  codec_check_kernel<<<grid_for(n), kThreads, 0, stream>>>(begin, n, d_counts);
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}

Result codec_cuda_convert(uint64_t begin, uint64_t n, uint32_t* fp8x4, uint16_t* bf16,
                          cudaStream_t stream) {
  FP8PIPE_REQUIRE(begin + n <= (uint64_t{1} << 32), "codec_cuda_convert: range beyond 2^32");
  if (n == 0) return Result::Ok();
  codec_convert_kernel<<<grid_for(n), kThreads, 0, stream>>>(begin, n, fp8x4, bf16);
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}

Result codec_check_decode(unsigned long long* d_mismatches, cudaStream_t stream) {
  codec_decode_kernel<<<1, 512, 0, stream>>>(d_mismatches);
  FP8PIPE_CUDA_LAUNCH_CHECK();
  return Result::Ok();
}

}  // namespace fp8pipe::kernels::gpu
