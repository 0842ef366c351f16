// CPU backend: memory, streams/events ordering and overlap, and that the Tensor-level FP8 ops
// agree with an independent fp64 computation.
#include "core/backend.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <random>
#include <thread>

#include "tests/test_random.h"

namespace fp8pipe {
namespace {

using testutil::randn;

TEST(CpuBackend, EmptyZerosCopyAndErrors) {
  auto be = make_cpu_backend();
  Tensor z = be->zeros({3, 5}, DType::kF32).value();
  for (int i = 0; i < 15; ++i) EXPECT_EQ(z.data_as<float>()[i], 0.0f);
  Tensor r = randn(*be, {3, 5}, 1);
  ASSERT_TRUE(be->copy(r, z).ok());
  for (int i = 0; i < 15; ++i) EXPECT_EQ(z.data_as<float>()[i], r.data_as<float>()[i]);
  Tensor wrong = be->empty({4, 5}, DType::kF32).value();
  Status s = be->copy(r, wrong);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.to_string().find("element count"), std::string::npos) << s.to_string();
  EXPECT_FALSE(be->empty({-1, 2}, DType::kF32).ok());
  auto bad_reshape = r.reshape({4, 4});
  EXPECT_FALSE(bad_reshape.ok());
}

// copy_ranges: each range lands where an element loop puts it (2-D tensors, seen flat), the
// bytes outside every range are untouched, and a range past either end is refused naming it.
TEST(CpuBackend, CopyRanges) {
  auto be = make_cpu_backend();
  Tensor a = randn(*be, {7, 9}, 2), b = randn(*be, {4, 5}, 3);
  Tensor d = be->zeros({10, 10}, DType::kF32).value();
  std::vector<float> want(100, 0.0f);
  const std::vector<CopyRange> rs = {{a, 3, d, 0, 20}, {b, 0, d, 50, 20}, {a, 62, d, 99, 1}};
  for (const CopyRange& r : rs) {
    for (int64_t i = 0; i < r.n; ++i) want[r.dst_off + i] = r.src.data_as<float>()[r.src_off + i];
  }
  ASSERT_TRUE(be->copy_ranges(rs).ok());
  EXPECT_EQ(std::memcmp(d.data(), want.data(), sizeof(float) * 100), 0);
  const std::vector<CopyRange> past = {{a, 60, d, 0, 4}};
  const Status s = be->copy_ranges(past);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.to_string().find("out of range"), std::string::npos) << s.to_string();
  Tensor f64 = be->zeros({4}, DType::kF64).value();
  const std::vector<CopyRange> mixed = {{a, 0, f64, 0, 2}};
  EXPECT_FALSE(be->copy_ranges(mixed).ok());
}

// Backend::memory counts each live buffer's requested bytes once (views and handle copies share
// it), also when the last handle dies on another thread; the peak holds until reset_peak_memory.
TEST(CpuBackend, MemoryCountsLiveBuffers) {
  auto be = make_cpu_backend();
  const MemoryUse start = be->memory();
  EXPECT_EQ(start.in_use, 0);
  Tensor a = be->empty({3, 5}, DType::kF32).value();  // 60 bytes
  Tensor b = be->empty({7}, DType::kBF16).value();    // 14 bytes
  {
    Tensor view = a.slice_rows(1, 2), copy = a;
    EXPECT_EQ(be->memory().in_use, 74);
  }
  Tensor q = be->quantize(be->zeros({2, 128}, DType::kF32).value(), Granularity::k1x128, {})
                 .value();  // 256 code bytes and 2 fp32 scales; the zeros are freed at once
  EXPECT_EQ(be->memory().in_use, 74 + 256 + 8);
  EXPECT_EQ(be->memory().peak, 74 + 256 + 8 + 1024);
  std::thread([t = std::move(a)]() mutable { t = Tensor(); }).join();
  EXPECT_EQ(be->memory().in_use, 14 + 264);
  be->reset_peak_memory();
  EXPECT_EQ(be->memory().peak, 14 + 264);
  b = Tensor();
  q = Tensor();
  EXPECT_EQ(be->memory().in_use, 0);
  EXPECT_EQ(be->memory().peak, 14 + 264);
}

