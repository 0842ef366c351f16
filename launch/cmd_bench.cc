// `fp8pipe bench`: micro-benchmarks of the FP8 numerics on this machine's backend. Quantize GB/s
// (bytes read + written) and FP8 GEMM throughput as a ratio to a plain fp32 sgemm of the same
// shape, the two timed alternately in one run so machine drift cancels in the ratio.
#include <cblas.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/log.h"
#include "launch/commands.h"

namespace fp8pipe::cli {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_of(const std::function<void()>& fn) {
  const auto t0 = Clock::now();
  fn();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Median over `reps` of each function, timed alternately (a, b, a, b, ...) after one warm-up.
std::pair<double, double> paired_median(const std::function<void()>& a,
                                        const std::function<void()>& b, int reps) {
  a();
  b();
  std::vector<double> ta, tb;
  for (int i = 0; i < reps; ++i) {
    ta.push_back(seconds_of(a));
    tb.push_back(seconds_of(b));
  }
  std::sort(ta.begin(), ta.end());
  std::sort(tb.begin(), tb.end());
  return {ta[ta.size() / 2], tb[tb.size() / 2]};
}

std::vector<float> randn(int64_t n, uint32_t seed) {
  std::vector<float> v(n);
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (auto& x : v) x = d(rng);
  return v;
}

struct Row {
  std::string name, shape, metric;
  double value, baseline, ratio;
};

void print_rows(const std::vector<Row>& rows) {
  fmt::print("{:<26} {:<18} {:>12} {:>12} {:>8}  {}\n", "bench", "shape", "value", "baseline",
             "ratio", "metric");
  for (const auto& r : rows) {
    fmt::print("{:<26} {:<18} {:>12.3f} {:>12.3f} {:>8.3f}  {}\n", r.name, r.shape, r.value,
               r.baseline, r.ratio, r.metric);
  }
}

// Quantize throughput against a plain memcpy of the input (the bandwidth ceiling on this machine).
Row bench_quantize(Granularity g, int64_t R, int64_t C, int reps) {
  namespace k = kernels;
  auto x = randn(R * C, 1);
  std::vector<uint8_t> q(R * C);
  std::vector<float> s(k::scale_count(g, R, C)), copy(R * C);
  const k::QuantParams p;
  auto [tq, tc] = paired_median([&] { k::quantize(x.data(), R, C, g, p, q.data(), s.data()); },
                                [&] { std::copy(x.begin(), x.end(), copy.begin()); }, reps);
  const double qbytes = R * C * 5.0 + s.size() * 4.0;  // fp32 read + e4m3 written + scales
  const double cbytes = R * C * 8.0;                   // fp32 read + fp32 written
  return {fmt::format("quantize {}", granularity_name(g)),
          fmt::format("{}x{}", R, C),
          "GB/s (quantize | copy)",
          qbytes / tq / 1e9,
          cbytes / tc / 1e9,
          (qbytes / tq) / (cbytes / tc)};
}

// FP8 Fprop GEMM (X 1x128, W 128x128) against cblas_sgemm of the same M, N, K.
Row bench_gemm(kernels::GemmMode mode, int64_t M, int64_t N, int64_t K, int reps) {
  namespace k = kernels;
  auto x = randn(M * K, 2), w = randn(N * K, 3);
  std::vector<uint8_t> xq(M * K), wq(N * K);
  std::vector<float> xs(k::scale_count(Granularity::k1x128, M, K)),
      ws(k::scale_count(Granularity::k128x128, N, K)), y(M * N), y32(M * N);
  k::quantize(x.data(), M, K, Granularity::k1x128, {}, xq.data(), xs.data());
  k::quantize(w.data(), N, K, Granularity::k128x128, {}, wq.data(), ws.data());
  const k::Fp8Operand a{xq.data(), xs.data(), Granularity::k1x128, k::Fp8Format::kE4M3};
  const k::Fp8Operand b{wq.data(), ws.data(), Granularity::k128x128, k::Fp8Format::kE4M3};
  auto [t8, t32] = paired_median([&] { k::fp8_gemm(a, b, M, N, K, mode, y.data(), nullptr); },
                                 [&] {
                                   cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K,
                                               1.0f, x.data(), K, w.data(), K, 0.0f, y32.data(), N);
                                 },
                                 reps);
  const double flop = 2.0 * M * N * K;
  return {fmt::format("fp8 gemm {}", mode == k::GemmMode::kFast ? "fast" : "exact"),
          fmt::format("{}x{}x{}", M, N, K),
          "GFLOP/s (fp8 | sgemm)",
          flop / t8 / 1e9,
          flop / t32 / 1e9,
          t32 / t8};
}

int usage() {
  std::fprintf(stderr,
               "usage: fp8pipe bench [--filter SUBSTRING] [--json FILE] [--reps N] [--quick]\n");
  return 2;
}

}  // namespace

int cmd_bench(int argc, char** argv) {
  std::string filter, json;
  int reps = 7;
  bool quick = false;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--filter" && i + 1 < argc)
      filter = argv[++i];
    else if (a == "--json" && i + 1 < argc)
      json = argv[++i];
    else if (a == "--reps" && i + 1 < argc)
      reps = std::max(1, std::atoi(argv[++i]));
    else if (a == "--quick")
      quick = true;
    else {
      std::fprintf(stderr, "fp8pipe bench: unknown argument '%s'\n", a.c_str());
      return usage();
    }
  }
  const int64_t qR = quick ? 512 : 4096, qC = quick ? 1024 : 4096;
  const int64_t gm = quick ? 256 : 1024;
  using kernels::GemmMode;
  const std::vector<std::pair<std::string, std::function<Row()>>> benches = {
      {"quantize 1x128", [&] { return bench_quantize(Granularity::k1x128, qR, qC, reps); }},
      {"quantize 128x128", [&] { return bench_quantize(Granularity::k128x128, qR, qC, reps); }},
      {"quantize 128x1", [&] { return bench_quantize(Granularity::k128x1, qR, qC, reps); }},
      {"fp8 gemm fast", [&] { return bench_gemm(GemmMode::kFast, gm, gm, gm, reps); }},
      {"fp8 gemm fast", [&] { return bench_gemm(GemmMode::kFast, gm, 2 * gm, gm / 2, reps); }},
      {"fp8 gemm exact",
       [&] { return bench_gemm(GemmMode::kExact, 256, 256, 1024, std::min(reps, 3)); }},
  };
  std::vector<Row> rows;
  for (const auto& [name, run] : benches) {
    if (filter.empty() || name.find(filter) != std::string::npos) rows.push_back(run());
  }
  print_rows(rows);
  if (!json.empty()) {
    FILE* f = std::fopen(json.c_str(), "a");
    if (!f) {
      log::error("bench: cannot open --json file '{}'", json);
      return 1;
    }
    for (const auto& r : rows) {
      fmt::print(f,
                 "{{\"bench\":\"{}\",\"shape\":\"{}\",\"metric\":\"{}\",\"value\":{:.6g},"
                 "\"baseline\":{:.6g},\"ratio\":{:.6g},\"backend\":\"cpu\"}}\n",
                 r.name, r.shape, r.metric, r.value, r.baseline, r.ratio);
    }
    std::fclose(f);
  }
  return 0;
}

}  // namespace fp8pipe::cli
