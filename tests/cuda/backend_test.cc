// The CUDA Backend (core/cuda_backend.cc) against the CPU backend on random inputs, op by op,
// through the Backend interface only. Bounds, as stated in kernels/cuda/ops.cuh:
//   bit-identical: quantize (every granularity, fp32/bf16, E4M3/E5M2, pow2/fp32 scales, NaN
//     groups and counts), quantize_transposed, transpose_fp8, dequantize, gemm_fp8 in kExact
//     mode (splitK = 1), embedding fwd/bwd, gather/scatter rows (duplicates included), add,
//     axpy, round_bf16, rmsnorm's dw, router indices, the optimizer ops but sum_squares;
//   |gpu - cpu| <= atol + rtol * |cpu| otherwise, with the (atol, rtol) given at each check.
#include "core/backend.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/model/attention_core.h"
#include "tests/test_random.h"

namespace fp8pipe {
namespace {

using testutil::randn;

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    cpu_ = make_cpu_backend();
    auto g = make_cuda_backend(0);
    ASSERT_TRUE(g.ok()) << g.status().to_string();
    gpu_ = std::move(g.value());
  }

  template <class T>
  Tensor host(const Shape& s, DType dt, const std::vector<T>& v) {
    Tensor t = cpu_->empty(s, dt).value();
    EXPECT_EQ(t.nbytes(), v.size() * sizeof(T));
    std::memcpy(t.data(), v.data(), t.nbytes());
    return t;
  }
  Tensor hostf(const Shape& s, const std::vector<float>& v) { return host(s, DType::kF32, v); }
  Tensor hosti(const Shape& s, const std::vector<int32_t>& v) { return host(s, DType::kI32, v); }
  Tensor dev(const Tensor& h) {
    Tensor d = gpu_->empty(h.shape(), h.dtype()).value();
    EXPECT_TRUE(gpu_->copy(h, d).ok());
    return d;
  }
  // A device copy of an FP8 host tensor with its scales.
  Tensor dev_fp8(const Tensor& h) {
    Tensor d = dev(h);
    d.set_scale(std::make_shared<Tensor>(dev(*h.scale())), h.granularity(), h.pow2_scales());
    return d;
  }
  // A tensor's bytes as T (sized by nbytes: packed E5M6 codes read as uint8_t too).
  template <class T>
  std::vector<T> back(const Tensor& d) {
    return vec<T>(gpu_->to_host(d).value());
  }
  template <class T>
  std::vector<T> vec(const Tensor& h) {
    std::vector<T> v(h.nbytes() / sizeof(T));
    std::memcpy(v.data(), h.data(), v.size() * sizeof(T));
    return v;
  }
  // dequantize of a CPU-made and a GPU-made quantization gives the same bits.
  void expect_same_dequantize(const Tensor& qc, const Tensor& qg, const std::string& what);

  std::unique_ptr<Backend> cpu_, gpu_;
};

std::vector<int32_t> randi(size_t n, uint32_t seed, int lo, int hi) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(lo, hi - 1);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

template <class T>
void expect_bits(const std::vector<T>& want, const std::vector<T>& got, const std::string& what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    bool same;
    if constexpr (std::is_same_v<T, float>) {
      same = (std::isnan(want[i]) && std::isnan(got[i])) || bits(want[i]) == bits(got[i]);
    } else {
      same = want[i] == got[i];
    }
    if (!same && bad++ < 5) {
      ADD_FAILURE() << what << "[" << i << "]: cpu " << +want[i] << " gpu " << +got[i];
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << want.size() << " differ";
}

void CudaBackendTest::expect_same_dequantize(const Tensor& qc, const Tensor& qg,
                                             const std::string& what) {
  Tensor oc = cpu_->empty(qc.shape(), DType::kF32).value();
  Tensor og = gpu_->empty(qg.shape(), DType::kF32).value();
  ASSERT_TRUE(cpu_->dequantize(qc, oc).ok());
  ASSERT_TRUE(gpu_->dequantize(qg, og).ok());
  expect_bits(vec<float>(oc), back<float>(og), what + " dequantize");
}

void expect_near(const std::vector<float>& want, const std::vector<float>& got, float atol,
                 float rtol, const std::string& what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  int64_t bad = 0;
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(static_cast<double>(want[i]) - got[i]);
    worst = std::max(worst, err);
    if (!(err <= atol + rtol * std::fabs(want[i])) && bad++ < 5) {
      ADD_FAILURE() << what << "[" << i << "]: cpu " << want[i] << " gpu " << got[i];
    }
  }
  EXPECT_EQ(bad, 0) << what << ": max abs error " << worst;
}

// ---- FP8 numerics
// ---------------------------------------------------------------------------------

// Backend::memory counts device buffers by their requested bytes until the last handle dies
// (cudaFreeAsync on the stream); host tensors are the CPU backend's, not counted here.
TEST_F(CudaBackendTest, MemoryCountsDeviceBuffers) {
  const MemoryUse start = gpu_->memory();
  Tensor a = gpu_->empty({100, 3}, DType::kF32).value();  // 1200 bytes
  {
    Tensor b = gpu_->empty({64}, DType::kBF16).value();  // 128 bytes
    Tensor view = a.slice_rows(10, 20);
    EXPECT_EQ(gpu_->memory().in_use - start.in_use, 1328);
  }
  EXPECT_EQ(gpu_->memory().in_use - start.in_use, 1200);
  EXPECT_GE(gpu_->memory().peak - start.in_use, 1328);
  Tensor h = hostf({4}, {1, 2, 3, 4});
  EXPECT_EQ(gpu_->memory().in_use - start.in_use, 1200);
  a = Tensor();
  gpu_->reset_peak_memory();
  EXPECT_EQ(gpu_->memory().in_use, start.in_use);
  EXPECT_EQ(gpu_->memory().peak, start.in_use);
}

TEST_F(CudaBackendTest, QuantizeBitIdentical) {
  const int64_t R = 257, C = 300;
  std::vector<float> x = randn(R * C, 1, 3.0f);
  x[5] = NAN;                                          // a non-finite group
  x[R * C - 1] = INFINITY;                             // and another at the edge
  for (int i = 0; i < 40; ++i) x[1000 + i] *= 1e-30f;  // tiny magnitudes
  const Tensor hx = hostf({R, C}, x), dx = dev(hx);
  std::vector<uint16_t> xb(x.size());
  for (size_t i = 0; i < x.size(); ++i) xb[i] = static_cast<uint16_t>(bits(x[i]) >> 16);
  const Tensor hxb = host({R, C}, DType::kBF16, xb), dxb = dev(hxb);
  for (Granularity g :
       {Granularity::k1x128, Granularity::k128x1, Granularity::k128x128, Granularity::kPerTensor}) {
    for (auto fmt : {kernels::Fp8Format::kE4M3, kernels::Fp8Format::kE5M2}) {
      for (bool pow2 : {true, false}) {
        for (bool bf16 : {false, true}) {
          const QuantParams p{fmt, pow2};
          const std::string what = std::string(granularity_name(g)) +
                                   (fmt == kernels::Fp8Format::kE4M3 ? " e4m3" : " e5m2") +
                                   (pow2 ? " pow2" : " fp32") + (bf16 ? " bf16" : " f32");
          int64_t nc = -1, ng = -2;
          Tensor qc = cpu_->quantize(bf16 ? hxb : hx, g, p, &nc).value();
          Tensor qg = gpu_->quantize(bf16 ? dxb : dx, g, p, &ng).value();
          EXPECT_EQ(nc, ng) << what;
          expect_bits(vec<uint8_t>(qc), back<uint8_t>(qg), what + " codes");
          expect_bits(vec<float>(*qc.scale()), back<float>(*qg.scale()), what + " scales");
          expect_same_dequantize(qc, qg, what);
        }
      }
    }
  }
}

// E5M6 1x128 (the attention-output cache): packed bytes, scales, non-finite counts and the
// dequantized values bit-identical to the CPU's, for fp32 and bf16 inputs; 129 columns make
// pairs of codes straddle rows and the element count odd (a half-used last byte pair).
TEST_F(CudaBackendTest, QuantizeE5m6BitIdentical) {
  for (const auto& [R, C] : {std::pair<int64_t, int64_t>{257, 300}, {33, 129}}) {
    std::vector<float> x = randn(R * C, 3, 4.0f);
    x[7] = NAN;
    x[R * C - 2] = -INFINITY;
    for (int i = 0; i < 40; ++i) x[C + i] *= 1e-9f;  // subnormal E5M6 codes after scaling
    std::vector<uint16_t> xb(x.size());
    for (size_t i = 0; i < x.size(); ++i) xb[i] = static_cast<uint16_t>(bits(x[i]) >> 16);
    for (bool bf16 : {false, true}) {
      const std::string what = std::to_string(R) + "x" + std::to_string(C) + (bf16 ? " bf16" : "");
      const Tensor hx = bf16 ? host({R, C}, DType::kBF16, xb) : hostf({R, C}, x);
      int64_t nc = -1, ng = -2;
      Tensor qc = cpu_->quantize_e5m6(hx, &nc).value();
      Tensor qg = gpu_->quantize_e5m6(dev(hx), &ng).value();
      EXPECT_EQ(nc, 2) << what;
      EXPECT_EQ(nc, ng) << what;
      ASSERT_EQ(qg.dtype(), DType::kE5M6);
      ASSERT_EQ(qg.nbytes(), static_cast<size_t>((3 * R * C + 1) / 2));
      expect_bits(vec<uint8_t>(qc), back<uint8_t>(qg), what + " packed codes");
      expect_bits(vec<float>(*qc.scale()), back<float>(*qg.scale()), what + " scales");
      expect_same_dequantize(qc, qg, what);
    }
  }
}

TEST_F(CudaBackendTest, QuantizeTransposedAndTransposeFp8) {
  const int64_t R = 300, C = 260;
  const Tensor hx = hostf({R, C}, randn(R * C, 2, 5.0f)), dx = dev(hx);
  const QuantParams p{};
  int64_t nc = -1, ng = -2;
  Tensor tc = cpu_->quantize_transposed(hx, p, &nc).value();
  Tensor tg = gpu_->quantize_transposed(dx, p, &ng).value();
  EXPECT_EQ(nc, ng);
  EXPECT_EQ(tg.shape(), (Shape{C, R}));
  expect_bits(vec<uint8_t>(tc), back<uint8_t>(tg), "128x1^T codes");
  expect_bits(vec<float>(*tc.scale()), back<float>(*tg.scale()), "128x1^T scales");

  Tensor bc = cpu_->quantize(hx, Granularity::k128x128, p).value();
  Tensor bg = gpu_->quantize(dx, Granularity::k128x128, p).value();
  Tensor btc = cpu_->transpose_fp8(bc).value();
  Tensor btg = gpu_->transpose_fp8(bg).value();
  expect_bits(vec<uint8_t>(btc), back<uint8_t>(btg), "transpose_fp8 codes");
  expect_bits(vec<float>(*btc.scale()), back<float>(*btg.scale()), "transpose_fp8 scales");
}

