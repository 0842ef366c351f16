// CUDA quantize / dequantize / transpose kernels against the CPU reference (kernels/cpu/quantize.h)
// byte for byte: codes, scale bits (NaN == NaN) and the non-finite group count, over fp32 and bf16
// inputs, E4M3/E5M2, pow2/FP32 scales, every granularity and shapes with partial tiles, odd widths
// (scalar paths) and misaligned pointers.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cpu/quantize.h"
#include "kernels/cuda/quantize.cuh"
#include "tests/cuda/cuda_test_util.h"

namespace fp8pipe::kernels::gpu {
namespace {

using testing::DevBuf;

struct Shape {
  int64_t rows, cols;
};
const Shape kShapes[] = {{1, 128},   {3, 200},    {128, 128},  {130, 260},  {257, 1000},
                         {64, 7168}, {512, 2048}, {129, 1001}, {1000, 136}, {5, 13}};

const char* gname(Granularity g) {
  switch (g) {
    case Granularity::k1x128:
      return "1x128";
    case Granularity::k128x1:
      return "128x1";
    case Granularity::k128x128:
      return "128x128";
    case Granularity::kPerTensor:
      return "tensor";
  }
  return "?";
}

std::string label(Shape s, Granularity g, QuantParams p, bool bf16, int64_t off = 0) {
  return std::to_string(s.rows) + "x" + std::to_string(s.cols) + " " + gname(g) +
         (p.fmt == Fp8Format::kE4M3 ? " e4m3" : " e5m2") + (p.pow2 ? " pow2" : " fp32scale") +
         (bf16 ? " bf16" : " f32") + (off ? " offset" + std::to_string(off) : "");
}

void expect_same_scales(const std::vector<float>& want, const std::vector<float>& got,
                        const std::string& what) {
  ASSERT_EQ(want.size(), got.size());
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!testing::same_bits_nan_eq(want[i], got[i]) && bad++ < 5) {
      ADD_FAILURE() << what << ": scale[" << i << "] cpu " << want[i] << " gpu " << got[i];
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

void expect_same_bytes(const std::vector<uint8_t>& want, const std::vector<uint8_t>& got,
                       const std::string& what) {
  ASSERT_EQ(want.size(), got.size());
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (want[i] != got[i] && bad++ < 5) {
      ADD_FAILURE() << what << ": code[" << i << "] cpu 0x" << std::hex << int{want[i]} << " gpu 0x"
                    << int{got[i]};
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

// One case: CPU quantize vs GPU quantize. `off` elements of pointer offset (misaligned input).
void check_case(Shape sh, Granularity g, QuantParams p, bool bf16, const std::vector<float>& x,
                int64_t off = 0) {
  const std::string what = label(sh, g, p, bf16, off);
  const int64_t n = sh.rows * sh.cols, ns = scale_count(g, sh.rows, sh.cols);
  std::vector<uint8_t> q_cpu(n), q_gpu(n);
  std::vector<float> s_cpu(ns), s_gpu(ns);
  std::vector<uint16_t> xb = testing::to_bf16(x);
  const int64_t bad_cpu =
      bf16 ? kernels::quantize_bf16(xb.data(), sh.rows, sh.cols, g, p, q_cpu.data(), s_cpu.data())
           : kernels::quantize(x.data(), sh.rows, sh.cols, g, p, q_cpu.data(), s_cpu.data());
  DevBuf<float> dx(n + off);
  DevBuf<uint16_t> dxb(n + off);
  DevBuf<uint8_t> dq(n);
  DevBuf<float> ds(ns);
  DevBuf<int> dbad(1);
  ASSERT_CUDA_OK(dq.fill_bytes(0xCD));  // poison: every code must be written
  ASSERT_CUDA_OK(ds.fill_bytes(0xCD));
  ASSERT_CUDA_OK(dbad.fill_bytes(0));
  if (bf16) {
    ASSERT_CUDA_OK(cudaMemcpy(dxb.get() + off, xb.data(), n * 2, cudaMemcpyHostToDevice));
    ASSERT_GPU_OK(quantize_bf16(dxb.get() + off, sh.rows, sh.cols, g, p, dq.get(), ds.get(),
                                dbad.get(), nullptr));
  } else {
    ASSERT_CUDA_OK(cudaMemcpy(dx.get() + off, x.data(), n * 4, cudaMemcpyHostToDevice));
    ASSERT_GPU_OK(
        quantize(dx.get() + off, sh.rows, sh.cols, g, p, dq.get(), ds.get(), dbad.get(), nullptr));
  }
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  ASSERT_CUDA_OK(dq.download(q_gpu.data(), n));
  ASSERT_CUDA_OK(ds.download(s_gpu.data(), ns));
  int bad_gpu = -1;
  ASSERT_CUDA_OK(dbad.download(&bad_gpu, 1));
  expect_same_bytes(q_cpu, q_gpu, what);
  expect_same_scales(s_cpu, s_gpu, what);
  EXPECT_EQ(bad_cpu, bad_gpu) << what;
}

constexpr Granularity kGrans[] = {Granularity::k1x128, Granularity::k128x1, Granularity::k128x128,
                                  Granularity::kPerTensor};

TEST(CudaQuantize, MatchesCpuBitwiseAllGranularitiesShapesModes) {
  uint32_t seed = 1;
  for (const Shape sh : kShapes) {
    const auto x = testing::random_wide(sh.rows * sh.cols, seed++);
    for (Granularity g : kGrans) {
      for (Fp8Format f : {Fp8Format::kE4M3, Fp8Format::kE5M2}) {
        for (bool pow2 : {true, false}) {
          for (bool bf16 : {false, true}) check_case(sh, g, {f, pow2}, bf16, x);
        }
      }
    }
  }
}

TEST(CudaQuantize, MisalignedInputTakesScalarPathAndStillMatches) {
  const Shape sh{130, 256};
  const auto x = testing::random_wide(sh.rows * sh.cols, 77);
  for (Granularity g : kGrans) {
    check_case(sh, g, {Fp8Format::kE4M3, true}, false, x, 1);
    check_case(sh, g, {Fp8Format::kE4M3, false}, true, x, 3);
  }
}

TEST(CudaQuantize, NonFiniteGroupsAreCountedAndGiveNaNScales) {
  const Shape sh{256, 384};
  auto x = testing::random_wide(sh.rows * sh.cols, 5);
  x[3] = std::numeric_limits<float>::quiet_NaN();
  x[200 * 384 + 300] = std::numeric_limits<float>::infinity();
  x[201 * 384 + 5] = -std::numeric_limits<float>::infinity();
  x[7 * 384 + 130] = -std::numeric_limits<float>::quiet_NaN();
  for (Granularity g : kGrans) {
    for (bool bf16 : {false, true}) check_case(sh, g, {Fp8Format::kE4M3, true}, bf16, x);
  }
}

TEST(CudaQuantize, ExtremeMagnitudes) {
  const Shape sh{128, 256};
  std::vector<float> x(sh.rows * sh.cols);
  for (int64_t i = 0; i < static_cast<int64_t>(x.size()); ++i) {
    const int64_t r = i / sh.cols;
    const float base = std::ldexp(1.0f + (i % 7) / 8.0f, static_cast<int>(r % 64) * 4 - 140);
    x[i] = (i % 3 == 0 ? -base : base);
    if (r == 5) x[i] = 0.0f;                                                  // all-zero groups
    if (r == 6) x[i] = std::numeric_limits<float>::max() * (i % 2 ? 1 : -1);  // huge
  }
  for (Granularity g : kGrans) {
    for (Fp8Format f : {Fp8Format::kE4M3, Fp8Format::kE5M2}) {
      for (bool pow2 : {true, false}) check_case(sh, g, {f, pow2}, false, x);
    }
  }
}

// 128x1 written transposed (Wgrad operand): fp32 vs quantize_128x1_transposed; bf16 vs the CPU
// 128x1 quantize of the bf16 input with its codes transposed on the host.
TEST(CudaQuantize, Transposed128x1MatchesCpu) {
  const Shape shapes[] = {{128, 64},    {256, 512},  {200, 136}, {130, 70},
                          {1000, 1001}, {4096, 256}, {17, 3}};
  uint32_t seed = 100;
  for (const Shape sh : shapes) {
    const auto x = testing::random_wide(sh.rows * sh.cols, seed++);
    const auto xb = testing::to_bf16(x);
    const int64_t n = sh.rows * sh.cols, ns = scale_count(Granularity::k128x1, sh.rows, sh.cols);
    for (Fp8Format f : {Fp8Format::kE4M3, Fp8Format::kE5M2}) {
      for (bool pow2 : {true, false}) {
        const QuantParams p{f, pow2};
        for (bool bf16 : {false, true}) {
          const std::string what = label(sh, Granularity::k128x1, p, bf16) + " transposed";
          std::vector<uint8_t> qt_cpu(n), q_tmp(n), qt_gpu(n);
          std::vector<float> s_cpu(ns), s_gpu(ns);
          int64_t bad_cpu;
          if (bf16) {
            bad_cpu = kernels::quantize_bf16(xb.data(), sh.rows, sh.cols, Granularity::k128x1, p,
                                             q_tmp.data(), s_cpu.data());
            for (int64_t r = 0; r < sh.rows; ++r) {
              for (int64_t c = 0; c < sh.cols; ++c)
                qt_cpu[c * sh.rows + r] = q_tmp[r * sh.cols + c];
            }
          } else {
            bad_cpu = kernels::quantize_128x1_transposed(x.data(), sh.rows, sh.cols, p,
                                                         qt_cpu.data(), s_cpu.data());
          }
          DevBuf<float> dx(n);
          DevBuf<uint16_t> dxb(n);
          DevBuf<uint8_t> dq(n);
          DevBuf<float> ds(ns);
          DevBuf<int> dbad(1);
          ASSERT_CUDA_OK(dq.fill_bytes(0xCD));
          ASSERT_CUDA_OK(ds.fill_bytes(0xCD));
          ASSERT_CUDA_OK(dbad.fill_bytes(0));
          if (bf16) {
            ASSERT_CUDA_OK(dxb.upload(xb));
            ASSERT_GPU_OK(quantize_128x1_transposed_bf16(dxb.get(), sh.rows, sh.cols, p, dq.get(),
                                                         ds.get(), dbad.get(), nullptr));
          } else {
            ASSERT_CUDA_OK(dx.upload(x));
            ASSERT_GPU_OK(quantize_128x1_transposed(dx.get(), sh.rows, sh.cols, p, dq.get(),
                                                    ds.get(), dbad.get(), nullptr));
          }
          ASSERT_CUDA_OK(cudaDeviceSynchronize());
          ASSERT_CUDA_OK(dq.download(qt_gpu.data(), n));
          ASSERT_CUDA_OK(ds.download(s_gpu.data(), ns));
          int bad_gpu = -1;
          ASSERT_CUDA_OK(dbad.download(&bad_gpu, 1));
          expect_same_bytes(qt_cpu, qt_gpu, what);
          expect_same_scales(s_cpu, s_gpu, what);
          EXPECT_EQ(bad_cpu, bad_gpu) << what;
        }
      }
    }
  }
}

TEST(CudaQuantize, DequantizeMatchesCpu) {
  const Shape shapes[] = {{130, 260}, {256, 1024}, {5, 13}, {129, 1001}};
  uint32_t seed = 300;
  for (const Shape sh : shapes) {
    auto x = testing::random_wide(sh.rows * sh.cols, seed++);
    x[0] = std::numeric_limits<float>::quiet_NaN();  // a NaN group decodes to NaN
    const int64_t n = sh.rows * sh.cols;
    for (Granularity g : kGrans) {
      for (Fp8Format f : {Fp8Format::kE4M3, Fp8Format::kE5M2}) {
        const int64_t ns = scale_count(g, sh.rows, sh.cols);
        std::vector<uint8_t> q(n);
        std::vector<float> s(ns), out_cpu(n), out_gpu(n);
        kernels::quantize(x.data(), sh.rows, sh.cols, g, {f, false}, q.data(), s.data());
        kernels::dequantize(q.data(), s.data(), sh.rows, sh.cols, g, f, out_cpu.data());
        DevBuf<uint8_t> dq(n);
        DevBuf<float> ds(ns), dout(n);
        ASSERT_CUDA_OK(dq.upload(q));
        ASSERT_CUDA_OK(ds.upload(s));
        ASSERT_CUDA_OK(dout.fill_bytes(0xCD));
        ASSERT_GPU_OK(dequantize(dq.get(), ds.get(), sh.rows, sh.cols, g, f, dout.get(), nullptr));
        ASSERT_CUDA_OK(cudaDeviceSynchronize());
        ASSERT_CUDA_OK(dout.download(out_gpu.data(), n));
        expect_same_scales(out_cpu, out_gpu, label(sh, g, {f, false}, false) + " dequantize");
      }
    }
  }
}

TEST(CudaQuantize, Transpose128x128MatchesCpu) {
  const Shape shapes[] = {{128, 128}, {300, 520}, {7, 1000}, {1024, 640}};
  uint32_t seed = 400;
  for (const Shape sh : shapes) {
    const auto x = testing::random_wide(sh.rows * sh.cols, seed++);
    const int64_t n = sh.rows * sh.cols;
    const int64_t ns = scale_count(Granularity::k128x128, sh.rows, sh.cols);
    const int64_t nst = scale_count(Granularity::k128x128, sh.cols, sh.rows);
    std::vector<uint8_t> q(n), qt_cpu(n), qt_gpu(n);
    std::vector<float> s(ns), st_cpu(nst), st_gpu(nst);
    kernels::quantize(x.data(), sh.rows, sh.cols, Granularity::k128x128, {}, q.data(), s.data());
    kernels::transpose_128x128(q.data(), s.data(), sh.rows, sh.cols, qt_cpu.data(), st_cpu.data());
    DevBuf<uint8_t> dq(n), dqt(n);
    DevBuf<float> ds(ns), dst(nst);
    ASSERT_CUDA_OK(dq.upload(q));
    ASSERT_CUDA_OK(ds.upload(s));
    ASSERT_CUDA_OK(dqt.fill_bytes(0xCD));
    ASSERT_CUDA_OK(dst.fill_bytes(0xCD));
    ASSERT_GPU_OK(
        transpose_128x128(dq.get(), ds.get(), sh.rows, sh.cols, dqt.get(), dst.get(), nullptr));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    ASSERT_CUDA_OK(dqt.download(qt_gpu.data(), n));
    ASSERT_CUDA_OK(dst.download(st_gpu.data(), nst));
    const std::string what = std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + " transpose";
    expect_same_bytes(qt_cpu, qt_gpu, what);
    expect_same_scales(st_cpu, st_gpu, what);
  }
}

}  // namespace
}  // namespace fp8pipe::kernels::gpu