TEST(CpuStream, WorkerRunsInOrderAndOverlapsCaller) {
  auto be = make_cpu_backend();
  auto side = be->create_stream("comm");
  std::vector<int> order;
  std::atomic<bool> release{false};
  // The first closure blocks until the caller releases it: only possible if the side stream runs
  // on another thread while the caller keeps going (overlap).
  side->launch([&] {
    while (!release.load()) std::this_thread::yield();
    order.push_back(1);
  });
  side->launch([&] { order.push_back(2); });
  auto ev = side->record();
  EXPECT_FALSE(ev->query());
  release = true;  // caller proceeds while the worker was blocked
  ev->synchronize();
  EXPECT_TRUE(ev->query());
  side->synchronize();
  ASSERT_EQ(order.size(), 2u);
  EXPECT_EQ(order[0], 1);
  EXPECT_EQ(order[1], 2);
}

TEST(CpuStream, WaitOrdersAcrossStreams) {
  auto be = make_cpu_backend();
  auto a = be->create_stream("a");
  auto b = be->create_stream("b");
  std::atomic<int> value{0};
  a->launch([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    value = 7;
  });
  auto ev = a->record();
  b->wait(ev);
  int seen = -1;
  b->launch([&] { seen = value.load(); });
  b->synchronize();
  EXPECT_EQ(seen, 7);
  // The inline compute stream's events are complete at once.
  EXPECT_TRUE(be->compute().record()->query());
}

TEST(CpuBackend, Fp32GemmMatchesFp64) {
  auto be = make_cpu_backend();
  const int M = 7, N = 5, K = 9;
  Tensor a = randn(*be, {K, M}, 2);  // used transposed
  Tensor b = randn(*be, {N, K}, 3);  // used transposed
  Tensor c = be->zeros({M, N}, DType::kF32).value();
  ASSERT_TRUE(be->gemm(a, true, b, true, c).ok());
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double ref = 0;
      for (int k = 0; k < K; ++k)
        ref += double(a.data_as<float>()[k * M + m]) * b.data_as<float>()[n * K + k];
      EXPECT_NEAR(c.data_as<float>()[m * N + n], ref, 1e-5 * (1 + std::fabs(ref)));
    }
  Tensor bad = be->zeros({M, N + 1}, DType::kF32).value();
  EXPECT_FALSE(be->gemm(a, true, b, true, bad).ok());
}

// The BF16 twin's operands: cast rounds to nearest even (bf16 bits checked against an independent
// rounding of the fp32 bits) and widens back exactly; a GEMM of bf16 A and B equals fp64 of the
// rounded values within fp32 accumulation; mixed dtypes are refused naming the rule.
uint16_t rne_bf16(float x) {  // independent of kernels/: integer RNE on the fp32 bits (finite x)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t lsb = (u >> 16) & 1u;
  return static_cast<uint16_t>((u + 0x7FFFu + lsb) >> 16);
}

// Backend::row_dot (the MoE's gate gradients): every row against a long-double sum, and the
// argument checks.
TEST(CpuBackend, RowDotMatchesExtendedPrecision) {
  auto be = make_cpu_backend();
  const int64_t R = 9, C = 300;
  Tensor a = randn(*be, {R, C}, 21), b = randn(*be, {R, C}, 22, 1e3f);
  Tensor out = be->empty({R}, DType::kF64).value();
  ASSERT_TRUE(be->row_dot(a, b, out).ok());
  for (int64_t r = 0; r < R; ++r) {
    long double s = 0, mag = 0;
    for (int64_t c = 0; c < C; ++c) {
      const long double p =
          static_cast<long double>(a.data_as<float>()[r * C + c]) * b.data_as<float>()[r * C + c];
      s += p;
      mag += std::fabs(p);
    }
    EXPECT_NEAR(out.data_as<double>()[r], static_cast<double>(s),
                static_cast<double>(mag) * C * 1.2e-16)
        << "row " << r;
  }
  Tensor short_b = randn(*be, {R, C - 1}, 23);
  EXPECT_FALSE(be->row_dot(a, short_b, out).ok());
  Tensor f32_out = be->empty({R}, DType::kF32).value();
  const Status st = be->row_dot(a, b, f32_out);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.to_string().find("row_dot: f64 with 9 elements required"), std::string::npos)
      << st.to_string();
}

