// GPU benchmark (DEVICE.md method: warm-ups, then >= 20 back-to-back calls each timed with CUDA
// events; median and mean; random data; L2 flush optional): FP8 block-scaled GEMM TFLOP/s through
// LtGemm vs the raw cuBLASLt call vs BF16, and quantize GB/s (bytes read + written) vs cudaMemcpy
// D2D. Usage: gpu_bench [--json FILE] [--reps N] [--warmup N] [--flush-l2] [--quick]; also run by
// `fp8pipe bench --device=cuda` (launch/cmd_bench.cc) through run_gpu_bench (launch/gpu_bench.h).
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cpu/fp8_codec.h"
#include "kernels/cpu/quantize.h"
#include "kernels/cuda/fp8_gemm_lt.h"
#include "kernels/cuda/quantize.cuh"
#include "launch/gpu_bench.h"

namespace fp8pipe::kernels::gpu {
namespace {

struct Options {
  std::string json;
  int reps = 20;
  int warmup = 3;
  bool flush_l2 = false;
  bool quick = false;
  bool smoke = false;  // one small shape of each kind: the code paths, not the speed
};

int g_failures = 0;
FILE* g_json = nullptr;

#define BENCH_CHECK_CUDA(expr)                                                                    \
  do {                                                                                            \
    const cudaError_t e_ = (expr);                                                                \
    if (e_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(2);                                                                               \
    }                                                                                             \
  } while (0)

bool ok(const Result& r, const std::string& what) {
  if (r.ok) return true;
  std::fprintf(stderr, "FAILED %s: %s\n", what.c_str(), r.msg.c_str());
  ++g_failures;
  return false;
}

// ---- random device data (hash based, deterministic) ----
__device__ __forceinline__ uint32_t hash32(uint64_t i, uint32_t seed) {
  uint64_t x = i * 0x9E3779B97F4A7C15ull + seed * 0xD1B54A32D192ED03ull;
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 29;
  return static_cast<uint32_t>(x >> 16);
}
__device__ __forceinline__ float uniform(uint64_t i, uint32_t seed) {  // [-1, 1)
  return static_cast<float>(static_cast<int32_t>(hash32(i, seed))) * 4.656612873e-10f;
}
__global__ void fill_fp8(uint8_t* q, size_t n, uint32_t seed) {  // E4M3 codes of U(-30, 30)
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    q[i] = float_to_fp8(uniform(i, seed) * 30.0f, Fp8Format::kE4M3, true);
  }
}
__global__ void fill_f32(float* x, size_t n, uint32_t seed, float lo, float hi) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    x[i] = lo + (hi - lo) * 0.5f * (uniform(i, seed) + 1.0f);
  }
}
__global__ void fill_bf16(uint16_t* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    x[i] = static_cast<uint16_t>(__float_as_uint(uniform(i, seed) * 4.0f) >> 16);
  }
}
constexpr int kFillGrid = 132 * 8, kFillBlock = 256;

template <class T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) {
    BENCH_CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T)));
  }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
};

// ---- timing ----
struct Timing {
  double median_ms = 0, mean_ms = 0, min_ms = 0;
};

