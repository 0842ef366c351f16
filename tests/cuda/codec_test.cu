// Exhaustive conversion checks on the GPU (FP8.md §4): all 2^32 float inputs through CUDA's
// __nv_cvt_float_to_fp8 (E4M3/E5M2 x SATFINITE/NOSAT) and __float2bfloat16_rn, compared with
// fp8_codec.h on the device and with the same header compiled for the host; all 256 decodes.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <thread>
#include <vector>

#include "kernels/cpu/fp8_codec.h"
#include "kernels/cuda/codec_check.h"
#include "tests/cuda/cuda_test_util.h"

namespace fp8pipe::kernels::gpu {
namespace {

using testing::DevBuf;
constexpr uint64_t kAll = uint64_t{1} << 32;
const char* const kNames[kNumCodecConv] = {"e4m3 satfinite", "e4m3 nosat", "e5m2 satfinite",
                                           "e5m2 nosat", "bf16 rn"};

TEST(CudaCodec, DeviceCodecEqualsCudaIntrinsicsOnAll2p32Inputs) {
  DevBuf<CodecCounts> d(1);
  ASSERT_GPU_OK(codec_counts_reset(d.get(), nullptr));
  constexpr uint64_t kChunk = uint64_t{1} << 30;
  for (uint64_t b = 0; b < kAll; b += kChunk)
    ASSERT_GPU_OK(codec_check_device(b, kChunk, d.get(), nullptr));
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  CodecCounts h{};
  ASSERT_CUDA_OK(d.download(&h, 1));
  for (int j = 0; j < kNumCodecConv; ++j) {
    EXPECT_EQ(h.count[j], 0u) << kNames[j] << ": first mismatching input bits 0x" << std::hex
                              << h.first[j];
  }
}

TEST(CudaCodec, DecodeOfAll256CodesEqualsHardware) {
  DevBuf<unsigned long long> d(1);
  ASSERT_CUDA_OK(d.fill_bytes(0));
  ASSERT_GPU_OK(codec_check_decode(d.get(), nullptr));
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  unsigned long long h = 1;
  ASSERT_CUDA_OK(d.download(&h, 1));
  EXPECT_EQ(h, 0u);
}

// CUDA's results are copied to the host in chunks (double-buffered: the GPU converts chunk c while
// the host threads check chunk c-1) and compared with the host build of fp8_codec.h.
TEST(CudaCodec, HostCodecEqualsCudaIntrinsicsOnAll2p32Inputs) {
  constexpr uint64_t kChunk = uint64_t{1} << 26;
  DevBuf<uint32_t> d8(kChunk);
  DevBuf<uint16_t> d16(kChunk);
  ASSERT_NE(d8.get(), nullptr);
  ASSERT_NE(d16.get(), nullptr);
  uint32_t* h8[2] = {nullptr, nullptr};
  uint16_t* h16[2] = {nullptr, nullptr};
  cudaEvent_t done[2];
  for (int i = 0; i < 2; ++i) {
    ASSERT_CUDA_OK(cudaMallocHost(&h8[i], kChunk * sizeof(uint32_t)));
    ASSERT_CUDA_OK(cudaMallocHost(&h16[i], kChunk * sizeof(uint16_t)));
    ASSERT_CUDA_OK(cudaEventCreate(&done[i]));
  }
  const unsigned nt = std::max(1u, std::thread::hardware_concurrency());
  std::array<uint64_t, kNumCodecConv> count{}, first;
  first.fill(~0ull);
  auto check = [&](uint64_t begin, int buf) {
    std::vector<std::array<uint64_t, kNumCodecConv>> tc(nt), tf(nt);
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < nt; ++t) {
      pool.emplace_back([&, t] {
        tc[t].fill(0);
        tf[t].fill(~0ull);
        const uint64_t i0 = kChunk * t / nt, i1 = kChunk * (t + 1) / nt;
        for (uint64_t i = i0; i < i1; ++i) {
          const uint32_t u = static_cast<uint32_t>(begin + i);
          const float x = bits_f32(u);
          const uint32_t w = h8[buf][i];
          const uint8_t ours[4] = {
              float_to_fp8(x, Fp8Format::kE4M3, true), float_to_fp8(x, Fp8Format::kE4M3, false),
              float_to_fp8(x, Fp8Format::kE5M2, true), float_to_fp8(x, Fp8Format::kE5M2, false)};
          for (int j = 0; j < 4; ++j) {
            if (ours[j] != ((w >> (8 * j)) & 0xFF)) {
              ++tc[t][j];
              tf[t][j] = std::min<uint64_t>(tf[t][j], u);
            }
          }
          if (float_to_bf16(x) != h16[buf][i]) {
            ++tc[t][kBf16];
            tf[t][kBf16] = std::min<uint64_t>(tf[t][kBf16], u);
          }
        }
      });
    }
    for (auto& th : pool) th.join();
    for (unsigned t = 0; t < nt; ++t) {
      for (int j = 0; j < kNumCodecConv; ++j) {
        count[j] += tc[t][j];
        first[j] = std::min(first[j], tf[t][j]);
      }
    }
  };
  const uint64_t chunks = kAll / kChunk;
  for (uint64_t c = 0; c <= chunks; ++c) {
    if (c < chunks) {
      const int b = static_cast<int>(c % 2);
      ASSERT_GPU_OK(codec_cuda_convert(c * kChunk, kChunk, d8.get(), d16.get(), nullptr));
      ASSERT_CUDA_OK(cudaMemcpyAsync(h8[b], d8.get(), kChunk * 4, cudaMemcpyDeviceToHost, nullptr));
      ASSERT_CUDA_OK(
          cudaMemcpyAsync(h16[b], d16.get(), kChunk * 2, cudaMemcpyDeviceToHost, nullptr));
      ASSERT_CUDA_OK(cudaEventRecord(done[b], nullptr));
    }
    if (c > 0) {
      const int b = static_cast<int>((c - 1) % 2);
      ASSERT_CUDA_OK(cudaEventSynchronize(done[b]));
      check((c - 1) * kChunk, b);
    }
  }
  for (int i = 0; i < 2; ++i) {
    cudaFreeHost(h8[i]);
    cudaFreeHost(h16[i]);
    cudaEventDestroy(done[i]);
  }
  for (int j = 0; j < kNumCodecConv; ++j) {
    EXPECT_EQ(count[j], 0u) << kNames[j] << ": first mismatching input bits 0x" << std::hex
                            << first[j];
  }
}

}  // namespace
}  // namespace fp8pipe::kernels::gpu