TEST(CpuBackend, Bf16CastAndGemm) {
  auto be = make_cpu_backend();
  const int M = 6, N = 5, K = 40;
  Tensor a = randn(*be, {M, K}, 7), b = randn(*be, {N, K}, 8);
  Tensor ab = be->empty({M, K}, DType::kBF16).value(), bb = be->empty({N, K}, DType::kBF16).value();
  ASSERT_TRUE(be->cast(a, ab).ok());
  ASSERT_TRUE(be->cast(b, bb).ok());
  for (int64_t i = 0; i < a.numel(); ++i)
    ASSERT_EQ(ab.data_as<uint16_t>()[i], rne_bf16(a.data_as<float>()[i])) << i;
  Tensor back = be->empty({M, K}, DType::kF32).value();
  ASSERT_TRUE(be->cast(ab, back).ok());
  for (int64_t i = 0; i < a.numel(); ++i) {
    uint32_t u = uint32_t{ab.data_as<uint16_t>()[i]} << 16;
    float f;
    std::memcpy(&f, &u, 4);
    ASSERT_EQ(back.data_as<float>()[i], f) << i;
  }
  Tensor bback = be->empty({N, K}, DType::kF32).value();
  ASSERT_TRUE(be->cast(bb, bback).ok());
  Tensor c = be->zeros({M, N}, DType::kF32).value();
  ASSERT_TRUE(be->gemm(ab, false, bb, true, c).ok());
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double ref = 0, mag = 0;
      for (int k = 0; k < K; ++k) {
        const double t =
            double(back.data_as<float>()[m * K + k]) * bback.data_as<float>()[n * K + k];
        ref += t;
        mag += std::fabs(t);
      }
      EXPECT_NEAR(c.data_as<float>()[m * N + n], ref, K * 6e-8 * mag);
    }
  const Status mixed = be->gemm(ab, false, b, true, c);
  ASSERT_FALSE(mixed.ok());
  EXPECT_NE(mixed.message().find("gemm: fp32 required (or bf16 A and B)"), std::string::npos)
      << mixed.to_string();
  Tensor wrong = be->empty({M, K}, DType::kF32).value();
  EXPECT_FALSE(be->cast(a, wrong).ok());  // fp32 -> fp32 is not a cast
}

// Fprop through the Tensor API: X[M,K] 1x128 x W[N,K] 128x128, against fp64 on the dequantized
// operands. Fast mode accumulates in fp32, so the bound is K * 2^-24 * sum|terms| (plus slack).
TEST(CpuBackend, Fp8FpropMatchesFp64OfDequantized) {
  auto be = make_cpu_backend();
  const int M = 64, N = 96, K = 384;
  Tensor x = randn(*be, {M, K}, 4);
  Tensor w = randn(*be, {N, K}, 5, 0.05f);
  QuantParams p;
  Tensor xq = be->quantize(x, Granularity::k1x128, p).value();
  Tensor wq = be->quantize(w, Granularity::k128x128, p).value();
  Tensor xd = be->empty({M, K}, DType::kF32).value(), wd = be->empty({N, K}, DType::kF32).value();
  ASSERT_TRUE(be->dequantize(xq, xd).ok());
  ASSERT_TRUE(be->dequantize(wq, wd).ok());
  for (GemmMode mode : {GemmMode::kFast, GemmMode::kExact}) {
    Tensor y = be->empty({M, N}, DType::kF32).value();
    ASSERT_TRUE(be->gemm_fp8(xq, wq, y, mode).ok());
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        double ref = 0, mag = 0;
        for (int k = 0; k < K; ++k) {
          const double t = double(xd.data_as<float>()[m * K + k]) * wd.data_as<float>()[n * K + k];
          ref += t;
          mag += std::fabs(t);
        }
        // Fast: fp32 accumulation, |err| <= K * 2^-24 * sum|t|. Exact (FP8.md 2.4): each 32-term
        // step loses < 33 u + 2^-13 |s| with u = 2^-13 * 2^emax <= 2^-13 * max(|t|, |c|), and |c|
        // is at most the block's sum|t| after 4 steps, so |err| <= 5 * 33 * 2^-13 * sum|t|.
        const double bound = mode == GemmMode::kFast ? K * 0x1p-24 : 5 * 33 * 0x1p-13;
        EXPECT_NEAR(y.data_as<float>()[m * N + n], ref, mag * bound + 1e-30);
      }
  }
  Tensor wrong = be->empty({M, N + 1}, DType::kF32).value();
  EXPECT_FALSE(be->gemm_fp8(xq, wq, wrong, GemmMode::kFast).ok());
  EXPECT_FALSE(be->gemm_fp8(wq, wq, wrong, GemmMode::kFast).ok());  // 128x128 x 128x128
}