// The grouped FP8 ops (the MoE experts): whole code and scale buffers bit-identical to the CPU's
// (whose groups are the ungrouped kernels on each group's rows, tests/core/backend_test.cc), with
// an empty group and a 160-row group (two 128x1 tiles); K = 256 takes the vector kernels, K = 262
// (not a multiple of 4) the scalar ones, and 16-aligned groups the transposed kernel's 16-byte
// stores. A group's view then runs on cuBLASLt, bit for bit the CPU's exact model (the Wgrad of one
// expert).
TEST_F(CudaBackendTest, GroupedQuantizeBitIdentical) {
  // Groups of 0..295 rows: empty, single-row, partial and multi-tile (over two 128-row tiles).
  for (const std::vector<int64_t>& off : {std::vector<int64_t>{0, 37, 37, 197, 213, 342},
                                          std::vector<int64_t>{0, 48, 48, 208, 224, 352},
                                          std::vector<int64_t>{0, 5, 300, 301, 560}}) {
    for (int64_t K : {256, 262}) {
      const int64_t M = off.back();
      const std::string what = "M " + std::to_string(M) + " K " + std::to_string(K);
      RowGroups gc = make_row_groups(*cpu_, off).value(), gg = make_row_groups(*gpu_, off).value();
      std::vector<float> x = randn(M * K, 11, 4.0f);
      x[3 * K + 7] = NAN;  // a non-finite group in the first expert
      const Tensor hx = hostf({M, K}, x), dx = dev(hx);
      for (bool pow2 : {true, false}) {
        const QuantParams p{kernels::Fp8Format::kE4M3, pow2};
        const std::string w = what + (pow2 ? " pow2" : " fp32");
        GroupedFp8 qc = cpu_->quantize_groups(hx, gc, p).value();
        GroupedFp8 qg = gpu_->quantize_groups(dx, gg, p).value();
        expect_bits(vec<uint8_t>(qc.codes), back<uint8_t>(qg.codes), w + " 1x128 codes");
        expect_bits(vec<float>(qc.scales), back<float>(qg.scales), w + " 1x128 scales");
        Tensor oc = cpu_->empty({M, K}, DType::kF32).value();
        Tensor og = gpu_->empty({M, K}, DType::kF32).value();
        ASSERT_TRUE(cpu_->dequantize_groups(qc, gc, oc).ok());
        ASSERT_TRUE(gpu_->dequantize_groups(qg, gg, og).ok());
        expect_bits(vec<float>(oc), back<float>(og), w + " dequantize");
        GroupedFp8 tc = cpu_->quantize_transposed_groups(hx, gc, p).value();
        GroupedFp8 tg = gpu_->quantize_transposed_groups(dx, gg, p).value();
        expect_bits(vec<uint8_t>(tc.codes), back<uint8_t>(tg.codes), w + " 128x1^T codes");
        expect_bits(vec<float>(tc.scales), back<float>(tg.scales), w + " 128x1^T scales");
        if (K != 256 || off[1] % 16 != 0) continue;
        // Wgrad of group 2 (160 rows): dY^T [K, 160] x X^T [K, 160] -> [K, K], both views.
        Tensor wc = cpu_->empty({K, K}, DType::kF32).value();
        Tensor wg = gpu_->empty({K, K}, DType::kF32).value();
        ASSERT_TRUE(cpu_->gemm_fp8(tc.group[2], tc.group[2], wc, GemmMode::kExact).ok());
        const Status st = gpu_->gemm_fp8(tg.group[2], tg.group[2], wg, GemmMode::kExact);
        ASSERT_TRUE(st.ok()) << st.to_string();
        expect_bits(vec<float>(wc), back<float>(wg), w + " wgrad of a group view");
      }
    }
  }
}

// A requantize case: input and output formats and the scale kind, labelled " e4m3->e5m2 pow2".
struct RequantCase {
  kernels::Fp8Format in, out;
  bool pow2;
  std::string label;
};
// Every format pair, pow2 or not.
std::vector<RequantCase> requant_cases() {
  using kernels::Fp8Format;
  auto name = [](Fp8Format f) { return f == Fp8Format::kE4M3 ? "e4m3" : "e5m2"; };
  std::vector<RequantCase> v;
  for (Fp8Format in : {Fp8Format::kE4M3, Fp8Format::kE5M2})
    for (Fp8Format out : {Fp8Format::kE4M3, Fp8Format::kE5M2})
      for (bool pow2 : {true, false})
        v.push_back({in, out, pow2,
                     std::string(" ") + name(in) + "->" + name(out) + (pow2 ? " pow2" : " fp32")});
  return v;
}

// A Linear's wgrad operand made of its cached 1x128 input in one pass: bitwise the CPU's dequantize
// + quantize_transposed, codes, scales and the non-finite count (a NaN row), every format pair,
// rows not a multiple of 128 or of 16, K a multiple of 4 or not.
TEST_F(CudaBackendTest, RequantizeTransposedBitIdentical) {
  for (const auto& [R, K] :
       std::vector<std::pair<int64_t, int64_t>>{{256, 384}, {200, 262}, {37, 129}}) {
    std::vector<float> x = randn(R * K, 13, 4.0f);
    x[5 * K + 140] = NAN;
    const Tensor hx = hostf({R, K}, x);
    for (const RequantCase& c : requant_cases()) {
      const std::string w = std::to_string(R) + "x" + std::to_string(K) + c.label;
      const Tensor qc = cpu_->quantize(hx, Granularity::k1x128, {c.in, c.pow2}).value();
      Tensor d = cpu_->empty({R, K}, DType::kF32).value();
      ASSERT_TRUE(cpu_->dequantize(qc, d).ok());
      int64_t bad_c = 0, bad_g = 0;
      const Tensor want = cpu_->quantize_transposed(d, {c.out, c.pow2}, &bad_c).value();
      auto got = gpu_->requantize_transposed(dev_fp8(qc), {c.out, c.pow2}, &bad_g);
      ASSERT_TRUE(got.ok()) << w << ": " << got.status().to_string();
      expect_bits(vec<uint8_t>(want), back<uint8_t>(got.value()), w + " codes");
      expect_bits(vec<float>(*want.scale()), back<float>(*got.value().scale()), w + " scales");
      EXPECT_EQ(bad_g, bad_c) << w;
      EXPECT_GT(bad_c, 0) << w;
    }
  }
}

// The experts' wgrad operands made of their cached 1x128 activations in one pass (FP8 codes
// dequantized in the tile, requantized 128x1 transposed): bitwise the CPU's dequantize_groups +
// quantize_transposed_groups, for E4M3 and E5M2 inputs and outputs, pow2 or not, groups of 0 to
// 295 rows, K a multiple of 4 (4 codes per load) or not (one), a NaN group included.
TEST_F(CudaBackendTest, RequantizeTransposedGroupsBitIdentical) {
  for (const std::vector<int64_t>& off : {std::vector<int64_t>{0, 37, 37, 197, 213, 342},
                                          std::vector<int64_t>{0, 48, 48, 208, 224, 352},
                                          std::vector<int64_t>{0, 5, 300, 301, 560}}) {
    for (int64_t K : {256, 262, 129}) {
      const int64_t M = off.back();
      RowGroups gc = make_row_groups(*cpu_, off).value(), gg = make_row_groups(*gpu_, off).value();
      std::vector<float> x = randn(M * K, 12, 4.0f);
      x[3 * K + 7] = NAN;
      const Tensor hx = hostf({M, K}, x);
      for (const RequantCase& c : requant_cases()) {
        const std::string w = "M " + std::to_string(M) + " K " + std::to_string(K) + c.label;
        const GroupedFp8 qc = cpu_->quantize_groups(hx, gc, {c.in, c.pow2}).value();
        GroupedFp8 qg;  // the same codes and scales on the device
        qg.codes = dev(qc.codes);
        qg.scales = dev(qc.scales);
        qg.group.resize(qc.group.size());
        Tensor d = cpu_->empty({M, K}, DType::kF32).value();
        ASSERT_TRUE(cpu_->dequantize_groups(qc, gc, d).ok());
        const GroupedFp8 want = cpu_->quantize_transposed_groups(d, gc, {c.out, c.pow2}).value();
        auto got = gpu_->requantize_transposed_groups(qg, gg, {c.out, c.pow2});
        ASSERT_TRUE(got.ok()) << w << ": " << got.status().to_string();
        expect_bits(vec<uint8_t>(want.codes), back<uint8_t>(got.value().codes), w + " codes");
        expect_bits(vec<float>(want.scales), back<float>(got.value().scales), w + " scales");
      }
    }
  }
}