class Timer {
 public:
  explicit Timer(const Options& o) : o_(o), ev_(2 * static_cast<size_t>(o.reps)) {
    BENCH_CHECK_CUDA(cudaStreamCreate(&st_));
    for (auto& e : ev_) BENCH_CHECK_CUDA(cudaEventCreate(&e));
    if (o.flush_l2) {
      flush_ = std::make_unique<Dev<uint8_t>>(kFlushBytes);
    }
  }
  ~Timer() {
    for (auto& e : ev_) cudaEventDestroy(e);
    cudaStreamDestroy(st_);
  }
  // fn enqueues one call on the stream and returns false on error. The reps are enqueued back to
  // back with a start/stop event pair around each and one synchronization at the end: the stream
  // stays busy (previous call or the L2 flush) while the host enqueues the next call, so a rep's
  // time is its GPU time, not also the host-side enqueue cost (measured apart by host_us). A
  // synchronization per rep would let the start event fire on an idle GPU and count the host's
  // time in fn (wrapper checks, cublasLtMatmul setup) as GPU time.
  bool time(const std::function<bool(cudaStream_t)>& fn, Timing* t) {
    for (int i = 0; i < o_.warmup; ++i) {
      if (!fn(st_)) return false;
    }
    // No synchronization here: the warm-ups keep the GPU busy while the first rep is enqueued.
    for (int i = 0; i < o_.reps; ++i) {
      if (flush_) BENCH_CHECK_CUDA(cudaMemsetAsync(flush_->p, i & 0xFF, kFlushBytes, st_));
      BENCH_CHECK_CUDA(cudaEventRecord(ev_[2 * i], st_));
      if (!fn(st_)) {
        BENCH_CHECK_CUDA(cudaStreamSynchronize(st_));
        return false;
      }
      BENCH_CHECK_CUDA(cudaEventRecord(ev_[2 * i + 1], st_));
    }
    BENCH_CHECK_CUDA(cudaStreamSynchronize(st_));
    BENCH_CHECK_CUDA(cudaGetLastError());
    std::vector<double> ms;
    for (int i = 0; i < o_.reps; ++i) {
      float v = 0;
      BENCH_CHECK_CUDA(cudaEventElapsedTime(&v, ev_[2 * i], ev_[2 * i + 1]));
      ms.push_back(v);
    }
    std::sort(ms.begin(), ms.end());
    t->min_ms = ms.front();
    t->median_ms =
        ms.size() % 2 ? ms[ms.size() / 2] : 0.5 * (ms[ms.size() / 2 - 1] + ms[ms.size() / 2]);
    double s = 0;
    for (double v : ms) s += v;
    t->mean_ms = s / ms.size();
    return true;
  }

  // Host-side cost of enqueueing one call (us), averaged over back-to-back calls.
  double host_us(const std::function<bool(cudaStream_t)>& fn, int n = 50) {
    BENCH_CHECK_CUDA(cudaStreamSynchronize(st_));
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) fn(st_);
    const auto t1 = std::chrono::steady_clock::now();
    BENCH_CHECK_CUDA(cudaStreamSynchronize(st_));
    return std::chrono::duration<double, std::micro>(t1 - t0).count() / n;
  }

 private:
  static constexpr size_t kFlushBytes = size_t{256} << 20;  // > 50 MB L2
  const Options& o_;
  cudaStream_t st_ = nullptr;
  std::vector<cudaEvent_t> ev_;  // start/stop of each rep
  std::unique_ptr<Dev<uint8_t>> flush_;
};

// ---- GEMM ----
struct GemmShape {
  int64_t M, N, K;
};
const GemmShape kGemmShapes[] = {{8192, 8192, 8192},  {4096, 7168, 2048},  {4096, 2112, 7168},
                                 {4096, 24576, 1536}, {4096, 7168, 16384}, {4096, 4096, 7168},
                                 {16384, 7168, 2048}};

struct GemmRow {
  GemmShape s;
  double bf16 = 0, raw = 0, wrap = 0, wrap_sk1 = 0, vecvec = 0;  // TFLOP/s (median)
  double host_raw_us = 0, host_wrap_us = 0;
};

void json_gemm(const GemmShape& s, const char* variant, const Timing& t, double tflops) {
  if (!g_json) return;
  std::fprintf(
      g_json,
      "{\"kind\":\"gemm\",\"M\":%lld,\"N\":%lld,\"K\":%lld,\"variant\":\"%s\",\"median_ms\":%.5f,"
      "\"mean_ms\":%.5f,\"min_ms\":%.5f,\"tflops\":%.1f}\n",
      static_cast<long long>(s.M), static_cast<long long>(s.N), static_cast<long long>(s.K),
      variant, t.median_ms, t.mean_ms, t.min_ms, tflops);
}