// gather_rows_scaled against what it replaces in the MoE: zero rows plus a scatter-add of the
// gathered rows (scatter_add_rows, i -> i with the weights) into them. Bitwise, -0 inputs (which
// the scatter's 0 + turns into +0) and rows of -1 (zero rows) included, with and without weights.
TEST(CpuBackend, GatherRowsScaledIsScatterIntoZeros) {
  auto be = make_cpu_backend();
  const int64_t R = 9, D = 37, n = 14;
  Tensor in = randn(*be, {R, D}, 21);
  for (int64_t j = 0; j < D; j += 3) in.data_as<float>()[2 * D + j] = -0.0f;
  Tensor rows = be->empty({n}, DType::kI32).value(), w = randn(*be, {n}, 22);
  const int32_t rv[n] = {2, 0, -1, 8, 2, 5, -1, 3, 3, 7, 1, 2, 6, 4};
  std::memcpy(rows.data(), rv, sizeof(rv));
  for (bool weighted : {false, true}) {
    const Tensor wt = weighted ? w : Tensor();
    Tensor got = be->empty({n, D}, DType::kF32).value();
    ASSERT_TRUE(be->gather_rows_scaled(in, rows, wt, got).ok());
    // the reference: gather the kept rows, then scatter-add them (weighted) into zeros
    Tensor want = be->zeros({n, D}, DType::kF32).value();
    for (int64_t i = 0; i < n; ++i) {
      if (rv[i] < 0) continue;
      Tensor one = be->empty({1, D}, DType::kF32).value(), at = be->empty({1}, DType::kI32).value();
      std::memcpy(one.data(), in.data_as<float>() + rv[i] * D, D * sizeof(float));
      at.data_as<int32_t>()[0] = static_cast<int32_t>(i);
      Tensor wi = Tensor();
      if (weighted) {
        wi = be->empty({1}, DType::kF32).value();
        wi.data_as<float>()[0] = w.data_as<float>()[i];
      }
      ASSERT_TRUE(be->scatter_add_rows(one, at, wi, want).ok());
    }
    EXPECT_EQ(std::memcmp(got.data(), want.data(), want.nbytes()), 0) << weighted;
    // +0, not -0, where the input is -0 (row 2 gathered unweighted at i = 0)
    if (!weighted) {
      EXPECT_FALSE(std::signbit(got.data_as<float>()[0]));
    }
  }
  Tensor short_w = randn(*be, {n - 1}, 23), out = be->empty({n, D}, DType::kF32).value();
  const Status s = be->gather_rows_scaled(in, rows, short_w, out);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.to_string().find("gather_rows_scaled"), std::string::npos) << s.to_string();
}