// Fprop (1x128 x 128x128), Dgrad (1x128 x transposed 128x128), Wgrad (1x128 x 1x128): kExact is
// bit-identical to the CPU model; kFast (cuBLASLt's own algorithm, split-K allowed) within the
// tensor-core truncation of FP8.md 2.4 of the CPU's exact-fp32 kFast.
TEST_F(CudaBackendTest, GemmFp8) {
  const int64_t M = 256, N = 384, K = 512;
  const QuantParams p{};
  const Tensor ha = hostf({M, K}, randn(M * K, 3)), hb = hostf({N, K}, randn(N * K, 4));
  struct Case {
    Granularity ga, gb;
    const char* name;
  };
  for (const Case& c : {Case{Granularity::k1x128, Granularity::k128x128, "vec x blk"},
                        Case{Granularity::k1x128, Granularity::k1x128, "vec x vec"},
                        Case{Granularity::k128x128, Granularity::k1x128, "blk x vec"}}) {
    Tensor qa = cpu_->quantize(ha, c.ga, p).value(), qb = cpu_->quantize(hb, c.gb, p).value();
    Tensor da = dev_fp8(qa), db = dev_fp8(qb);
    for (DType out : {DType::kF32, DType::kBF16}) {
      const std::string what = std::string(c.name) + (out == DType::kF32 ? " f32" : " bf16");
      Tensor oc = cpu_->empty({M, N}, out).value(), og = gpu_->empty({M, N}, out).value();
      ASSERT_TRUE(cpu_->gemm_fp8(qa, qb, oc, GemmMode::kExact).ok());
      const Status s = gpu_->gemm_fp8(da, db, og, GemmMode::kExact);
      ASSERT_TRUE(s.ok()) << s.to_string();
      if (out == DType::kF32) {
        expect_bits(vec<float>(oc), back<float>(og), what + " exact");
      } else {
        expect_bits(vec<uint16_t>(oc), back<uint16_t>(og), what + " exact");
      }
    }
    Tensor oc = cpu_->empty({M, N}, DType::kF32).value();
    Tensor og = gpu_->empty({M, N}, DType::kF32).value();
    ASSERT_TRUE(cpu_->gemm_fp8(qa, qb, oc, GemmMode::kFast).ok());
    ASSERT_TRUE(gpu_->gemm_fp8(da, db, og, GemmMode::kFast).ok());
    // The GPU's kFast still truncates inside each 128-block (FP8.md 2.4), the CPU's is exact fp32:
    // they differ by up to ~1.2e-3 * rms here (CPU kExact vs kFast), so the bound is that of
    // tests/cuda/gemm_lt_test.cu, 2e-3 * rms of the output, for every element.
    const std::vector<float> want = vec<float>(oc);
    double ss = 0;
    for (float x : want) ss += static_cast<double>(x) * x;
    const float rms = static_cast<float>(std::sqrt(ss / static_cast<double>(want.size())));
    expect_near(want, back<float>(og), 2e-3f * rms, 0.0f, std::string(c.name) + " fast");
  }
  // 128x128 x 128x128 is refused, as on the CPU.
  Tensor b1 = gpu_->quantize(dev(ha), Granularity::k128x128, p).value();
  Tensor o = gpu_->empty({M, M}, DType::kF32).value();
  EXPECT_FALSE(gpu_->gemm_fp8(b1, b1, o, GemmMode::kExact).ok());
}

// Shapes cuBLASLt's FP8 kernels refuse (FP8.md §3.3: K % 16, a VEC128 operand's rows % 4, an
// output row not a multiple of 16 bytes) run on cuBLASLt zero-padded, bit-identical to the CPU's
// kExact model of the unpadded GEMM. The MTP's B*(T-1) token rows are such a K in its wgrads.
// (Under the CUDA emulation cuBLASLt refuses these shapes as the library does, so without the
// padding they would take the dequantize + fp32 fallback and differ.)
TEST_F(CudaBackendTest, GemmFp8PaddedShapes) {
  const QuantParams p{};
  struct Case {
    int64_t M, N, K;
    Granularity ga, gb;
  };
  for (const Case& c : {Case{6, 10, 200, Granularity::k1x128, Granularity::k128x128},
                        Case{5, 12, 256, Granularity::k1x128, Granularity::k128x128},
                        Case{8, 6, 128, Granularity::k1x128, Granularity::k128x128},
                        Case{130, 36, 1000, Granularity::k1x128, Granularity::k1x128},
                        Case{36, 130, 264, Granularity::k128x128, Granularity::k1x128},
                        Case{4, 4, 1, Granularity::k1x128, Granularity::k1x128}}) {
    const Tensor ha = hostf({c.M, c.K}, randn(c.M * c.K, 5)),
                 hb = hostf({c.N, c.K}, randn(c.N * c.K, 6));
    Tensor qa = cpu_->quantize(ha, c.ga, p).value(), qb = cpu_->quantize(hb, c.gb, p).value();
    for (DType out : {DType::kF32, DType::kBF16}) {
      const std::string what =
          std::to_string(c.M) + "x" + std::to_string(c.N) + "x" + std::to_string(c.K) +
          (c.ga == Granularity::k1x128 ? " vec x " : " blk x ") +
          (c.gb == Granularity::k1x128 ? "vec " : "blk ") + (out == DType::kF32 ? "f32" : "bf16");
      Tensor oc = cpu_->empty({c.M, c.N}, out).value(), og = gpu_->empty({c.M, c.N}, out).value();
      ASSERT_TRUE(cpu_->gemm_fp8(qa, qb, oc, GemmMode::kExact).ok());
      const Status s = gpu_->gemm_fp8(dev_fp8(qa), dev_fp8(qb), og, GemmMode::kExact);
      ASSERT_TRUE(s.ok()) << what << ": " << s.to_string();
      if (out == DType::kF32) {
        expect_bits(vec<float>(oc), back<float>(og), what);
      } else {
        expect_bits(vec<uint16_t>(oc), back<uint16_t>(og), what);
      }
    }
  }
}

// Grouped GEMMs (the MoE's per-expert products) on 1 to 4 lanes (FP8PIPE_GEMM_STREAMS): every
// FP8 result bitwise the CPU's kExact single call, padded shapes included (their temporaries live
// on the lanes); every bf16 result (accumulating, beta = 1, into its own gradient) bitwise the same
// backend's single call. The emulation runs streams lazily, so a lane that did not wait for the
// caller's stream would read unwritten inputs, and one the caller's stream did not wait for
// would leave unwritten (NaN) outputs here.
TEST_F(CudaBackendTest, GroupedGemmsMatchSingleCalls) {
  const QuantParams p{};
  struct Case {
    int64_t M, K;
    Granularity gb;
  };
  const int64_t N = 96;
  const std::vector<Case> cases = {
      {128, 256, Granularity::k128x128}, {6, 200, Granularity::k128x128},
      {64, 128, Granularity::k1x128},    {130, 384, Granularity::k128x128},
      {1, 128, Granularity::k1x128},     {32, 512, Granularity::k128x128},
      {77, 256, Granularity::k128x128}};
  int64_t rows = 0;
  for (const Case& c : cases) rows += c.M;
  std::vector<Tensor> qa, qb, ha, hb;
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    ha.push_back(hostf({c.M, c.K}, randn(c.M * c.K, 100 + i)));
    hb.push_back(hostf({N, c.K}, randn(N * c.K, 200 + i)));
    qa.push_back(cpu_->quantize(ha.back(), Granularity::k1x128, p).value());
    qb.push_back(cpu_->quantize(hb.back(), c.gb, p).value());
  }
  for (int lanes = 1; lanes <= 4; ++lanes) {
    ASSERT_EQ(setenv("FP8PIPE_GEMM_STREAMS", std::to_string(lanes).c_str(), 1), 0);
    auto made = make_cuda_backend(0);
    unsetenv("FP8PIPE_GEMM_STREAMS");
    ASSERT_TRUE(made.ok()) << made.status().to_string();
    gpu_ = std::move(made.value());
    const std::string at = " on " + std::to_string(lanes) + " lane(s)";
    std::vector<Tensor> dha, dqb;  // uploads first (they may drain the stream's queue)
    for (size_t i = 0; i < cases.size(); ++i) {
      dha.push_back(dev(ha[i]));
      dqb.push_back(dev_fp8(qb[i]));
    }
    for (DType out : {DType::kF32, DType::kBF16}) {
      Tensor oc = cpu_->empty({rows, N}, out).value(), og = gpu_->empty({rows, N}, out).value();
      std::vector<Fp8GemmArgs> gs;
      int64_t r = 0;
      for (size_t i = 0; i < cases.size(); ++i) {
        Tensor slot = oc.slice_rows(r, r + cases[i].M);
        ASSERT_TRUE(cpu_->gemm_fp8(qa[i], qb[i], slot, GemmMode::kExact).ok());
        // A quantized on the GPU (bitwise the CPU's, QuantizeBitIdentical): a kernel still
        // queued on the caller's stream when the group starts, which every lane must wait for.
        gs.push_back({gpu_->quantize(dha[i], Granularity::k1x128, p).value(), dqb[i],
                      og.slice_rows(r, r + cases[i].M)});
        r += cases[i].M;
      }
      const Status s = gpu_->gemm_fp8_grouped(gs, GemmMode::kExact);
      ASSERT_TRUE(s.ok()) << s.to_string();
      if (out == DType::kF32) {
        expect_bits(vec<float>(oc), back<float>(og), "gemm_fp8_grouped f32" + at);
      } else {
        expect_bits(vec<uint16_t>(oc), back<uint16_t>(og), "gemm_fp8_grouped bf16" + at);
      }
    }
    // bf16 wgrads: grad_i += dy_i^T x_i, each grad its own tensor.
    std::vector<GemmArgs> gs;
    std::vector<Tensor> single;
    for (size_t i = 0; i < cases.size(); ++i) {
      Tensor a = gpu_->empty({cases[i].M, N}, DType::kBF16).value();
      Tensor b = gpu_->empty({cases[i].M, cases[i].K}, DType::kBF16).value();
      ASSERT_TRUE(gpu_->cast(dev(hostf({cases[i].M, N}, randn(cases[i].M * N, 300 + i))), a).ok());
      ASSERT_TRUE(gpu_->cast(dev(ha[i]), b).ok());
      const Tensor init = hostf({N, cases[i].K}, randn(N * cases[i].K, 400 + i));
      gs.push_back({a, true, b, false, dev(init), 1.0f, 1.0f});
      single.push_back(dev(init));
      ASSERT_TRUE(gpu_->gemm(a, true, b, false, single.back(), 1.0f, 1.0f).ok());
    }
    const Status s = gpu_->gemm_grouped(gs);
    ASSERT_TRUE(s.ok()) << s.to_string();
    for (size_t i = 0; i < cases.size(); ++i) {
      expect_bits(back<float>(single[i]), back<float>(gs[i].c),
                  "gemm_grouped bf16 #" + std::to_string(i) + at);
    }
  }
  ASSERT_EQ(setenv("FP8PIPE_GEMM_STREAMS", "0", 1), 0);
  auto bad = make_cuda_backend(0);
  unsetenv("FP8PIPE_GEMM_STREAMS");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().to_string().find("FP8PIPE_GEMM_STREAMS='0'"), std::string::npos)
      << bad.status().to_string();
}

