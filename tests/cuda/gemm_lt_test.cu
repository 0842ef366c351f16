// cuBLASLt FP8 GEMM wrapper against the CPU model (kernels/cpu/fp8_gemm.h): with splitK forced to 1
// bit for bit equal to GemmMode::kExact (FP8.md §2.4) for the Fprop / Dgrad / Wgrad operand layouts
// (§2.5), FP32 and BF16 outputs; the default algo (maybe split-K) within fp32 reordering of kExact
// and close to kFast in calc_diff; §3.3 rule errors; raw path == wrapper; BF16 GEMM sanity.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cpu/fp8_gemm.h"
#include "kernels/cpu/quantize.h"
#include "kernels/cuda/fp8_gemm_lt.h"
#include "tests/cuda/cuda_test_util.h"

namespace fp8pipe::kernels::gpu {
namespace {

using testing::DevBuf;

// A host FP8 operand X[rows][K] with its device copy.
struct Op {
  int64_t rows = 0, k = 0;
  Granularity gran = Granularity::k1x128;
  std::vector<uint8_t> q;
  std::vector<float> s;
  std::unique_ptr<DevBuf<uint8_t>> dq;
  std::unique_ptr<DevBuf<float>> ds;

  Fp8Operand host() const { return {q.data(), s.data(), gran, Fp8Format::kE4M3}; }
  Fp8Operand dev() const { return {dq->get(), ds->get(), gran, Fp8Format::kE4M3}; }
  void upload() {
    dq = std::make_unique<DevBuf<uint8_t>>(q.size());
    ds = std::make_unique<DevBuf<float>>(s.size());
    EXPECT_EQ(dq->upload(q), cudaSuccess);
    EXPECT_EQ(ds->upload(s), cudaSuccess);
  }
};

Op quantized(const std::vector<float>& x, int64_t rows, int64_t cols, Granularity g, bool pow2) {
  Op op;
  op.rows = rows;
  op.k = cols;
  op.gran = g;
  op.q.resize(rows * cols);
  op.s.resize(scale_count(g, rows, cols));
  EXPECT_EQ(kernels::quantize(x.data(), rows, cols, g, {Fp8Format::kE4M3, pow2}, op.q.data(),
                              op.s.data()),
            0);
  op.upload();
  return op;
}

// X[R][C] quantized 128x1 and transposed: the operand X^T[C][R] with 1x128 scales (Wgrad).
Op quantized_t(const std::vector<float>& x, int64_t rows, int64_t cols, bool pow2) {
  Op op;
  op.rows = cols;
  op.k = rows;
  op.gran = Granularity::k1x128;
  op.q.resize(rows * cols);
  op.s.resize(scale_count(Granularity::k128x1, rows, cols));
  EXPECT_EQ(kernels::quantize_128x1_transposed(x.data(), rows, cols, {Fp8Format::kE4M3, pow2},
                                               op.q.data(), op.s.data()),
            0);
  op.upload();
  return op;
}

// W[N][K] quantized 128x128 and transposed exactly: the operand W^T[K][N] (Dgrad).
Op quantized_wt(const std::vector<float>& w, int64_t n, int64_t k, bool pow2) {
  Op w_op = quantized(w, n, k, Granularity::k128x128, pow2);
  Op op;
  op.rows = k;
  op.k = n;
  op.gran = Granularity::k128x128;
  op.q.resize(n * k);
  op.s.resize(scale_count(Granularity::k128x128, k, n));
  kernels::transpose_128x128(w_op.q.data(), w_op.s.data(), n, k, op.q.data(), op.s.data());
  op.upload();
  return op;
}

// Rows with per-row magnitudes (token-correlated outliers) so scales differ across groups.
std::vector<float> activations(int64_t rows, int64_t cols, uint32_t seed) {
  auto x = testing::random_normal(rows * cols, seed);
  for (int64_t r = 0; r < rows; ++r) {
    const float m = std::ldexp(1.0f, static_cast<int>((r * 7 + seed) % 9) - 4);
    for (int64_t c = 0; c < cols; ++c) x[r * cols + c] *= (c % 97 == 5 ? 20.0f : 1.0f) * m;
  }
  return x;
}

struct GpuOut {
  std::vector<float> f32;
  std::vector<uint16_t> bf16;
  LtPlanInfo info;
};

void run_gpu(LtGemm& lt, const Op& a, const Op& b, int64_t M, int64_t N, int64_t K, bool bf16,
             bool splitk1, GpuOut* out) {
  DevBuf<float> df(M * N);
  DevBuf<uint16_t> db(M * N);
  ASSERT_CUDA_OK(df.fill_bytes(0xFF));  // poison (NaN)
  ASSERT_CUDA_OK(db.fill_bytes(0xFF));
  ASSERT_GPU_OK(lt.fp8_gemm(a.dev(), b.dev(), M, N, K, bf16 ? nullptr : df.get(),
                            bf16 ? db.get() : nullptr, nullptr, splitk1));
  out->info = lt.last_plan();
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  if (bf16) {
    out->bf16 = db.to_host();
  } else {
    out->f32 = df.to_host();
  }
}

double calc_diff(const std::vector<float>& x, const std::vector<float>& y) {
  double xy = 0, xx = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    xy += double{x[i]} * y[i];
    xx += double{x[i]} * x[i] + double{y[i]} * y[i];
  }
  return xx == 0 ? 0 : 1 - 2 * xy / xx;
}

std::vector<float> widen(const std::vector<uint16_t>& b) {
  std::vector<float> f(b.size());
  for (size_t i = 0; i < b.size(); ++i) f[i] = bf16_to_float(b[i]);
  return f;
}

// S[m][n] = sum_k |a_k b_k| (kFast on the operands with their sign bits cleared; scales are > 0):
// the scale of fp32 reordering errors of output (m, n).
std::vector<float> abs_sum(const Op& a, const Op& b, int64_t M, int64_t N, int64_t K) {
  std::vector<uint8_t> qa(a.q), qb(b.q);
  for (auto& c : qa) c &= 0x7F;
  for (auto& c : qb) c &= 0x7F;
  Fp8Operand ha = a.host(), hb = b.host();
  ha.q = qa.data();
  hb.q = qb.data();
  std::vector<float> s(M * N);
  EXPECT_TRUE(kernels::fp8_gemm(ha, hb, M, N, K, GemmMode::kFast, s.data(), nullptr));
  return s;
}

// GPU (splitK=1) == CPU kExact bitwise. GPU (default algo, maybe split-K) == kExact up to fp32
// reordering of the promoted block partials (FP8.md §2.4 "Split-K"), plus one BF16 rounding step
// for a BF16 output (and, with split-K, BF16 partials: INPLACE / OUTPUT_TYPE reductions); and close
// to the exact product of the FP8 values (CPU kFast) in calc_diff (FP8.md §2.4 accuracy table). A
// per-element bound against kFast would be wrong: the tensor-core truncation (§1.3) loses up to a
// few % of the global rms on these outlier-heavy operands, bit-exactly reproduced by kExact.
void check_gemm(const std::string& name, const Op& a, const Op& b, int64_t M, int64_t N,
                int64_t K) {
  LtGemm lt;
  ASSERT_GPU_OK(lt.init());
  std::vector<float> exact_f(M * N), fast_f(M * N);
  ASSERT_TRUE(
      kernels::fp8_gemm(a.host(), b.host(), M, N, K, GemmMode::kExact, exact_f.data(), nullptr));
  std::vector<uint16_t> exact_b(M * N);  // §2.4: D = bf16_rne(acc)
  for (int64_t i = 0; i < M * N; ++i) exact_b[i] = float_to_bf16(exact_f[i]);
  ASSERT_TRUE(
      kernels::fp8_gemm(a.host(), b.host(), M, N, K, GemmMode::kFast, fast_f.data(), nullptr));
  const std::vector<float> sabs = abs_sum(a, b, M, N, K);
  const int64_t nkb = ceil_div(K, 128);
  for (bool bf16 : {false, true}) {
    const std::string what = name + (bf16 ? " bf16-out" : " f32-out") + " M=" + std::to_string(M) +
                             " N=" + std::to_string(N) + " K=" + std::to_string(K);
    GpuOut g1;
    run_gpu(lt, a, b, M, N, K, bf16, /*splitk1=*/true, &g1);
    if (::testing::Test::HasFatalFailure()) return;
    EXPECT_EQ(g1.info.splitk, 1) << what;
    int64_t bad = 0;
    for (int64_t i = 0; i < M * N; ++i) {
      const bool same =
          bf16 ? exact_b[i] == g1.bf16[i] : testing::bits(exact_f[i]) == testing::bits(g1.f32[i]);
      if (!same && bad++ < 5) {
        ADD_FAILURE() << what << " splitK=1 vs CPU kExact at (" << i / N << "," << i % N
                      << "): cpu " << (bf16 ? bf16_to_float(exact_b[i]) : exact_f[i]) << " gpu "
                      << (bf16 ? bf16_to_float(g1.bf16[i]) : g1.f32[i]);
      }
    }
    EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << M * N << " outputs differ from kExact";

    GpuOut gd;
    run_gpu(lt, a, b, M, N, K, bf16, /*splitk1=*/false, &gd);
    if (::testing::Test::HasFatalFailure()) return;
    const std::vector<float> got = bf16 ? widen(gd.bf16) : gd.f32;
    const int sk = std::max(gd.info.splitk, 1);
    // fp32 sums of <= nkb promoted partials on each side plus an sk-way reduction: 2^-24 each.
    const double gamma = std::ldexp(double(2 * nkb + sk + 4), -24);
    double ss = 0;
    for (float v : fast_f) ss += double{v} * v;
    const double rms = std::sqrt(ss / (M * N));
    double max_err_fast = 0, worst = 0;
    int64_t over = 0;
    for (int64_t i = 0; i < M * N; ++i) {
      max_err_fast = std::max(max_err_fast, std::fabs(double{got[i]} - fast_f[i]));
      const double err = std::fabs(double{got[i]} - exact_f[i]);
      double tol = gamma * sabs[i];
      if (bf16)
        tol += std::ldexp(std::fabs(double{exact_f[i]}), -7) +
               std::ldexp(sk > 1 ? sk * double{sabs[i]} : 0.0, -8);
      worst = std::max(worst, tol > 0 ? err / tol : (err > 0 ? INFINITY : 0.0));
      if (!(err <= tol)) {
        if (over++ < 5) {
          ADD_FAILURE() << what << " default algo (splitK " << sk << ") vs CPU kExact at (" << i / N
                        << "," << i % N << "): cpu " << exact_f[i] << " gpu " << got[i] << " tol "
                        << tol;
        }
      }
    }
    // FP8.md §2.4: 7.7e-9 (FP32 out), 1.4e-6 (BF16 out; BF16 split-K partials add ~1e-6 each).
    const double cd = calc_diff(got, fast_f);
    EXPECT_EQ(over, 0) << what << " default algo (splitK=" << sk << ") vs kExact";
    EXPECT_LT(cd, bf16 ? 1e-5 * sk : 1e-6) << what << " calc_diff vs kFast";
    std::printf(
        "  %-40s splitK1 algo %d | default algo %d splitK %d: err/tol vs kExact %.2f, "
        "max|err|/rms vs kFast %.2e, calc_diff %.2e\n",
        what.c_str(), g1.info.algo_id, gd.info.algo_id, gd.info.splitk, worst, max_err_fast / rms,
        cd);
  }
}

// Fprop Y[M][N] = X[M][K] . W[N][K]^T: A = X (1x128), B = W (128x128).
void fprop(int64_t M, int64_t N, int64_t K, bool pow2, uint32_t seed) {
  const Op x = quantized(activations(M, K, seed), M, K, Granularity::k1x128, pow2);
  const Op w =
      quantized(testing::random_normal(N * K, seed + 1, 0.05f), N, K, Granularity::k128x128, pow2);
  check_gemm(std::string("fprop") + (pow2 ? " pow2" : " fp32scale"), x, w, M, N, K);
}

TEST(CudaGemmLt, FpropSplitK1EqualsCpuExact) {
  fprop(256, 384, 1024, true, 1);
  fprop(256, 384, 1024, false, 2);
  fprop(200, 136, 320, true, 3);   // partial tiles: KB=3 (pad4 -> 4), N not a multiple of 128
  fprop(128, 256, 7168, true, 4);  // KB=56
}

// Dgrad dX[M][K] = dY[M][N] . W[N][K]: GEMM (M, K, N) with A = dY (1x128 along N), B = W^T.
TEST(CudaGemmLt, DgradSplitK1EqualsCpuExact) {
  const int64_t M = 256, N = 512, K = 384;
  for (bool pow2 : {true, false}) {
    const Op dy = quantized(activations(M, N, 11), M, N, Granularity::k1x128, pow2);
    const Op wt = quantized_wt(testing::random_normal(N * K, 12, 0.05f), N, K, pow2);
    check_gemm(std::string("dgrad") + (pow2 ? " pow2" : " fp32scale"), dy, wt, M, K, N);
  }
  const Op dy = quantized(activations(196, 272, 13), 196, 272, Granularity::k1x128, true);
  const Op wt = quantized_wt(testing::random_normal(272 * 200, 14, 0.05f), 272, 200, true);
  check_gemm("dgrad partial", dy, wt, 196, 200, 272);
}

// Wgrad dW[N][K] = dY[M][N]^T . X[M][K]: GEMM (N, K, M) with A = dY^T, B = X^T, both 1x128 along
// the token dimension M (VEC x VEC promotion order).
TEST(CudaGemmLt, WgradSplitK1EqualsCpuExact) {
  const int64_t M = 512, N = 256, K = 384;
  for (bool pow2 : {true, false}) {
    const Op dyt = quantized_t(activations(M, N, 21), M, N, pow2);
    const Op xt = quantized_t(activations(M, K, 22), M, K, pow2);
    check_gemm(std::string("wgrad") + (pow2 ? " pow2" : " fp32scale"), dyt, xt, N, K, M);
  }
  const Op dyt = quantized_t(activations(336, 132, 23), 336, 132, true);  // M%128 != 0
  const Op xt = quantized_t(activations(336, 200, 24), 336, 200, true);
  check_gemm("wgrad partial", dyt, xt, 132, 200, 336);
}

// The other order, BLK (A) x VEC (B), and a small-M / long-K shape where the heuristic would
// choose split-K: forcing splitK=1 must still give the kExact bits.
TEST(CudaGemmLt, BlkTimesVecAndLongK) {
  const Op w = quantized(testing::random_normal(256 * 512, 31, 0.05f), 256, 512,
                         Granularity::k128x128, true);
  const Op x = quantized(activations(192, 512, 32), 192, 512, Granularity::k1x128, true);
  check_gemm("blk x vec", w, x, 256, 192, 512);
  const Op xs = quantized(activations(128, 16384, 33), 128, 16384, Granularity::k1x128, true);
  const Op ws = quantized(testing::random_normal(256 * 16384, 34, 0.05f), 256, 16384,
                          Granularity::k128x128, true);
  check_gemm("long K", xs, ws, 128, 256, 16384);
}

TEST(CudaGemmLt, RawPathEqualsWrapperAndPlansAreCached) {
  const int64_t M = 512, N = 768, K = 1024;
  const Op x = quantized(activations(M, K, 41), M, K, Granularity::k1x128, true);
  const Op w =
      quantized(testing::random_normal(N * K, 42, 0.05f), N, K, Granularity::k128x128, true);
  LtGemm lt;
  ASSERT_GPU_OK(lt.init());
  DevBuf<uint16_t> d1(M * N), d2(M * N);
  ASSERT_GPU_OK(lt.fp8_gemm(x.dev(), w.dev(), M, N, K, nullptr, d1.get(), nullptr));
  ASSERT_GPU_OK(lt.fp8_gemm(x.dev(), w.dev(), M, N, K, nullptr, d1.get(), nullptr));
  EXPECT_EQ(lt.cached_plans(), 1u);
  RawLtFp8Gemm raw;
  ASSERT_GPU_OK(raw.init(lt.handle(), lt.workspace(), LtGemm::kWorkspaceBytes, x.dev(), w.dev(), M,
                         N, K, nullptr, d2.get()));
  ASSERT_GPU_OK(raw.run(nullptr));
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(d1.to_host(), d2.to_host());
}

// Operands and output that are only 16-byte aligned (a row slice of a tensor: FP8.md §3.3's
// minimum) get their own plan, whose heuristic is told that alignment (the default assumes 256 B),
// and still give the kExact bits.
TEST(CudaGemmLt, SixteenByteAlignedPointers) {
  const int64_t M = 256, N = 384, K = 1024, off = 16;
  const Op x = quantized(activations(M, K, 61), M, K, Granularity::k1x128, true);
  const Op w =
      quantized(testing::random_normal(N * K, 62, 0.05f), N, K, Granularity::k128x128, true);
  std::vector<float> exact(M * N);
  ASSERT_TRUE(
      kernels::fp8_gemm(x.host(), w.host(), M, N, K, GemmMode::kExact, exact.data(), nullptr));
  DevBuf<uint8_t> xq(M * K, off), wq(N * K, off);
  DevBuf<float> out(M * N, off);
  uint8_t* xq16 = xq.get() + off;
  uint8_t* wq16 = wq.get() + off;
  float* out16 = out.get() + off / sizeof(float);
  ASSERT_CUDA_OK(cudaMemcpy(xq16, x.q.data(), M * K, cudaMemcpyHostToDevice));
  ASSERT_CUDA_OK(cudaMemcpy(wq16, w.q.data(), N * K, cudaMemcpyHostToDevice));
  LtGemm lt;
  ASSERT_GPU_OK(lt.init());
  ASSERT_GPU_OK(lt.fp8_gemm(x.dev(), w.dev(), M, N, K, out.get(), nullptr, nullptr, true));
  const Fp8Operand xs{xq16, x.ds->get(), Granularity::k1x128, Fp8Format::kE4M3};
  const Fp8Operand ws{wq16, w.ds->get(), Granularity::k128x128, Fp8Format::kE4M3};
  for (bool splitk1 : {true, false}) {
    ASSERT_CUDA_OK(cudaMemset(out16, 0xFF, M * N * sizeof(float)));
    ASSERT_GPU_OK(lt.fp8_gemm(xs, ws, M, N, K, out16, nullptr, nullptr, splitk1));
    ASSERT_CUDA_OK(cudaDeviceSynchronize());
    std::vector<float> got(M * N);
    ASSERT_CUDA_OK(cudaMemcpy(got.data(), out16, M * N * sizeof(float), cudaMemcpyDeviceToHost));
    int64_t bad = 0;
    for (int64_t i = 0; i < M * N; ++i) bad += testing::bits(got[i]) != testing::bits(exact[i]);
    if (lt.last_plan().splitk == 1) {  // a split-K default algo is checked by check_gemm
      EXPECT_EQ(bad, 0) << "splitK1=" << splitk1 << ": " << bad << " outputs differ from kExact";
    }
  }
  EXPECT_EQ(lt.cached_plans(), 3u);  // aligned splitK1, 16-aligned splitK1, 16-aligned default
}

TEST(CudaGemmLt, Bf16GemmMatchesFp64Reference) {
  const int64_t M = 192, N = 256, K = 512;
  const auto a = testing::to_bf16(testing::random_normal(M * K, 51));
  const auto b = testing::to_bf16(testing::random_normal(N * K, 52));
  DevBuf<uint16_t> da(M * K), db(N * K);
  DevBuf<float> dout(M * N);
  ASSERT_CUDA_OK(da.upload(a));
  ASSERT_CUDA_OK(db.upload(b));
  LtGemm lt;
  ASSERT_GPU_OK(lt.init());
  ASSERT_GPU_OK(lt.bf16_gemm(da.get(), db.get(), M, N, K, dout.get(), nullptr, nullptr));
  ASSERT_CUDA_OK(cudaDeviceSynchronize());
  const auto out = dout.to_host();
  double ss = 0, max_err = 0;
  std::vector<double> ref(M * N);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k)
        acc += double{bf16_to_float(a[m * K + k])} * bf16_to_float(b[n * K + k]);
      ref[m * N + n] = acc;
      ss += acc * acc;
    }
  }
  for (int64_t i = 0; i < M * N; ++i) max_err = std::max(max_err, std::fabs(out[i] - ref[i]));
  EXPECT_LT(max_err / std::sqrt(ss / (M * N)), 1e-4);
}