// The row ops read their indices on the host: an index outside the input (or output, for the
// scatter) is an error naming the op, the index array, the place and the valid range, and -1 is
// a zero row only where the op defines one. A device does not check (its callers build them).
TEST(CpuBackend, RowOpsRefuseIndicesOutOfRange) {
  auto be = make_cpu_backend();
  const int64_t R = 5, D = 8;
  Tensor in = randn(*be, {R, D}, 41), out = be->empty({3, D}, DType::kF32).value();
  Tensor rows = be->empty({3}, DType::kI32).value();
  auto set = [&](int32_t a, int32_t b, int32_t c) {
    const int32_t v[3] = {a, b, c};
    std::memcpy(rows.data(), v, sizeof(v));
  };
  auto expect_error = [](const Status& s, const std::string& want) {
    EXPECT_FALSE(s.ok()) << want;
    EXPECT_NE(s.to_string().find(want), std::string::npos) << s.to_string();
  };
  set(0, 4, 2);
  EXPECT_TRUE(be->gather_rows(in, rows, out).ok());
  EXPECT_TRUE(be->gather_rows_scaled(in, rows, Tensor(), out).ok());
  set(0, 5, 2);
  expect_error(be->gather_rows(in, rows, out), "gather_rows: rows[1] = 5 is outside [0, 5)");
  expect_error(be->gather_rows_scaled(in, rows, Tensor(), out),
               "gather_rows_scaled: rows[1] = 5 is outside [-1, 5)");
  set(-1, 0, 1);
  EXPECT_TRUE(be->gather_rows_scaled(in, rows, Tensor(), out).ok());  // -1: a zero row
  expect_error(be->gather_rows(in, rows, out), "gather_rows: rows[0] = -1 is outside [0, 5)");
  set(-2, 0, 1);
  expect_error(be->gather_rows_scaled(in, rows, Tensor(), out),
               "gather_rows_scaled: rows[0] = -2 is outside [-1, 5)");
  Tensor acc = be->zeros({R, D}, DType::kF32).value();
  set(4, 0, 5);
  expect_error(be->scatter_add_rows(out, rows, Tensor(), acc),
               "scatter_add_rows: rows[2] = 5 is outside [0, 5)");
  const RowGroups one = make_row_groups(*be, {0, R}).value();
  const Tensor q = be->quantize(in, Granularity::k1x128, QuantParams{}).value();
  const RowGroups three = make_row_groups(*be, {0, 3}).value();
  set(1, 7, 0);
  expect_error(be->gather_fp8_groups(q, *q.scale(), one, true, rows, Tensor(), three).status(),
               "gather_fp8_groups: rows[1] = 7 is outside [-1, 5)");
  set(1, 2, 0);
  Tensor pad = be->empty({3}, DType::kI32).value();
  const int32_t pv[3] = {0, 3, -1};
  std::memcpy(pad.data(), pv, sizeof(pv));
  expect_error(be->gather_fp8_groups(q, *q.scale(), one, true, rows, pad, three).status(),
               "gather_fp8_groups: pad[1] = 3 is outside [-1, 3)");
}