// The experts' FP8 input gathered from the tokens quantized once: bitwise the CPU, padded (zero
// rows) or not, K a multiple of 16 (16-byte copies) or not.
TEST_F(CudaBackendTest, GatherFp8Groups) {
  const int64_t n = 300;
  for (int64_t K : {256, 200}) {
    const Tensor hx = hostf({n, K}, randn(n * K, 40, 3.0f));
    const QuantParams p{};
    // the tokens as one quantize result, and grouped as if received from three ranks
    const Tensor qc = cpu_->quantize(hx, Granularity::k1x128, p).value();
    const std::vector<int64_t> in_off = {0, 100, 100, 300};
    const RowGroups one_c = make_row_groups(*cpu_, {0, n}).value(),
                    one_g = make_row_groups(*gpu_, {0, n}).value(),
                    in_c = make_row_groups(*cpu_, in_off).value(),
                    in_g = make_row_groups(*gpu_, in_off).value();
    const GroupedFp8 qgc = cpu_->quantize_groups(hx, in_c, p).value();
    const std::vector<int32_t> rv = randi(700, 41, 0, n);
    std::vector<int64_t> off = {0, 0, 130, 131, 500, 700}, poff = {0, 0, 144, 160, 544, 752};
    std::vector<int32_t> pv(752, -1);  // each group's rows, then -1 up to a multiple of 16
    for (size_t g = 0; g + 1 < off.size(); ++g)
      for (int64_t i = off[g]; i < off[g + 1]; ++i)
        pv[poff[g] + (i - off[g])] = static_cast<int32_t>(i);
    const Tensor rows = hosti({700}, rv), pad = hosti({752}, pv);
    for (bool padded : {false, true}) {
      for (bool grouped_in : {false, true}) {
        const auto& o = padded ? poff : off;
        const RowGroups gc = make_row_groups(*cpu_, o).value(),
                        gg = make_row_groups(*gpu_, o).value();
        const Tensor& codes = grouped_in ? qgc.codes : qc;
        const Tensor& scales = grouped_in ? qgc.scales : *qc.scale();
        const GroupedFp8 want = cpu_->gather_fp8_groups(codes, scales, grouped_in ? in_c : one_c,
                                                        p.pow2, rows, padded ? pad : Tensor(), gc)
                                    .value();
        auto got = gpu_->gather_fp8_groups(dev(codes), dev(scales), grouped_in ? in_g : one_g,
                                           p.pow2, dev(rows), padded ? dev(pad) : Tensor(), gg);
        ASSERT_TRUE(got.ok()) << got.status().to_string();
        const std::string w = "K " + std::to_string(K) + (padded ? " padded" : "") +
                              (grouped_in ? " grouped input" : "");
        expect_bits(vec<uint8_t>(want.codes), back<uint8_t>(got.value().codes), w + " codes");
        expect_bits(vec<float>(want.scales), back<float>(got.value().scales), w + " scales");
      }
    }
  }
}

// The MoE's padding / gate-scaling gather: bitwise the CPU, -0 inputs and -1 rows included.
TEST_F(CudaBackendTest, GatherRowsScaled) {
  const int64_t R = 300, D = 130, n = 1000;
  std::vector<float> xv = randn(R * D, 30);
  for (int64_t j = 0; j < D; j += 2) xv[5 * D + j] = -0.0f;
  const Tensor in = hostf({R, D}, xv), w = hostf({n}, randn(n, 31));
  std::vector<int32_t> rv = randi(n, 32, -1, R);  // about 1 in 300 a zero row
  rv[7] = -1;
  rv[8] = 5;
  const Tensor rows = hosti({n}, rv);
  for (bool weighted : {false, true}) {
    Tensor oc = cpu_->empty({n, D}, DType::kF32).value(),
           og = gpu_->empty({n, D}, DType::kF32).value();
    ASSERT_TRUE(cpu_->gather_rows_scaled(in, rows, weighted ? w : Tensor(), oc).ok());
    const Status s = gpu_->gather_rows_scaled(dev(in), dev(rows), weighted ? dev(w) : Tensor(), og);
    ASSERT_TRUE(s.ok()) << s.to_string();
    expect_bits(vec<float>(oc), back<float>(og), weighted ? "weighted" : "unweighted");
  }
}

TEST_F(CudaBackendTest, GemmFp32) {
  const int64_t M = 37, N = 53, K = 71;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      const Tensor ha = ta ? hostf({K, M}, randn(M * K, 7)) : hostf({M, K}, randn(M * K, 7));
      const Tensor hb = tb ? hostf({N, K}, randn(N * K, 8)) : hostf({K, N}, randn(N * K, 8));
      const Tensor hc = hostf({M, N}, randn(M * N, 9));
      Tensor dc = dev(hc);
      Tensor cc = cpu_->empty({M, N}, DType::kF32).value();
      ASSERT_TRUE(cpu_->copy(hc, cc).ok());
      ASSERT_TRUE(cpu_->gemm(ha, ta, hb, tb, cc, 0.5f, 0.25f).ok());
      const Status s = gpu_->gemm(dev(ha), ta, dev(hb), tb, dc, 0.5f, 0.25f);
      ASSERT_TRUE(s.ok()) << s.to_string();
      expect_near(vec<float>(cc), back<float>(dc), 1e-5f, 1e-5f,
                  std::string("gemm ta=") + (ta ? "1" : "0") + " tb=" + (tb ? "1" : "0"));
    }
  }
}

// ---- model operators
// ------------------------------------------------------------------------------

TEST_F(CudaBackendTest, EmbeddingGatherScatterElementwise) {
  const int64_t V = 50, D = 130, n = 400;
  const Tensor table = hostf({V, D}, randn(V * D, 10));
  const Tensor ids = hosti({n}, randi(n, 11, 0, V));  // many duplicates
  Tensor oc = cpu_->empty({n, D}, DType::kF32).value(),
         og = gpu_->empty({n, D}, DType::kF32).value();
  ASSERT_TRUE(cpu_->embedding_fwd(table, ids, oc).ok());
  ASSERT_TRUE(gpu_->embedding_fwd(dev(table), dev(ids), og).ok());
  expect_bits(vec<float>(oc), back<float>(og), "embedding_fwd");

  const Tensor dout = hostf({n, D}, randn(n * D, 12));
  Tensor tc = cpu_->empty({V, D}, DType::kF32).value();
  ASSERT_TRUE(cpu_->copy(table, tc).ok());
  Tensor tg = dev(table);
  ASSERT_TRUE(cpu_->embedding_bwd_acc(dout, ids, tc).ok());
  ASSERT_TRUE(gpu_->embedding_bwd_acc(dev(dout), dev(ids), tg).ok());
  expect_bits(vec<float>(tc), back<float>(tg), "embedding_bwd_acc");

  std::vector<int32_t> bad_ids = randi(n, 13, 0, V);
  bad_ids[77] = static_cast<int32_t>(V);
  EXPECT_FALSE(gpu_->embedding_fwd(dev(table), dev(hosti({n}, bad_ids)), og).ok());

  // gather / weighted scatter-add with duplicate rows
  Tensor gc = cpu_->empty({n, D}, DType::kF32).value(),
         gg = gpu_->empty({n, D}, DType::kF32).value();
  ASSERT_TRUE(cpu_->gather_rows(table, ids, gc).ok());
  ASSERT_TRUE(gpu_->gather_rows(dev(table), dev(ids), gg).ok());
  expect_bits(vec<float>(gc), back<float>(gg), "gather_rows");
  const Tensor w = hostf({n}, randn(n, 14));
  for (bool weighted : {false, true}) {
    Tensor sc = cpu_->empty({V, D}, DType::kF32).value();
    ASSERT_TRUE(cpu_->copy(table, sc).ok());
    Tensor sg = dev(table);
    ASSERT_TRUE(cpu_->scatter_add_rows(dout, ids, weighted ? w : Tensor(), sc).ok());
    ASSERT_TRUE(gpu_->scatter_add_rows(dev(dout), dev(ids), weighted ? dev(w) : Tensor(), sg).ok());
    expect_bits(vec<float>(sc), back<float>(sg), weighted ? "scatter weighted" : "scatter");
  }

  // add, axpy, round_bf16
  const Tensor a = hostf({n, D}, randn(n * D, 15, 100.0f)), b = hostf({n, D}, randn(n * D, 16));
  Tensor ac = cpu_->empty({n, D}, DType::kF32).value(),
         ag = gpu_->empty({n, D}, DType::kF32).value();
  ASSERT_TRUE(cpu_->add(a, b, ac).ok());
  ASSERT_TRUE(gpu_->add(dev(a), dev(b), ag).ok());
  expect_bits(vec<float>(ac), back<float>(ag), "add");
  ASSERT_TRUE(cpu_->axpy(-0.37f, a, ac).ok());
  ASSERT_TRUE(gpu_->axpy(-0.37f, dev(a), ag).ok());
  expect_bits(vec<float>(ac), back<float>(ag), "axpy");
  ASSERT_TRUE(cpu_->round_bf16(a, ac).ok());
  ASSERT_TRUE(gpu_->round_bf16(dev(a), ag).ok());
  expect_bits(vec<float>(ac), back<float>(ag), "round_bf16");
}

TEST_F(CudaBackendTest, RmsNorm) {
  const int64_t n = 67, D = 1000;
  const Tensor x = hostf({n, D}, randn(n * D, 20, 3.0f)), w = hostf({D}, randn(D, 21));
  Tensor yc = cpu_->empty({n, D}, DType::kF32).value(),
         yg = gpu_->empty({n, D}, DType::kF32).value();
  Tensor rc = cpu_->empty({n}, DType::kF32).value(), rg = gpu_->empty({n}, DType::kF32).value();
  ASSERT_TRUE(cpu_->rmsnorm_fwd(x, w, 1e-6f, yc, rc).ok());
  ASSERT_TRUE(gpu_->rmsnorm_fwd(dev(x), dev(w), 1e-6f, yg, rg).ok());
  expect_near(vec<float>(rc), back<float>(rg), 0.0f, 2.4e-7f, "rmsnorm rstd");
  expect_near(vec<float>(yc), back<float>(yg), 0.0f, 5e-7f, "rmsnorm y");
  // backward from the same inputs (the CPU's rstd on both): dw bit-identical.
  const Tensor dy = hostf({n, D}, randn(n * D, 22));
  const Tensor dw0 = hostf({D}, randn(D, 23));
  Tensor dxc = cpu_->empty({n, D}, DType::kF32).value(),
         dxg = gpu_->empty({n, D}, DType::kF32).value();
  Tensor dwc = cpu_->empty({D}, DType::kF32).value();
  ASSERT_TRUE(cpu_->copy(dw0, dwc).ok());
  Tensor dwg = dev(dw0);
  ASSERT_TRUE(cpu_->rmsnorm_bwd(dy, x, w, rc, dxc, dwc).ok());
  ASSERT_TRUE(gpu_->rmsnorm_bwd(dev(dy), dev(x), dev(w), dev(rc), dxg, dwg).ok());
  expect_near(vec<float>(dxc), back<float>(dxg), 1e-6f, 1e-6f, "rmsnorm dx");
  expect_bits(vec<float>(dwc), back<float>(dwg), "rmsnorm dw");
}