GemmRow bench_gemm(const GemmShape& s, Timer& timer, LtGemm& lt) {
  GemmRow row{s};
  const int64_t M = s.M, N = s.N, K = s.K, KB = ceil_div(K, 128);
  const double flop = 2.0 * M * N * K;
  Dev<uint8_t> xa(M * K), wb(N * K);
  Dev<float> sx(KB * M), sw(scale_count(Granularity::k128x128, N, K)), swv(KB * N);
  Dev<uint16_t> out(M * N), ab(M * K), bb(N * K);
  FP8PIPE_KERNEL(kFillGrid, kFillBlock, nullptr, fill_fp8)(xa.p, xa.n, 1);
  FP8PIPE_KERNEL(kFillGrid, kFillBlock, nullptr, fill_fp8)(wb.p, wb.n, 2);
  FP8PIPE_KERNEL(kFillGrid, kFillBlock, nullptr, fill_f32)(sx.p, sx.n, 3, 0.5f, 2.0f);
  FP8PIPE_KERNEL(kFillGrid, kFillBlock, nullptr, fill_f32)(sw.p, sw.n, 4, 0.5f, 2.0f);
  FP8PIPE_KERNEL(kFillGrid, kFillBlock, nullptr, fill_f32)(swv.p, swv.n, 5, 0.5f, 2.0f);
  FP8PIPE_KERNEL(kFillGrid, kFillBlock, nullptr, fill_bf16)(ab.p, ab.n, 6);
  FP8PIPE_KERNEL(kFillGrid, kFillBlock, nullptr, fill_bf16)(bb.p, bb.n, 7);
  BENCH_CHECK_CUDA(cudaDeviceSynchronize());
  const Fp8Operand a{xa.p, sx.p, Granularity::k1x128, Fp8Format::kE4M3};
  const Fp8Operand b{wb.p, sw.p, Granularity::k128x128, Fp8Format::kE4M3};
  const Fp8Operand bv{wb.p, swv.p, Granularity::k1x128, Fp8Format::kE4M3};
  const std::string sh = std::to_string(M) + "x" + std::to_string(N) + "x" + std::to_string(K);
  Timing t;

  // Labels built once: the lambdas are what host_us measures.
  const std::string l_bf16 = "bf16 " + sh, l_raw = "raw " + sh, l_wrap = "wrapper " + sh,
                    l_sk1 = "wrapper splitK1 " + sh, l_vv = "vec x vec " + sh;
  auto bf16 = [&](cudaStream_t st) {
    return ok(lt.bf16_gemm(ab.p, bb.p, M, N, K, nullptr, out.p, st), l_bf16);
  };
  if (timer.time(bf16, &t)) {
    row.bf16 = flop / t.median_ms / 1e9;
    json_gemm(s, "bf16", t, row.bf16);
  }
  RawLtFp8Gemm raw;
  if (ok(raw.init(lt.handle(), lt.workspace(), LtGemm::kWorkspaceBytes, a, b, M, N, K, nullptr,
                  out.p),
         "raw init " + sh)) {
    auto fn = [&](cudaStream_t st) { return ok(raw.run(st), l_raw); };
    if (timer.time(fn, &t)) {
      row.raw = flop / t.median_ms / 1e9;
      json_gemm(s, "fp8_blk_raw", t, row.raw);
      row.host_raw_us = timer.host_us(fn);
    }
  }
  auto wrap = [&](cudaStream_t st) {
    return ok(lt.fp8_gemm(a, b, M, N, K, nullptr, out.p, st), l_wrap);
  };
  if (timer.time(wrap, &t)) {
    row.wrap = flop / t.median_ms / 1e9;
    json_gemm(s, "fp8_blk_wrapper", t, row.wrap);
    row.host_wrap_us = timer.host_us(wrap);
  }
  auto sk1 = [&](cudaStream_t st) {
    return ok(lt.fp8_gemm(a, b, M, N, K, nullptr, out.p, st, true), l_sk1);
  };
  if (timer.time(sk1, &t)) {
    row.wrap_sk1 = flop / t.median_ms / 1e9;
    json_gemm(s, "fp8_blk_wrapper_splitk1", t, row.wrap_sk1);
  }
  auto vv = [&](cudaStream_t st) {
    return ok(lt.fp8_gemm(a, bv, M, N, K, nullptr, out.p, st), l_vv);
  };
  if (timer.time(vv, &t)) {
    row.vecvec = flop / t.median_ms / 1e9;
    json_gemm(s, "fp8_vecvec_wrapper", t, row.vecvec);
  }
  return row;
}