// The experts' FP8 input gathered from the tokens quantized once equals quantize_groups of the
// gathered fp32 rows (1x128 scales are per row), zero rows included, with and without the
// padding indirection, in both formats and scale kinds.
TEST(CpuBackend, GatherFp8GroupsIsQuantizeGroupsOfTheRows) {
  auto be = make_cpu_backend();
  const int64_t n = 11, K = 300;
  Tensor x = randn(*be, {n, K}, 31, 3.0f);
  const RowGroups one = make_row_groups(*be, {0, n}).value();    // q is a plain quantize result
  const std::vector<int32_t> rv = {4, 0, 10, 4, 7, 2, 2, 9, 1};  // token of each assignment
  const std::vector<int32_t> pv = {0, 1, -1, -1, 2, 3, 4, 5, -1, 6, 7, 8, -1, -1, -1, -1};
  Tensor rows = be->empty({9}, DType::kI32).value(), pad = be->empty({16}, DType::kI32).value();
  std::memcpy(rows.data(), rv.data(), rv.size() * 4);
  std::memcpy(pad.data(), pv.data(), pv.size() * 4);
  for (bool padded : {false, true}) {
    const RowGroups groups = make_row_groups(*be, padded ? std::vector<int64_t>{0, 4, 9, 16}
                                                         : std::vector<int64_t>{0, 2, 2, 9})
                                 .value();
    const int64_t M = groups.total_rows();
    Tensor rowsx = be->zeros({M, K}, DType::kF32).value();  // the reference's fp32 rows
    for (int64_t j = 0; j < M; ++j) {
      const int64_t i = padded ? pv[j] : j;
      if (i >= 0)
        std::memcpy(rowsx.data_as<float>() + j * K, x.data_as<float>() + rv[i] * K, K * 4);
    }
    for (QuantParams p : {QuantParams{kernels::Fp8Format::kE4M3, true},
                          QuantParams{kernels::Fp8Format::kE5M2, false}}) {
      const GroupedFp8 want = be->quantize_groups(rowsx, groups, p).value();
      // the tokens as one quantize result, or grouped (as received from several ranks)
      const Tensor q = be->quantize(x, Granularity::k1x128, p).value();
      const RowGroups three = make_row_groups(*be, {0, 4, 4, 11}).value();
      const GroupedFp8 qg = be->quantize_groups(x, three, p).value();
      for (bool grouped_in : {false, true}) {
        const GroupedFp8 got =
            be->gather_fp8_groups(grouped_in ? qg.codes : q, grouped_in ? qg.scales : *q.scale(),
                                  grouped_in ? three : one, p.pow2, rows, padded ? pad : Tensor(),
                                  groups)
                .value();
        ASSERT_EQ(got.codes.nbytes(), want.codes.nbytes());
        EXPECT_EQ(std::memcmp(got.codes.data(), want.codes.data(), want.codes.nbytes()), 0)
            << padded << grouped_in;
        ASSERT_EQ(got.scales.nbytes(), want.scales.nbytes());
        EXPECT_EQ(std::memcmp(got.scales.data(), want.scales.data(), want.scales.nbytes()), 0)
            << padded << grouped_in;
      }
    }
  }
  const Tensor q = be->quantize(x, Granularity::k1x128, {}).value();
  const Status s = be->gather_fp8_groups(q, *q.scale(), one, true, rows, Tensor(),
                                         make_row_groups(*be, {0, 5}).value())
                       .status();
  EXPECT_NE(s.to_string().find("rows must have one entry per output row"), std::string::npos)
      << s.to_string();
}

// Grouped GEMMs: each result is its single call's (so the CPU's loop is the reference the CUDA
// test holds the concurrent version to), and GEMMs whose outputs overlap an output or an input of
// another are refused, naming both, since a backend may run them concurrently.
TEST(CpuBackend, GroupedGemmsAreSingleCallsAndRefuseOverlaps) {
  auto be = make_cpu_backend();
  const int64_t M = 40, N = 24, K = 256;
  Tensor x = randn(*be, {2 * M, K}, 11);
  Tensor w = randn(*be, {N, K}, 12, 0.05f);
  QuantParams p;
  Tensor x0 = be->quantize(x.slice_rows(0, M), Granularity::k1x128, p).value();
  Tensor x1 = be->quantize(x.slice_rows(M, 2 * M), Granularity::k1x128, p).value();
  Tensor wq = be->quantize(w, Granularity::k128x128, p).value();
  Tensor out = be->empty({2 * M, N}, DType::kF32).value();
  std::vector<Fp8GemmArgs> gs = {{x0, wq, out.slice_rows(0, M)},
                                 {x1, wq, out.slice_rows(M, 2 * M)}};
  ASSERT_TRUE(be->gemm_fp8_grouped(gs, GemmMode::kExact).ok());
  for (int i = 0; i < 2; ++i) {
    Tensor one = be->empty({M, N}, DType::kF32).value();
    ASSERT_TRUE(be->gemm_fp8(i ? x1 : x0, wq, one, GemmMode::kExact).ok());
    EXPECT_EQ(std::memcmp(one.data(), out.data_as<float>() + i * M * N, one.nbytes()), 0) << i;
  }
  // Overlapping outputs (rows M-1.. of the first slice shared with the second).
  gs[1].out = out.slice_rows(M - 1, 2 * M - 1);
  Status s = be->gemm_fp8_grouped(gs, GemmMode::kExact);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.to_string().find("outputs of GEMMs 0 and 1 overlap"), std::string::npos)
      << s.to_string();
  // An fp32 GEMM writing into another's input.
  Tensor a = randn(*be, {M, K}, 13), b = randn(*be, {K, N}, 14);
  Tensor c0 = be->empty({M, N}, DType::kF32).value();
  std::vector<GemmArgs> g32 = {
      {a, false, b, false, c0},
      {randn(*be, {3, K}, 15), false, randn(*be, {K, K}, 17), false, a.slice_rows(0, 3)}};
  s = be->gemm_grouped(g32);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.to_string().find("GEMM 1's output overlaps an input of GEMM 0"), std::string::npos)
      << s.to_string();
  // Disjoint again: the fp32 grouped results equal the single calls, beta included.
  Tensor c1 = randn(*be, {M, N}, 16), c1_single = be->empty({M, N}, DType::kF32).value();
  ASSERT_TRUE(be->copy(c1, c1_single).ok());
  g32 = {{a, false, b, false, c0}, {a, false, b, false, c1, 0.5f, 2.0f}};
  ASSERT_TRUE(be->gemm_grouped(g32).ok());
  ASSERT_TRUE(be->gemm(a, false, b, false, c1_single, 0.5f, 2.0f).ok());
  EXPECT_EQ(std::memcmp(c1.data(), c1_single.data(), c1.nbytes()), 0);
}