TEST_F(CudaBackendTest, Rope) {
  const int64_t n = 300, H = 3, d = 64;
  const Tensor x = hostf({n, H * d}, randn(n * H * d, 30));
  const Tensor pos = hosti({n}, randi(n, 31, 0, 8192));
  // plain RoPE, and YaRN with scaled cos/sin (mscale != mscale_all_dim)
  const kernels::RopeSpec yarn{.theta = 10000.0,
                               .factor = 40.0,
                               .original_max_position = 4096,
                               .beta_fast = 32.0,
                               .beta_slow = 1.0,
                               .mscale = 2.0,
                               .mscale_all_dim = 1.0};
  for (const kernels::RopeSpec& r : {kernels::RopeSpec{}, yarn}) {
    for (bool inverse : {false, true}) {
      Tensor xc = cpu_->empty({n, H * d}, DType::kF32).value();
      ASSERT_TRUE(cpu_->copy(x, xc).ok());
      Tensor xg = dev(x);
      ASSERT_TRUE(cpu_->rope(xc, pos, H, r, inverse).ok());
      ASSERT_TRUE(gpu_->rope(xg, dev(pos), H, r, inverse).ok());
      expect_near(vec<float>(xc), back<float>(xg), 1e-6f, 1e-6f,
                  std::string(r.yarn() ? "yarn " : "") + (inverse ? "rope inverse" : "rope"));
    }
  }
}

TEST_F(CudaBackendTest, Attention) {
  struct Dims {
    int64_t B, T, H, dk, dv;
  };
  for (const Dims& s : {Dims{2, 64, 3, 192, 128}, Dims{1, 33, 2, 40, 24}}) {
    const int64_t n = s.B * s.T;
    const float scale = 1.0f / std::sqrt(static_cast<float>(s.dk));
    const Tensor q = hostf({n, s.H * s.dk}, randn(n * s.H * s.dk, 40));
    const Tensor k = hostf({n, s.H * s.dk}, randn(n * s.H * s.dk, 41));
    const Tensor v = hostf({n, s.H * s.dv}, randn(n * s.H * s.dv, 42));
    const Tensor dq_ = dev(q), dk_ = dev(k), dv_ = dev(v);
    Tensor oc = cpu_->empty({n, s.H * s.dv}, DType::kF32).value();
    Tensor og = gpu_->empty({n, s.H * s.dv}, DType::kF32).value();
    Tensor lc = cpu_->empty({s.B * s.H * s.T}, DType::kF32).value();
    Tensor lg = gpu_->empty({s.B * s.H * s.T}, DType::kF32).value();
    ASSERT_TRUE(cpu_->attention_fwd(q, k, v, s.B, s.T, s.H, scale, oc, lc).ok());
    const Status st = gpu_->attention_fwd(dq_, dk_, dv_, s.B, s.T, s.H, scale, og, lg);
    ASSERT_TRUE(st.ok()) << st.to_string();
    const std::string what = "attention dk=" + std::to_string(s.dk);
    expect_near(vec<float>(oc), back<float>(og), 2e-5f, 1e-4f, what + " o");
    expect_near(vec<float>(lc), back<float>(lg), 2e-5f, 1e-5f, what + " lse");
    // backward from the CPU's o and lse on both sides
    const Tensor dout = hostf({n, s.H * s.dv}, randn(n * s.H * s.dv, 43));
    Tensor gqc = cpu_->empty(q.shape(), DType::kF32).value(),
           gqg = gpu_->empty(q.shape(), DType::kF32).value();
    Tensor gkc = cpu_->empty(k.shape(), DType::kF32).value(),
           gkg = gpu_->empty(k.shape(), DType::kF32).value();
    Tensor gvc = cpu_->empty(v.shape(), DType::kF32).value(),
           gvg = gpu_->empty(v.shape(), DType::kF32).value();
    ASSERT_TRUE(
        cpu_->attention_bwd(dout, q, k, v, oc, lc, s.B, s.T, s.H, scale, gqc, gkc, gvc).ok());
    ASSERT_TRUE(gpu_->attention_bwd(dev(dout), dq_, dk_, dv_, dev(oc), dev(lc), s.B, s.T, s.H,
                                    scale, gqg, gkg, gvg)
                    .ok());
    expect_near(vec<float>(gqc), back<float>(gqg), 5e-5f, 1e-4f, what + " dq");
    expect_near(vec<float>(gkc), back<float>(gkg), 5e-5f, 1e-4f, what + " dk");
    expect_near(vec<float>(gvc), back<float>(gvg), 5e-5f, 1e-4f, what + " dv");
  }
}

// Attention over a key/value cache (inference decoding): the block-per-(query, head) kernel against
// the CPU loop, multi-head and MLA's latent form (one 576-wide head shared by 128 heads, values
// the keys' first 512 columns: DeepSeek-V3's shape), a prefill chunk and one-row steps.
TEST_F(CudaBackendTest, AttentionCached) {
  struct Dims {
    int64_t n, L, H, G, dk, dv;
  };
  for (const Dims& s : {Dims{5, 37, 4, 4, 64, 48}, Dims{1, 37, 4, 2, 64, 64},
                        Dims{2, 300, 128, 1, 576, 512}, Dims{33, 33, 16, 1, 576, 512}}) {
    const bool latent = s.G == 1;
    const float scale = 1.0f / std::sqrt(192.0f);
    const Tensor q = hostf({s.n, s.H * s.dk}, randn(s.n * s.H * s.dk, 50));
    const Tensor k = hostf({s.L, s.G * s.dk}, randn(s.L * s.G * s.dk, 51));
    const Tensor v = latent ? k : hostf({s.L, s.G * s.dv}, randn(s.L * s.G * s.dv, 52));
    const Tensor kg = dev(k), vg = latent ? kg : dev(v);
    Tensor oc = cpu_->empty({s.n, s.H * s.dv}, DType::kF32).value();
    Tensor og = gpu_->empty({s.n, s.H * s.dv}, DType::kF32).value();
    ASSERT_TRUE(cpu_->attention_cached(q, k, v, s.H, s.G, s.dv, scale, oc).ok());
    const Status st = gpu_->attention_cached(dev(q), kg, vg, s.H, s.G, s.dv, scale, og);
    ASSERT_TRUE(st.ok()) << st.to_string();
    expect_near(vec<float>(oc), back<float>(og), 2e-5f, 1e-4f,
                "attention_cached n=" + std::to_string(s.n) + " G=" + std::to_string(s.G));
    // the same cache in bf16 (the CPU's bf16 kernel widens exactly, as the GPU's)
    Tensor kb = cpu_->empty(k.shape(), DType::kBF16).value();
    Tensor vb = cpu_->empty(v.shape(), DType::kBF16).value();
    ASSERT_TRUE(cpu_->cast(k, kb).ok() && cpu_->cast(v, vb).ok());
    const Tensor kbg = dev(kb), vbg = latent ? kbg : dev(vb);
    ASSERT_TRUE(cpu_->attention_cached(q, kb, latent ? kb : vb, s.H, s.G, s.dv, scale, oc).ok());
    ASSERT_TRUE(gpu_->attention_cached(dev(q), kbg, vbg, s.H, s.G, s.dv, scale, og).ok());
    expect_near(vec<float>(oc), back<float>(og), 2e-5f, 1e-4f,
                "attention_cached bf16 n=" + std::to_string(s.n) + " G=" + std::to_string(s.G));
  }
}

// The attention core as batched GEMMs (core/model/attention_core.h, precision.attention=gemm, the
// GPU default): cublasSgemmStridedBatched + the causal softmax kernels on the GPU against the CPU's
// fused kernel, forward and backward, at an MLA head shape and an odd one.
TEST_F(CudaBackendTest, AttentionAsGemms) {
  struct Dims {
    int64_t B, T, H, dk, dv;
  };
  // bf16: the CPU runs the same bf16 path (operands rounded alike, widened exactly); the GPU
  // differs by fp32 accumulation order, which can move a P or dS element by one bf16 ulp.
  for (const bool bf16 : {false, true})
    for (const Dims& s : {Dims{2, 64, 3, 192, 128}, Dims{3, 33, 2, 40, 24}}) {
      const float at = bf16 ? 3e-3f : 2e-5f, rt = bf16 ? 1e-2f : 1e-4f;
      const int64_t n = s.B * s.T;
      const model::AttnShape a{s.B, s.T, s.H, 1.0f / std::sqrt(static_cast<float>(s.dk))};
      const Tensor q = hostf({n, s.H * s.dk}, randn(n * s.H * s.dk, 44));
      const Tensor k = hostf({n, s.H * s.dk}, randn(n * s.H * s.dk, 45));
      const Tensor v = hostf({n, s.H * s.dv}, randn(n * s.H * s.dv, 46));
      const Tensor dout = hostf({n, s.H * s.dv}, randn(n * s.H * s.dv, 47));
      model::ModelCtx cc, gc;
      cc.be = cpu_.get();
      gc.be = gpu_.get();
      gc.attention_gemm = true;
      gc.attention_bf16 = cc.attention_gemm = cc.attention_bf16 = bf16;
      Tensor oc = cpu_->empty({n, s.H * s.dv}, DType::kF32).value();
      Tensor lc = cpu_->empty({s.B * s.H * s.T}, DType::kF32).value();
      Tensor og = gpu_->empty({n, s.H * s.dv}, DType::kF32).value();
      Tensor lg = gpu_->empty({s.B * s.H * s.T}, DType::kF32).value();
      ASSERT_TRUE(model::attention_core_fwd(cc, q, k, v, a, oc, lc).ok());
      const Tensor gq = dev(q), gk = dev(k), gv = dev(v), gd = dev(dout);
      Status st = model::attention_core_fwd(gc, gq, gk, gv, a, og, lg);
      ASSERT_TRUE(st.ok()) << st.to_string();
      const std::string what =
          std::string(bf16 ? "attention gemm_bf16 dk=" : "attention gemm dk=") +
          std::to_string(s.dk);
      expect_near(vec<float>(oc), back<float>(og), at, rt, what + " o");
      expect_near(vec<float>(lc), back<float>(lg), 2e-5f, 1e-5f, what + " lse");
      Tensor dqc = cpu_->empty(q.shape(), DType::kF32).value(),
             dqg = gpu_->empty(q.shape(), DType::kF32).value();
      Tensor dkc = cpu_->empty(k.shape(), DType::kF32).value(),
             dkg = gpu_->empty(k.shape(), DType::kF32).value();
      Tensor dvc = cpu_->empty(v.shape(), DType::kF32).value(),
             dvg = gpu_->empty(v.shape(), DType::kF32).value();
      ASSERT_TRUE(model::attention_core_bwd(cc, dout, q, k, v, oc, lc, a, dqc, dkc, dvc).ok());
      st = model::attention_core_bwd(gc, gd, gq, gk, gv, og, lg, a, dqg, dkg, dvg);
      ASSERT_TRUE(st.ok()) << st.to_string();
      expect_near(vec<float>(dqc), back<float>(dqg), bf16 ? at : 5e-5f, rt, what + " dq");
      expect_near(vec<float>(dkc), back<float>(dkg), bf16 ? at : 5e-5f, rt, what + " dk");
      expect_near(vec<float>(dvc), back<float>(dvg), bf16 ? at : 5e-5f, rt, what + " dv");
    }
}