// ---- quantize ----
struct QuantRow {
  std::string name;
  int64_t R, C;
  double gbps = 0, pct = 0, median_ms = 0;
};

double copy_gbps(Timer& timer, bool smoke) {
  const size_t bytes = smoke ? size_t{1} << 20 : size_t{1} << 30;
  Dev<uint8_t> src(bytes), dst(bytes);
  BENCH_CHECK_CUDA(cudaMemset(src.p, 1, bytes));
  Timing t;
  timer.time(
      [&](cudaStream_t st) {
        return cudaMemcpyAsync(dst.p, src.p, bytes, cudaMemcpyDeviceToDevice, st) == cudaSuccess;
      },
      &t);
  const double gbps = 2.0 * bytes / (t.median_ms * 1e6);
  if (g_json)
    std::fprintf(g_json, "{\"kind\":\"copy\",\"bytes\":%zu,\"median_ms\":%.5f,\"gbps\":%.1f}\n",
                 bytes, t.median_ms, gbps);
  return gbps;
}

// Times fn (one call per rep) and fills row: GB/s over `bytes` read + written, % of the D2D
// copy; one JSONL line of `kind`.
QuantRow timed_row(QuantRow row, const char* kind, double bytes,
                   const std::function<bool(cudaStream_t)>& fn, double copy, Timer& timer) {
  Timing t;
  if (!timer.time(fn, &t)) return row;
  row.median_ms = t.median_ms;
  row.gbps = bytes / (t.median_ms * 1e6);
  row.pct = 100.0 * row.gbps / copy;
  if (g_json) {
    std::fprintf(g_json,
                 "{\"kind\":\"%s\",\"name\":\"%s\",\"R\":%lld,\"C\":%lld,\"bytes\":%.0f,"
                 "\"median_ms\":%.5f,\"mean_ms\":%.5f,\"gbps\":%.1f,\"pct_of_copy\":%.1f}\n",
                 kind, row.name.c_str(), static_cast<long long>(row.R),
                 static_cast<long long>(row.C), bytes, t.median_ms, t.mean_ms, row.gbps, row.pct);
  }
  return row;
}

QuantRow bench_quant(const std::string& name, int64_t R, int64_t C, Granularity g, bool bf16_in,
                     bool transposed, double copy, Timer& timer) {
  QuantRow row{name, R, C};
  const int64_t n = R * C, ns = scale_count(transposed ? Granularity::k128x1 : g, R, C);
  Dev<float> xf(bf16_in ? 0 : n), s(ns);
  Dev<uint16_t> xb(bf16_in ? n : 0);
  Dev<uint8_t> q(n);
  Dev<int> bad(1);
  if (bf16_in) {
    FP8PIPE_KERNEL(kFillGrid, kFillBlock, nullptr, fill_bf16)(xb.p, n, 11);
  } else {
    FP8PIPE_KERNEL(kFillGrid, kFillBlock, nullptr, fill_f32)(xf.p, n, 12, -3.0f, 3.0f);
  }
  BENCH_CHECK_CUDA(cudaDeviceSynchronize());
  const QuantParams p{Fp8Format::kE4M3, true};
  auto fn = [&](cudaStream_t st) {
    if (transposed && bf16_in)
      return ok(quantize_128x1_transposed_bf16(xb.p, R, C, p, q.p, s.p, bad.p, st), name);
    if (transposed) return ok(quantize_128x1_transposed(xf.p, R, C, p, q.p, s.p, bad.p, st), name);
    if (bf16_in) return ok(quantize_bf16(xb.p, R, C, g, p, q.p, s.p, bad.p, st), name);
    return ok(quantize(xf.p, R, C, g, p, q.p, s.p, bad.p, st), name);
  };
  const double bytes = double(n) * (bf16_in ? 2 : 4) + double(n) + double(ns) * 4;
  return timed_row(std::move(row), "quantize", bytes, fn, copy, timer);
}