// FP8.md §3.3 violations are reported by rule before cuBLASLt sees them (no GPU work involved).
TEST(CudaGemmLt, ConstraintViolationsNameTheRule) {
  alignas(16) static uint8_t q[64];
  alignas(16) static float s[8];
  alignas(16) static float out[8];
  alignas(16) static uint16_t outb[8];
  const Fp8Operand vec{q, s, Granularity::k1x128, Fp8Format::kE4M3};
  const Fp8Operand blk{q, s, Granularity::k128x128, Fp8Format::kE4M3};
  auto msg = [](const Result& r) { return r.ok ? std::string("<ok>") : r.msg; };
  EXPECT_NE(msg(check_fp8_gemm_args(vec, blk, 128, 128, 136, out, nullptr)).find("multiple of 16"),
            std::string::npos);
  EXPECT_NE(msg(check_fp8_gemm_args(vec, blk, 198, 128, 128, out, nullptr)).find("multiple of 4"),
            std::string::npos);
  EXPECT_NE(msg(check_fp8_gemm_args(blk, vec, 128, 194, 128, out, nullptr)).find("multiple of 4"),
            std::string::npos);
  EXPECT_NE(
      msg(check_fp8_gemm_args(vec, blk, 128, 196, 128, nullptr, outb)).find("leading dimension"),
      std::string::npos);
  EXPECT_TRUE(check_fp8_gemm_args(vec, blk, 128, 196, 128, out, nullptr).ok);  // FP32: 784 B
  const Fp8Operand vec_off{q, s + 1, Granularity::k1x128, Fp8Format::kE4M3};
  EXPECT_NE(
      msg(check_fp8_gemm_args(vec_off, blk, 128, 128, 128, out, nullptr)).find("16-byte aligned"),
      std::string::npos);
  EXPECT_NE(msg(check_fp8_gemm_args(blk, blk, 128, 128, 128, out, nullptr))
                .find("BLK128x128 x BLK128x128"),
            std::string::npos);
  EXPECT_FALSE(check_fp8_gemm_args(vec, blk, 128, 128, 128, out, outb).ok);
  // The raw path names the rule as well (its init checks before any cuBLASLt call).
  RawLtFp8Gemm raw;
  EXPECT_NE(msg(raw.init(nullptr, nullptr, 0, vec, blk, 128, 128, 136, out, nullptr))
                .find("multiple of 16"),
            std::string::npos);
}

}  // namespace
}  // namespace fp8pipe::kernels::gpu