TEST_F(CudaBackendTest, SwigluAndCrossEntropy) {
  const int64_t n = 1000, F = 37;
  const Tensor gt = hostf({n, F}, randn(n * F, 50, 4.0f)), u = hostf({n, F}, randn(n * F, 51));
  Tensor hc = cpu_->empty({n, F}, DType::kF32).value(),
         hg = gpu_->empty({n, F}, DType::kF32).value();
  ASSERT_TRUE(cpu_->swiglu_fwd(gt, u, hc).ok());
  ASSERT_TRUE(gpu_->swiglu_fwd(dev(gt), dev(u), hg).ok());
  expect_near(vec<float>(hc), back<float>(hg), 1e-7f, 1e-6f, "swiglu h");
  const Tensor dh = hostf({n, F}, randn(n * F, 52));
  Tensor ggc = cpu_->empty({n, F}, DType::kF32).value(),
         ggg = gpu_->empty({n, F}, DType::kF32).value();
  Tensor guc = cpu_->empty({n, F}, DType::kF32).value(),
         gug = gpu_->empty({n, F}, DType::kF32).value();
  ASSERT_TRUE(cpu_->swiglu_bwd(dh, gt, u, ggc, guc).ok());
  ASSERT_TRUE(gpu_->swiglu_bwd(dev(dh), dev(gt), dev(u), ggg, gug).ok());
  expect_near(vec<float>(ggc), back<float>(ggg), 1e-6f, 1e-5f, "swiglu dg");
  expect_near(vec<float>(guc), back<float>(gug), 1e-7f, 1e-6f, "swiglu du");

  const int64_t R = 64, V = 3001;
  const Tensor logits = hostf({R, V}, randn(R * V, 53, 5.0f));
  std::vector<int32_t> t = randi(R, 54, 0, V);
  t[3] = -1;  // ignored rows
  t[40] = -1;
  const Tensor tg = hosti({R}, t);
  Tensor lc = cpu_->empty({R}, DType::kF32).value(), lg = gpu_->empty({R}, DType::kF32).value();
  ASSERT_TRUE(cpu_->cross_entropy_fwd(logits, tg, lc).ok());
  ASSERT_TRUE(gpu_->cross_entropy_fwd(dev(logits), dev(tg), lg).ok());
  expect_near(vec<float>(lc), back<float>(lg), 1e-5f, 1e-6f, "ce loss");
  Tensor dc = cpu_->empty({R, V}, DType::kF32).value(),
         dg = gpu_->empty({R, V}, DType::kF32).value();
  ASSERT_TRUE(cpu_->cross_entropy_bwd(logits, tg, 0.125f, dc).ok());
  ASSERT_TRUE(gpu_->cross_entropy_bwd(dev(logits), dev(tg), 0.125f, dg).ok());
  expect_near(vec<float>(dc), back<float>(dg), 1e-8f, 1e-5f, "ce dlogits");
  t[7] = static_cast<int32_t>(V);
  EXPECT_FALSE(gpu_->cross_entropy_fwd(dev(logits), dev(hosti({R}, t)), lg).ok());
}

TEST_F(CudaBackendTest, RouterTopk) {
  struct Case {
    int64_t E, topk, groups, max_groups;
  };
  for (const Case& c : {Case{64, 6, 8, 3}, Case{256, 8, 8, 4}, Case{16, 4, 1, 1}}) {
    for (bool ties : {false, true}) {
      const int64_t n = 257;
      std::vector<float> l = randn(n * c.E, 60, 2.0f);
      if (ties) {
        for (auto& x : l) x = std::round(x * 2.0f) / 2.0f;  // few distinct values: many ties
      }
      std::vector<float> b = randn(c.E, 61, 0.1f);
      if (ties) std::fill(b.begin(), b.end(), 0.0f);
      const Tensor lg = hostf({n, c.E}, l), bias = hostf({c.E}, b);
      Tensor sc = cpu_->empty({n, c.E}, DType::kF32).value();
      Tensor sg = gpu_->empty({n, c.E}, DType::kF32).value();
      Tensor ic = cpu_->empty({n, c.topk}, DType::kI32).value();
      Tensor ig = gpu_->empty({n, c.topk}, DType::kI32).value();
      Tensor gc = cpu_->empty({n, c.topk}, DType::kF32).value();
      Tensor gg = gpu_->empty({n, c.topk}, DType::kF32).value();
      ASSERT_TRUE(
          cpu_->router_topk(lg, bias, c.topk, c.groups, c.max_groups, 2.5f, sc, ic, gc).ok());
      const Status s =
          gpu_->router_topk(dev(lg), dev(bias), c.topk, c.groups, c.max_groups, 2.5f, sg, ig, gg);
      ASSERT_TRUE(s.ok()) << s.to_string();
      const std::string what = "router E=" + std::to_string(c.E) + (ties ? " ties" : "");
      expect_near(vec<float>(sc), back<float>(sg), 0.0f, 4e-7f, what + " scores");
      expect_bits(vec<int32_t>(ic), back<int32_t>(ig), what + " idx");
      expect_near(vec<float>(gc), back<float>(gg), 0.0f, 1e-6f, what + " gates");
    }
  }
}

// A MoE layer's expert weights quantized and transposed in one call each: the whole stacked
// codes and scales bit-identical to the CPU's (each group the per-tensor op), with partial last
// blocks (R = 330, C = 300), an unaligned width (C = 302: the scalar kernel), E4M3 and E5M2.
TEST_F(CudaBackendTest, QuantizeBlocksBatchBitIdentical) {
  for (int64_t C : {300, 302}) {
    const int64_t R = 330, n = 5;  // partial last row block too
    std::vector<Tensor> hw, dw;
    std::vector<const Tensor*> hp, dp;
    for (int64_t z = 0; z < n; ++z) hw.push_back(hostf({R, C}, randn(R * C, 50 + z, 0.05f)));
    for (int64_t z = 0; z < n; ++z) dw.push_back(dev(hw[z]));
    for (int64_t z = 0; z < n; ++z) {
      hp.push_back(&hw[z]);
      dp.push_back(&dw[z]);
    }
    const std::string what = "C " + std::to_string(C);
    for (auto [fmt, pow2] :
         {std::pair{kernels::Fp8Format::kE4M3, true}, std::pair{kernels::Fp8Format::kE4M3, false},
          std::pair{kernels::Fp8Format::kE5M2, false}}) {
      const QuantParams p{fmt, pow2};
      GroupedFp8 qc = cpu_->quantize_blocks_batch(hp, p).value();
      GroupedFp8 qg = gpu_->quantize_blocks_batch(dp, p).value();
      expect_bits(vec<uint8_t>(qc.codes), back<uint8_t>(qg.codes), what + " codes");
      expect_bits(vec<float>(qc.scales), back<float>(qg.scales), what + " scales");
      GroupedFp8 tc = cpu_->transpose_fp8_batch(qc).value();
      GroupedFp8 tg = gpu_->transpose_fp8_batch(qg).value();
      expect_bits(vec<uint8_t>(tc.codes), back<uint8_t>(tg.codes), what + " transposed codes");
      expect_bits(vec<float>(tc.scales), back<float>(tg.scales), what + " transposed scales");
    }
  }
}

// The experts' gradient adds in one call: bit-identical to the CPU's axpy per output.
TEST_F(CudaBackendTest, AxpyBatch) {
  const int64_t n = 1000, count = 7;
  const Tensor hx = hostf({count * n}, randn(count * n, 60)), dx = dev(hx);
  std::vector<Tensor> hy, dy;
  for (int64_t z = 0; z < count; ++z) hy.push_back(hostf({n}, randn(n, 61 + z)));
  for (int64_t z = 0; z < count; ++z) dy.push_back(dev(hy[z]));
  std::vector<Tensor*> hp, dp;
  for (int64_t z = 0; z < count; ++z) {
    hp.push_back(&hy[z]);
    dp.push_back(&dy[z]);
  }
  ASSERT_TRUE(cpu_->axpy_batch(0.75f, hx, hp).ok());
  const Status st = gpu_->axpy_batch(0.75f, dx, dp);
  ASSERT_TRUE(st.ok()) << st.to_string();
  for (int64_t z = 0; z < count; ++z)
    expect_bits(vec<float>(hy[z]), back<float>(dy[z]), "axpy_batch " + std::to_string(z));
}