// Grouped FP8 ops: each group's codes and scales are those of the ungrouped op on its rows
// alone, found where the layout says, and each group's view is a working gemm_fp8 operand.
TEST(CpuBackend, GroupedQuantizeIsPerGroupQuantize) {
  auto be = make_cpu_backend();
  const std::vector<int64_t> off = {0, 37, 37, 197, 213, 342};  // an empty group; 160 rows: 2 tiles
  const int64_t M = off.back(), K = 256, KB = 2, N = 128;
  RowGroups gr = make_row_groups(*be, off).value();
  EXPECT_EQ(gr.tiles, (std::vector<int64_t>{0, 1, 1, 3, 4, 6}));
  Tensor x = randn(*be, {M, K}, 8);
  QuantParams p;
  p.pow2 = false;
  GroupedFp8 q = be->quantize_groups(x, gr, p).value();
  GroupedFp8 qt = be->quantize_transposed_groups(x, gr, p).value();
  Tensor xd = be->empty({M, K}, DType::kF32).value();
  ASSERT_TRUE(be->dequantize_groups(q, gr, xd).ok());
  Tensor w = randn(*be, {N, K}, 9, 0.05f);
  Tensor wq = be->quantize(w, Granularity::k128x128, p).value();
  for (int64_t g = 0; g < gr.count(); ++g) {
    const int64_t lo = off[g], n = off[g + 1] - lo;
    if (n == 0) {
      EXPECT_FALSE(q.group[g].defined());
      continue;
    }
    Tensor xs = be->empty({n, K}, DType::kF32).value();  // the group's rows, copied out
    std::memcpy(xs.data(), x.slice_rows(lo, lo + n).data(), xs.nbytes());
    Tensor r = be->quantize(xs, Granularity::k1x128, p).value();
    ASSERT_EQ(q.group[g].shape(), r.shape());
    EXPECT_EQ(std::memcmp(q.codes.data_as<uint8_t>() + lo * K, r.data(), r.nbytes()), 0) << g;
    EXPECT_EQ(
        std::memcmp(q.scales.data_as<float>() + lo * KB, r.scale()->data(), r.scale()->nbytes()), 0)
        << g;
    Tensor rt = be->quantize_transposed(xs, p).value();
    ASSERT_EQ(qt.group[g].shape(), rt.shape());
    EXPECT_EQ(std::memcmp(qt.group[g].data(), rt.data(), rt.nbytes()), 0) << g;
    ASSERT_EQ(qt.group[g].scale()->numel(), rt.scale()->numel());
    EXPECT_EQ(std::memcmp(qt.group[g].scale()->data(), rt.scale()->data(), rt.scale()->nbytes()), 0)
        << g;
    Tensor rd = be->empty({n, K}, DType::kF32).value();
    ASSERT_TRUE(be->dequantize(r, rd).ok());
    EXPECT_EQ(std::memcmp(xd.slice_rows(lo, lo + n).data(), rd.data(), rd.nbytes()), 0) << g;
    Tensor y = be->empty({n, N}, DType::kF32).value(), yr = be->empty({n, N}, DType::kF32).value();
    ASSERT_TRUE(be->gemm_fp8(q.group[g], wq, y, GemmMode::kExact).ok());
    ASSERT_TRUE(be->gemm_fp8(r, wq, yr, GemmMode::kExact).ok());
    EXPECT_EQ(std::memcmp(y.data(), yr.data(), y.nbytes()), 0) << g;
  }
  // Errors name the op and what it needs.
  Tensor short_x = randn(*be, {M - 1, K}, 8);
  auto bad = be->quantize_groups(short_x, gr, p);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().to_string().find("quantize_groups"), std::string::npos);
  EXPECT_FALSE(make_row_groups(*be, {0, 5, 3}).ok());
  EXPECT_FALSE(make_row_groups(*be, {1, 5}).ok());
}