// A wgrad operand from a cached 1x128 FP8 activation: the fused requantize (codes dequantized in
// the tile) or, `two_step`, dequantize to fp32 then quantize 128x1 transposed. GB/s counts the
// FP8 bytes in and out (+ scales) for both, so their ratio is the time ratio.
QuantRow bench_requant(const std::string& name, int64_t R, int64_t C, bool two_step, double copy,
                       Timer& timer) {
  QuantRow row{name, R, C};
  const int64_t n = R * C, KB = ceil_div(C, 128), ns = scale_count(Granularity::k128x1, R, C);
  Dev<uint8_t> qin(n), q(n);
  Dev<float> sx(KB * R), s(ns), xf(two_step ? n : 0);
  FP8PIPE_KERNEL(kFillGrid, kFillBlock, nullptr, fill_fp8)(qin.p, n, 13);
  FP8PIPE_KERNEL(kFillGrid, kFillBlock, nullptr, fill_f32)(sx.p, sx.n, 14, 0.5f, 2.0f);
  BENCH_CHECK_CUDA(cudaDeviceSynchronize());
  const QuantParams p{Fp8Format::kE4M3, true};
  auto fn = [&](cudaStream_t st) {
    if (!two_step) {
      return ok(requantize_128x1_transposed(qin.p, sx.p, Fp8Format::kE4M3, R, C, p, q.p, s.p,
                                            nullptr, st),
                name);
    }
    return ok(dequantize(qin.p, sx.p, R, C, Granularity::k1x128, Fp8Format::kE4M3, xf.p, st),
              name) &&
           ok(quantize_128x1_transposed(xf.p, R, C, p, q.p, s.p, nullptr, st), name);
  };
  const double bytes = 2.0 * n + double(KB * R + ns) * 4;
  return timed_row(std::move(row), "requantize", bytes, fn, copy, timer);
}