// The MoE's direct dispatch and router backward: sort_assignments equal to the CPU's counting
// sort (a stable radix sort); balance_stats and router_grad bit-identical (shared per-token code,
// -fmad=false), with and without the balance term and the slot indirection.
TEST_F(CudaBackendTest, MoeSortAndRouterGrad) {
  const int64_t B = 3, T = 50, n = B * T, E = 64, K = 8;
  const Tensor hl = hostf({n, E}, randn(n * E, 21)), hb = hostf({E}, randn(E, 22, 0.1f));
  Tensor hs = cpu_->empty({n, E}, DType::kF32).value(),
         hi = cpu_->empty({n, K}, DType::kI32).value();
  Tensor hg = cpu_->empty({n, K}, DType::kF32).value();
  ASSERT_TRUE(cpu_->router_topk(hl, hb, K, 8, 4, 2.5f, hs, hi, hg).ok());
  const Tensor ds = dev(hs), di = dev(hi), dgt = dev(hg);
  auto i32 = [](Backend& be, int64_t count) { return be.empty({count}, DType::kI32).value(); };
  Tensor co = i32(*cpu_, n * K), cr = i32(*cpu_, n * K), csl = i32(*cpu_, n * K),
         cc = i32(*cpu_, E);
  ASSERT_TRUE(cpu_->sort_assignments(hi, E, co, cr, csl, cc).ok());
  Tensor go = i32(*gpu_, n * K), gr = i32(*gpu_, n * K), gsl = i32(*gpu_, n * K),
         gc = i32(*gpu_, E);
  ASSERT_TRUE(gpu_->sort_assignments(di, E, go, gr, gsl, gc).ok());
  EXPECT_EQ(vec<int32_t>(co), back<int32_t>(go));
  EXPECT_EQ(vec<int32_t>(cr), back<int32_t>(gr));
  EXPECT_EQ(vec<int32_t>(csl), back<int32_t>(gsl));
  EXPECT_EQ(vec<int32_t>(cc), back<int32_t>(gc));

  // The balance loss's counts and value (accumulated onto a running sum), bit for bit.
  Tensor fc = cpu_->empty({B, E}, DType::kF64).value(),
         fg = gpu_->empty({B, E}, DType::kF64).value();
  Tensor lc = host({1}, DType::kF64, std::vector<double>{0.25}), lg = dev(lc);
  ASSERT_TRUE(cpu_->balance_stats(hs, hi, B, T, 1e-3f, fc, lc).ok());
  ASSERT_TRUE(gpu_->balance_stats(ds, di, B, T, 1e-3f, fg, lg).ok());
  expect_bits(vec<double>(fc), back<double>(fg), "balance counts");
  expect_bits(vec<double>(lc), back<double>(lg), "balance loss");
  EXPECT_GT(vec<double>(lc)[0], 0.25);

  std::vector<double> dg(n * K), f(B * E);
  std::mt19937 rng(23);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (double& v : dg) v = nd(rng);
  for (double& v : f) v = std::abs(nd(rng));
  const Tensor hdg = host({n * K}, DType::kF64, dg), hf = host({B, E}, DType::kF64, f);
  const Tensor ddg = dev(hdg), df = dev(hf);
  for (float alpha : {0.0f, 1e-3f}) {
    for (bool by_place : {false, true}) {
      kernels::RouterGradParams p;
      p.E = E;
      p.K = K;
      p.route_scale = 2.5f;
      p.alpha = alpha;
      p.loss_scale = 0.37;
      p.B = B;
      p.T = T;
      Tensor oc = cpu_->empty({n, E}, DType::kF32).value(),
             og = gpu_->empty({n, E}, DType::kF32).value();
      ASSERT_TRUE(cpu_->router_grad(hs, hi, hg, hdg, by_place ? csl : Tensor(), hf, p, oc).ok());
      const Status st = gpu_->router_grad(ds, di, dgt, ddg, by_place ? gsl : Tensor(), df, p, og);
      ASSERT_TRUE(st.ok()) << st.to_string();
      expect_bits(vec<float>(oc), back<float>(og),
                  "router_grad alpha " + std::to_string(alpha) + (by_place ? " slot" : ""));
    }
  }
}

// The BF16 twin's operands: cast is bit-identical both ways; the bf16 GEMM (cublasGemmEx on
// tensor cores, fp32 accumulation) is within fp32-accumulation bounds of the CPU's widened sgemm.
TEST_F(CudaBackendTest, Bf16CastAndGemm) {
  const int64_t M = 192, N = 160, K = 256;
  Tensor a = hostf({M, K}, randn(M * K, 70)), b = hostf({N, K}, randn(N * K, 71));
  Tensor ab = cpu_->empty({M, K}, DType::kBF16).value(),
         bb = cpu_->empty({N, K}, DType::kBF16).value();
  ASSERT_TRUE(cpu_->cast(a, ab).ok());
  ASSERT_TRUE(cpu_->cast(b, bb).ok());
  Tensor gab = gpu_->empty({M, K}, DType::kBF16).value(),
         gbb = gpu_->empty({N, K}, DType::kBF16).value();
  ASSERT_TRUE(gpu_->cast(dev(a), gab).ok());
  ASSERT_TRUE(gpu_->cast(dev(b), gbb).ok());
  expect_bits(back<uint16_t>(gab), vec<uint16_t>(ab), "cast f32->bf16");
  Tensor wide = gpu_->empty({M, K}, DType::kF32).value(),
         cwide = cpu_->empty({M, K}, DType::kF32).value();
  ASSERT_TRUE(gpu_->cast(gab, wide).ok());
  ASSERT_TRUE(cpu_->cast(ab, cwide).ok());
  expect_bits(back<float>(wide), vec<float>(cwide), "cast bf16->f32");
  for (bool tb : {true, false}) {
    Tensor bt = tb ? bb : cpu_->empty({K, N}, DType::kBF16).value();
    if (!tb) {  // B as [K, N]: transpose the bits on the host
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k)
          bt.data_as<uint16_t>()[k * N + n] = bb.data_as<uint16_t>()[n * K + k];
    }
    Tensor cc = cpu_->zeros({M, N}, DType::kF32).value(),
           gc = gpu_->zeros({M, N}, DType::kF32).value();
    ASSERT_TRUE(cpu_->gemm(ab, false, bt, tb, cc).ok());
    ASSERT_TRUE(gpu_->gemm(gab, false, dev(bt), tb, gc).ok());
    expect_near(vec<float>(cc), back<float>(gc), 1e-3f, 1e-4f,
                tb ? "bf16 gemm NT" : "bf16 gemm NN");
  }
}

// The optimizer ops of optim.placement=device: the fp64 sums, their rounding and AdamW are
// bit-identical; the squared norm is a tree sum (deterministic, within 1e-12 relative of the
// CPU's index-order sum).
// The sorted scatter (kernels/cuda/ops.cu) at MoE sizes: 100k inputs onto 3000 rows (about 33
// adds per row, some rows untouched), weighted, into a non-zero output: bitwise the CPU loop.
TEST_F(CudaBackendTest, ScatterAddLargeMatchesCpu) {
  const int64_t n = 100000, D = 96, R = 3000;
  std::vector<int32_t> rows = randi(n, 31, 0, R - 40);  // rows R-40..R-1 get nothing
  const Tensor in = hostf({n, D}, randn(n * D, 32)), w = hostf({n}, randn(n, 33));
  const Tensor r = hosti({n}, rows);
  Tensor oc = hostf({R, D}, randn(R * D, 34));
  Tensor og = dev(oc);
  ASSERT_TRUE(cpu_->scatter_add_rows(in, r, w, oc).ok());
  ASSERT_TRUE(gpu_->scatter_add_rows(dev(in), dev(r), dev(w), og).ok());
  expect_bits(vec<float>(oc), back<float>(og), "scatter_add_rows 100k -> 3000");
}

// MoE gate gradients: per-row fp64 dot products. The GPU sums in a tree, the CPU in column order:
// both are fp64 sums of exact products, so they agree to ~1e-15 relative of the row's |a|.|b|.
TEST_F(CudaBackendTest, RowDot) {
  for (const auto& [R, C] : {std::pair<int64_t, int64_t>{1, 1}, {37, 1000}, {5000, 1024}}) {
    const Tensor ac = hostf(Shape{R, C}, randn(R * C, 90)),
                 bc = hostf(Shape{R, C}, randn(R * C, 91));
    Tensor oc = cpu_->empty({R}, DType::kF64).value(), og = gpu_->empty({R}, DType::kF64).value();
    ASSERT_TRUE(cpu_->row_dot(ac, bc, oc).ok());
    ASSERT_TRUE(gpu_->row_dot(dev(ac), dev(bc), og).ok());
    const std::vector<double> want = vec<double>(oc), got = back<double>(og);
    const std::vector<float> a = vec<float>(ac), b = vec<float>(bc);
    for (int64_t r = 0; r < R; ++r) {
      double mag = 0;
      for (int64_t c = 0; c < C; ++c) mag += std::abs(double{a[r * C + c]} * b[r * C + c]);
      ASSERT_NEAR(got[r], want[r], 1e-14 * mag + 1e-300) << "row " << r << " of " << R << "x" << C;
    }
  }
}

TEST_F(CudaBackendTest, OptimizerOps) {
  const int64_t n = (1 << 18) + 19;
  const Shape s{n};
  Tensor acc_c = cpu_->zeros(s, DType::kF64).value(), acc_g = gpu_->zeros(s, DType::kF64).value();
  for (uint32_t mb = 0; mb < 3; ++mb) {  // three micro-batches of gradients
    Tensor gc = hostf(s, randn(n, 50 + mb, mb == 1 ? 1e-3f : 2.0f));
    Tensor gg = dev(gc);
    ASSERT_TRUE(cpu_->accumulate_grad(gc, acc_c).ok());
    ASSERT_TRUE(gpu_->accumulate_grad(gg, acc_g).ok());
    expect_bits(back<float>(gg), std::vector<float>(n, 0.0f), "grad zeroed");
  }
  expect_bits(back<double>(acc_g), vec<double>(acc_c), "accumulate_grad");
  Tensor rc = cpu_->empty(s, DType::kF32).value(), rg = gpu_->empty(s, DType::kF32).value();
  ASSERT_TRUE(cpu_->round_f64(acc_c, rc).ok());
  ASSERT_TRUE(gpu_->round_f64(acc_g, rg).ok());
  expect_bits(back<float>(rg), vec<float>(rc), "round_f64");
  double sc = 0.5, sg1 = 0.5, sg2 = 0.5;  // both continue a running sum; two tensors each
  const Tensor pc0 = hostf(Shape{1000}, randn(1000, 55)), pg0 = dev(pc0);
  const std::vector<const Tensor*> cs = {&rc, &pc0}, gs = {&rg, &pg0};
  ASSERT_TRUE(cpu_->sum_squares(cs, &sc).ok());
  ASSERT_TRUE(gpu_->sum_squares(gs, &sg1).ok());
  ASSERT_TRUE(gpu_->sum_squares(gs, &sg2).ok());
  EXPECT_EQ(sg1, sg2) << "sum_squares is not deterministic";
  EXPECT_NEAR(sg1, sc, 1e-12 * sc);
  kernels::AdamWHyper h;
  h.lr = 1e-3f;
  h.weight_decay = 0.1f;
  h.step = 3;
  h.grad_scale = 0.7f;
  const kernels::AdamWScalars k = kernels::adamw_scalars(h);
  Tensor pc = hostf(s, randn(n, 60, 0.02f)), pg = dev(pc);
  Tensor mc = cpu_->zeros(s, DType::kBF16).value(), vc = cpu_->zeros(s, DType::kBF16).value();
  Tensor mg = dev(mc), vg = dev(vc);
  for (int step = 0; step < 2; ++step) {
    ASSERT_TRUE(cpu_->adamw(pc, rc, mc, vc, k).ok());
    ASSERT_TRUE(gpu_->adamw(pg, rg, mg, vg, k).ok());
  }
  expect_bits(back<float>(pg), vec<float>(pc), "adamw p");
  expect_bits(back<uint16_t>(mg), vec<uint16_t>(mc), "adamw m");
  expect_bits(back<uint16_t>(vg), vec<uint16_t>(vc), "adamw v");
  Tensor wrong = gpu_->zeros(s, DType::kF32).value();
  EXPECT_FALSE(gpu_->accumulate_grad(rg, wrong).ok());  // the sum must be f64
}