// Batched weight quantization: each group is the per-tensor 128x128 quantize (and transpose_fp8)
// of its own tensor, with a partial last block (200 x 300), and the views are gemm_fp8 operands.
TEST(CpuBackend, QuantizeBlocksBatchIsPerTensorQuantize) {
  auto be = make_cpu_backend();
  const int64_t R = 200, C = 300, n = 3;
  std::vector<Tensor> ws;
  for (int64_t z = 0; z < n; ++z) ws.push_back(randn(*be, {R, C}, 30 + z, 0.05f));
  std::vector<const Tensor*> ptrs;
  for (const Tensor& w : ws) ptrs.push_back(&w);
  QuantParams p;
  GroupedFp8 q = be->quantize_blocks_batch(ptrs, p).value();
  GroupedFp8 qt = be->transpose_fp8_batch(q).value();
  ASSERT_EQ(q.group.size(), static_cast<size_t>(n));
  for (int64_t z = 0; z < n; ++z) {
    Tensor r = be->quantize(ws[z], Granularity::k128x128, p).value();
    Tensor rt = be->transpose_fp8(r).value();
    for (const auto& [got, want] : {std::pair{&q.group[z], &r}, std::pair{&qt.group[z], &rt}}) {
      ASSERT_EQ(got->shape(), want->shape()) << z;
      EXPECT_EQ(got->granularity(), Granularity::k128x128);
      EXPECT_EQ(std::memcmp(got->data(), want->data(), want->nbytes()), 0) << z;
      ASSERT_EQ(got->scale()->numel(), want->scale()->numel()) << z;
      EXPECT_EQ(std::memcmp(got->scale()->data(), want->scale()->data(), want->scale()->nbytes()),
                0)
          << z;
    }
    Tensor x = randn(*be, {64, C}, 40);
    Tensor xq = be->quantize(x, Granularity::k1x128, p).value();
    Tensor y = be->empty({64, R}, DType::kF32).value(),
           yr = be->empty({64, R}, DType::kF32).value();
    ASSERT_TRUE(be->gemm_fp8(xq, q.group[z], y, GemmMode::kExact).ok());
    ASSERT_TRUE(be->gemm_fp8(xq, r, yr, GemmMode::kExact).ok());
    EXPECT_EQ(std::memcmp(y.data(), yr.data(), y.nbytes()), 0) << z;
  }
  Tensor other = randn(*be, {R, C + 1}, 9);
  std::vector<const Tensor*> mixed = {&ws[0], &other};
  EXPECT_FALSE(be->quantize_blocks_batch(mixed, p).ok());
}

}  // namespace
}  // namespace fp8pipe