int run(const Options& o) {
  int dev = 0;
  cudaDeviceProp prop{};
  BENCH_CHECK_CUDA(cudaGetDevice(&dev));
  BENCH_CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  int rt = 0, drv = 0;
  cudaRuntimeGetVersion(&rt);
  cudaDriverGetVersion(&drv);
  std::printf(
      "device: %s, %d SMs, L2 %d MB | runtime %d driver %d cuBLASLt %zu | reps %d warmup %d%s\n",
      prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, rt, drv, cublasLtGetVersion(),
      o.reps, o.warmup, o.flush_l2 ? " | L2 flushed" : "");
  if (g_json) {
    std::fprintf(g_json,
                 "{\"kind\":\"device\",\"name\":\"%s\",\"sms\":%d,\"runtime\":%d,\"driver\":%d,"
                 "\"cublaslt\":%zu,\"reps\":%d,\"flush_l2\":%s}\n",
                 prop.name, prop.multiProcessorCount, rt, drv, cublasLtGetVersion(), o.reps,
                 o.flush_l2 ? "true" : "false");
  }
  Timer timer(o);
  LtGemm lt;
  if (!ok(lt.init(), "LtGemm::init")) return 1;

  // Quantize vs copy.
  const double copy = copy_gbps(timer, o.smoke);
  std::vector<QuantRow> qrows;
  const int64_t R = o.smoke ? 256 : 16384, C = o.smoke ? 384 : 7168;
  qrows.push_back(bench_quant("1x128 bf16", R, C, Granularity::k1x128, true, false, copy, timer));
  qrows.push_back(bench_quant("1x128 fp32", R, C, Granularity::k1x128, false, false, copy, timer));
  qrows.push_back(bench_quant("128x1^T bf16", R, C, Granularity::k128x1, true, true, copy, timer));
  qrows.push_back(bench_quant("128x1^T fp32", R, C, Granularity::k128x1, false, true, copy, timer));
  qrows.push_back(
      bench_quant("128x128 fp32", R, C, Granularity::k128x128, false, false, copy, timer));
  qrows.push_back(
      bench_quant("tensor bf16", R, C, Granularity::kPerTensor, true, false, copy, timer));
  qrows.push_back(bench_requant("requant 128x1^T", R, C, false, copy, timer));
  qrows.push_back(bench_requant("deq+quant 128x1^T", R, C, true, copy, timer));
  if (!o.quick && !o.smoke)
    qrows.push_back(
        bench_quant("1x128 bf16 (4096)", 4096, C, Granularity::k1x128, true, false, copy, timer));

  // GEMMs.
  std::vector<GemmRow> grows;
  for (const GemmShape& s : kGemmShapes) {
    grows.push_back(bench_gemm(o.smoke ? GemmShape{256, 384, 512} : s, timer, lt));
    if (o.quick || o.smoke) break;
  }

  std::printf(
      "\nquantize (E4M3, pow2 scales; GB/s = bytes read + written / median time; D2D copy %.0f "
      "GB/s)\n",
      copy);
  std::printf("%-20s %7s %6s %9s %8s %7s\n", "kernel", "R", "C", "ms", "GB/s", "%copy");
  for (const auto& r : qrows) {
    std::printf("%-20s %7lld %6lld %9.4f %8.0f %6.1f%%\n", r.name.c_str(),
                static_cast<long long>(r.R), static_cast<long long>(r.C), r.median_ms, r.gbps,
                r.pct);
  }
  std::printf(
      "\nGEMM TFLOP/s (median, BF16 out; fp8 = X 1x128 x W 128x128; vec = 1x128 x 1x128)\n");
  std::printf("%-18s %6s %8s %8s %8s %8s %6s %9s %9s\n", "MxNxK", "bf16", "fp8 raw", "fp8 ours",
              "ours sk1", "vec ours", "fp8/bf", "host raw", "host ours");
  for (const auto& r : grows) {
    char sh[48];
    std::snprintf(sh, sizeof(sh), "%lldx%lldx%lld", static_cast<long long>(r.s.M),
                  static_cast<long long>(r.s.N), static_cast<long long>(r.s.K));
    std::printf("%-18s %6.0f %8.0f %8.0f %8.0f %8.0f %6.2f %7.1fus %7.1fus\n", sh, r.bf16, r.raw,
                r.wrap, r.wrap_sk1, r.vecvec, r.bf16 > 0 ? r.wrap / r.bf16 : 0.0, r.host_raw_us,
                r.host_wrap_us);
  }
  std::printf("\n%s (%d failures)\n", g_failures ? "BENCH FAILED" : "bench ok", g_failures);
  return g_failures ? 1 : 0;
}

}  // namespace
}  // namespace fp8pipe::kernels::gpu

namespace fp8pipe::cli {

int run_gpu_bench(int argc, char** argv) {
  fp8pipe::kernels::gpu::Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) {
      o.json = argv[++i];
    } else if (a == "--reps" && i + 1 < argc) {
      o.reps = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--warmup" && i + 1 < argc) {
      o.warmup = std::max(0, std::atoi(argv[++i]));
    } else if (a == "--flush-l2") {
      o.flush_l2 = true;
    } else if (a == "--quick") {
      o.quick = true;
    } else if (a == "--smoke") {
      o.smoke = true;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--json FILE] [--reps N] [--warmup N] [--flush-l2] [--quick] "
                   "[--smoke]\n",
                   argv[0]);
      return 2;
    }
  }
  if (!o.json.empty()) {
    fp8pipe::kernels::gpu::g_json = std::fopen(o.json.c_str(), "w");
    if (!fp8pipe::kernels::gpu::g_json) {
      std::perror(o.json.c_str());
      return 2;
    }
  }
  const int rc = fp8pipe::kernels::gpu::run(o);
  if (fp8pipe::kernels::gpu::g_json) std::fclose(fp8pipe::kernels::gpu::g_json);
  return rc;
}

}  // namespace fp8pipe::cli