// copy_ranges in one launch (ZeRO-1's packing): 500 ranges of fp32, fp64 and bf16 at odd offsets
// and lengths (the 16-byte, 4-byte and byte paths), some past one 16 KB chunk, between device
// tensors, bit for bit the CPU backend's one-copy-per-range reference; a host source falls back
// to that reference.
TEST_F(CudaBackendTest, CopyRangesMatchesCpu) {
  for (DType dt : {DType::kF32, DType::kF64, DType::kBF16}) {
    const int64_t es = static_cast<int64_t>(dtype_size(dt)), N = 400000;
    Tensor sc = cpu_->empty({N}, dt).value(), dc = cpu_->empty({N}, dt).value();
    const std::vector<float> bits = randn(N * es / 4 + 1, 90 + static_cast<uint32_t>(es));
    std::memcpy(sc.data(), bits.data(), N * es);
    std::memset(dc.data(), 0x5a, N * es);
    Tensor sg = dev(sc), dg = dev(dc);
    std::vector<CopyRange> rc, rg;
    const std::vector<int32_t> len = randi(500, 91, 0, 600);
    int64_t at = 0;
    for (size_t i = 0; i < len.size(); ++i) {
      const int64_t n = i % 50 == 7 ? 9000 : len[i];  // some ranges span 16 KB chunks
      const int64_t from = (static_cast<int64_t>(i) * 7919) % (N - n);
      rc.push_back({sc, from, dc, at, n});
      rg.push_back({sg, from, dg, at, n});
      at += n + static_cast<int64_t>(i % 3);  // gaps stay untouched
    }
    ASSERT_LT(at, N);
    ASSERT_TRUE(cpu_->copy_ranges(rc).ok());
    ASSERT_TRUE(gpu_->copy_ranges(rg).ok());
    expect_bits(vec<uint8_t>(dc), back<uint8_t>(dg), "copy_ranges");
    Tensor dg2 = dev(sc);
    std::vector<CopyRange> from_host = {{sc, 1, dg2, 0, 1000}};
    ASSERT_TRUE(gpu_->copy_ranges(from_host).ok());
    std::vector<uint8_t> want = vec<uint8_t>(sc);
    std::memmove(want.data(), want.data() + es, 1000 * es);
    expect_bits(want, back<uint8_t>(dg2), "copy_ranges from the host");
  }
}

// adamw_runs in one launch (DeviceAdamW's step): runs of both decay flags at odd offsets, one
// longer than a chunk, moments packed apart from the weights; bit for bit the CPU's one adamw per
// run, elements outside every run untouched.
TEST_F(CudaBackendTest, AdamWRunsMatchesCpu) {
  const int64_t n = 30000, nm = 20000;
  Tensor pc = hostf(Shape{n}, randn(n, 120, 0.05f)), gc = hostf(Shape{n}, randn(n, 121));
  std::vector<uint16_t> mb(nm), vb(nm);
  const std::vector<float> mr = randn(nm, 122, 0.01f), vr = randn(nm, 123, 0.01f);
  for (int64_t i = 0; i < nm; ++i) {  // bf16 bits of plausible moments (v >= 0)
    uint32_t a, b;
    const float va = std::abs(vr[i]);
    std::memcpy(&a, &mr[i], 4);
    std::memcpy(&b, &va, 4);
    mb[i] = static_cast<uint16_t>(a >> 16);
    vb[i] = static_cast<uint16_t>(b >> 16);
  }
  Tensor mc = cpu_->empty({nm}, DType::kBF16).value(), vc = cpu_->empty({nm}, DType::kBF16).value();
  std::memcpy(mc.data(), mb.data(), nm * 2);
  std::memcpy(vc.data(), vb.data(), nm * 2);
  Tensor pg = dev(pc), gg = dev(gc), mg = dev(mc), vg = dev(vc);
  const std::vector<AdamWRun> runs = {{3, 500, 0, true},
                                      {700, 9900, 497, false},
                                      {10001, 10002, 9697, true},
                                      {12000, 19000, 9800, true}};
  kernels::AdamWHyper h;
  h.lr = 1e-3f;
  h.weight_decay = 0.1f;
  h.step = 2;
  kernels::AdamWScalars s[2];
  s[1] = kernels::adamw_scalars(h);
  h.weight_decay = 0.0f;
  s[0] = kernels::adamw_scalars(h);
  ASSERT_TRUE(cpu_->adamw_runs(pc, gc, mc, vc, runs, s).ok());
  ASSERT_TRUE(gpu_->adamw_runs(pg, gg, mg, vg, runs, s).ok());
  expect_bits(vec<float>(pc), back<float>(pg), "adamw_runs p");
  expect_bits(vec<uint16_t>(mc), back<uint16_t>(mg), "adamw_runs m");
  expect_bits(vec<uint16_t>(vc), back<uint16_t>(vg), "adamw_runs v");
  EXPECT_EQ(vec<float>(pc)[600], randn(n, 120, 0.05f)[600]);  // between runs: untouched
  EXPECT_NE(vec<float>(pc)[800], randn(n, 120, 0.05f)[800]);  // inside one: stepped
  const std::vector<AdamWRun> past = {{0, 100, nm - 50, true}};
  EXPECT_FALSE(gpu_->adamw_runs(pg, gg, mg, vg, past, s).ok());
}

// The norm of ZeRO-1 shards (many tensors, most small, some empty) in one launch, and the fp64
// adds of the gradient reduce-scatter (parallel::DeviceNameSync): the sum of squares within
// 1e-12 of the CPU's index-order sum and deterministic; fp64 add bit for bit the CPU's.
TEST_F(CudaBackendTest, ShardNormAndFp64Add) {
  std::vector<Tensor> cs, gs;
  std::vector<int32_t> sizes = randi(300, 70, 0, 3000);
  sizes[5] = 0;
  sizes[6] = 256;
  sizes[7] = 257;
  sizes.push_back(256 * 256 + 513);  // more elements than the partials' threads
  for (size_t i = 0; i < sizes.size(); ++i) {
    cs.push_back(hostf(Shape{sizes[i]}, randn(sizes[i], 71 + static_cast<uint32_t>(i))));
    gs.push_back(dev(cs.back()));
  }
  std::vector<const Tensor*> cp, gp;
  for (size_t i = 0; i < cs.size(); ++i) {
    cp.push_back(&cs[i]);
    gp.push_back(&gs[i]);
  }
  double sc = 0, sg1 = 0, sg2 = 0;
  ASSERT_TRUE(cpu_->sum_squares(cp, &sc).ok());
  ASSERT_TRUE(gpu_->sum_squares(gp, &sg1).ok());
  ASSERT_TRUE(gpu_->sum_squares(gp, &sg2).ok());
  EXPECT_EQ(sg1, sg2) << "sum_squares is not deterministic";
  EXPECT_GT(sc, 0.0);
  EXPECT_NEAR(sg1, sc, 1e-12 * sc);
  const int64_t n = 100003;
  std::vector<double> a(n), b(n);
  const std::vector<float> ra = randn(n, 80), rb = randn(n, 81);
  for (int64_t i = 0; i < n; ++i) {  // values whose sums round in fp64
    a[i] = static_cast<double>(ra[i]) / 3.0;
    b[i] = static_cast<double>(rb[i]) * 1e-9 / 7.0;
  }
  Tensor ac = cpu_->empty({n}, DType::kF64).value(), bc = cpu_->empty({n}, DType::kF64).value();
  std::memcpy(ac.data(), a.data(), n * sizeof(double));
  std::memcpy(bc.data(), b.data(), n * sizeof(double));
  Tensor ag = dev(ac), bg = dev(bc), og = gpu_->empty({n}, DType::kF64).value();
  ASSERT_TRUE(gpu_->add(ag, bg, og).ok());
  std::vector<double> want(n);
  for (int64_t i = 0; i < n; ++i) want[i] = a[i] + b[i];
  expect_bits(want, back<double>(og), "add f64");
  Tensor f32 = gpu_->empty({n}, DType::kF32).value();
  EXPECT_FALSE(gpu_->add(ag, bg, f32).ok());  // no mixed types
}

// Ops launched on a side stream run there; events order them against the compute stream.
TEST_F(CudaBackendTest, StreamsAndEvents) {
  const int64_t n = 1 << 20;
  const Tensor a = hostf({n}, randn(n, 70)), b = hostf({n}, randn(n, 71));
  Tensor da = dev(a), db = dev(b);
  Tensor out = gpu_->empty({n}, DType::kF32).value();
  auto side = gpu_->create_stream("side");
  side->wait(gpu_->compute().record());
  side->launch([&] { ASSERT_TRUE(gpu_->add(da, db, out).ok()); });
  auto done = side->record();
  gpu_->compute().wait(done);
  done->synchronize();
  EXPECT_TRUE(done->query());
  Tensor want = cpu_->empty({n}, DType::kF32).value();
  ASSERT_TRUE(cpu_->add(a, b, want).ok());
  expect_bits(vec<float>(want), back<float>(out), "add on a side stream");
  side->synchronize();
}

}  // namespace
}  // namespace fp8pipe
