// `fp8pipe bench`: micro-benchmarks of the FP8 numerics on this machine's backend. Quantize GB/s
// (bytes read + written) and FP8 GEMM throughput as a ratio to a plain fp32 sgemm of the same
// shape, the two timed alternately in one run so machine drift cancels in the ratio. "train" rows
// time whole training steps (FP8 against BF16) of the tiny and a shrunken small config; "moe layer
// host" the host's share of one MoE layer (time outside every backend call).
#include <cblas.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/config.h"
#include "core/log.h"
#include "core/model/moe.h"
#include "core/op_profile.h"
#include "launch/commands.h"
#include "launch/flops.h"
#include "launch/trainer.h"
#ifdef FP8PIPE_HAVE_CUDA
#include "launch/gpu_bench.h"
#endif

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

// `s` cut at spaces into lines of at most `width` characters (a longer word stays whole).
std::vector<std::string> wrap(const std::string& s, size_t width) {
  std::vector<std::string> lines(1);
  size_t b = 0;
  while (b < s.size()) {
    size_t e = s.find(' ', b);
    if (e == std::string::npos) e = s.size();
    const std::string word = s.substr(b, e - b);
    if (!lines.back().empty() && lines.back().size() + 1 + word.size() > width)
      lines.emplace_back();
    lines.back() += (lines.back().empty() ? "" : " ") + word;
    b = e + 1;
  }
  return lines;
}

// The table; a long shape (a train row's overrides) continues on the lines below its row.
void print_rows(const std::vector<Row>& rows) {
  size_t w = 18;
  for (const auto& r : rows) w = std::max(w, std::min<size_t>(r.shape.size(), 50));
  fmt::print("{:<26} {:<{}} {:>12} {:>12} {:>8}  {}\n", "bench", "shape", w, "value", "baseline",
             "ratio", "metric");
  for (const auto& r : rows) {
    const auto shape = wrap(r.shape, w);
    fmt::print("{:<26} {:<{}} {:>12.3f} {:>12.3f} {:>8.3f}  {}\n", r.name, shape[0], w, r.value,
               r.baseline, r.ratio, r.metric);
    for (size_t i = 1; i < shape.size(); ++i) fmt::print("{:<26} {}\n", "", shape[i]);
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

// One MoE layer's forward + backward (FP8, n = 8192 tokens in 8 sequences, 64 experts, top 8,
// hidden 128: small GEMMs, so routing work shows) on the backend, timed whole and with the op
// profiler: baseline = the wall time spent outside every backend call, i.e. the host's routing
// bookkeeping; ratio = its share of the wall time. Median of `reps` after one warm-up.
Result<Row> bench_moe_host(bool cuda, int reps) {
  std::unique_ptr<Backend> inner;
  if (cuda) {
    FP8_ASSIGN_OR_RETURN(inner, make_cuda_backend(0));
  } else {
    inner = make_cpu_backend();
  }
  std::shared_ptr<OpProfile> prof;
  std::unique_ptr<Backend> be = make_profiled_backend(std::move(inner), &prof);
  config::Model m;
  m.set_hidden(128);
  m.set_init_std(0.02f);
  config::Moe* moe = m.mutable_moe();
  moe->set_routed_experts(64);
  moe->set_shared_experts(1);
  moe->set_topk(8);
  moe->set_expert_hidden(128);
  moe->set_n_groups(8);
  moe->set_max_nodes(4);
  moe->set_route_scale(2.5f);
  moe->set_seq_aux_alpha(1e-4f);
  model::ModelCtx c;
  c.be = be.get();
  c.precision = model::Precision::kFP8;
  c.expert_row_align = cuda ? 16 : 1;  // as the trainer sets it
  c.count_nonfinite = false;
  model::MoE layer;
  FP8_RETURN_IF_ERROR(layer.init(c, "moe", m, 1));
  const int64_t B = 8, T = 1024, n = B * T;
  auto tensor = [&](uint32_t seed) -> Result<Tensor> {
    auto cpu = make_cpu_backend();
    FP8_ASSIGN_OR_RETURN(Tensor h, cpu->empty({n, 128}, DType::kF32));
    const auto v = randn(n * 128, seed);
    std::copy(v.begin(), v.end(), h.data_as<float>());
    FP8_ASSIGN_OR_RETURN(Tensor d, be->empty({n, 128}, DType::kF32));
    FP8_RETURN_IF_ERROR(be->copy(h, d));
    return d;
  };
  FP8_ASSIGN_OR_RETURN(Tensor x, tensor(1));
  FP8_ASSIGN_OR_RETURN(Tensor dy, tensor(2));
  std::vector<double> wall, outside;
  for (int i = 0; i <= reps; ++i) {
    be->compute().synchronize();
    prof->reset();
    const auto t0 = Clock::now();
    FP8_RETURN_IF_ERROR(layer.forward(c, 0, x, B, T).status());
    FP8_RETURN_IF_ERROR(layer.backward_input(c, 0, dy).status());
    FP8_RETURN_IF_ERROR(layer.backward_weight(c, 0));
    be->compute().synchronize();
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    double in_ops = 0;
    for (const OpStats& s : prof->totals()) in_ops += s.host_ms;
    layer.reset_stats();
    if (i == 0) continue;  // warm-up
    wall.push_back(ms);
    outside.push_back(ms - in_ops);
  }
  std::sort(wall.begin(), wall.end());
  std::sort(outside.begin(), outside.end());
  const double w = wall[wall.size() / 2], h = outside[outside.size() / 2];
  return Row{"moe layer host",
             "n=8192 E=64 K=8 hidden=128 FP8",
             "ms per fwd+bwd (wall | outside backend calls)",
             w,
             h,
             h / w};
}

// The MoE's per-expert GEMMs as one grouped call against the same GEMMs one call after another
// (Backend::gemm_fp8_grouped / gemm_grouped; the CUDA backend spreads a group over
// FP8PIPE_GEMM_STREAMS streams, so the few output tiles of each expert's GEMM do not leave most
// SMs idle). Shape: the small config's w1 forward at device_check's batch (8192 tokens x top 8 /
// 64 experts = 1024 rows each, hidden 1024 -> expert_hidden 384); on a CPU 16 experts of 128
// rows. value = grouped ms, baseline = serial ms (each the median of `reps`, timed alternately,
// `inner` calls per timing then a synchronization); ratio = serial / grouped.
Result<Row> bench_grouped(bool cuda, bool fp8, int reps) {
  std::unique_ptr<Backend> be;
  if (cuda) {
    FP8_ASSIGN_OR_RETURN(be, make_cuda_backend(0));
  } else {
    be = make_cpu_backend();
  }
  const int64_t E = cuda ? 64 : 16, M = cuda ? 1024 : 128, N = 384, K = 1024;
  const int inner = cuda ? 10 : 1;
  auto cpu = make_cpu_backend();
  auto upload = [&](int64_t rows, uint32_t seed, DType dt) -> Result<Tensor> {
    FP8_ASSIGN_OR_RETURN(Tensor h, cpu->empty({rows, K}, DType::kF32));
    const auto v = randn(rows * K, seed);
    std::copy(v.begin(), v.end(), h.data_as<float>());
    FP8_ASSIGN_OR_RETURN(Tensor d, be->empty({rows, K}, DType::kF32));
    FP8_RETURN_IF_ERROR(be->copy(h, d));
    if (dt == DType::kF32) return d;
    FP8_ASSIGN_OR_RETURN(Tensor b, be->empty({rows, K}, DType::kBF16));
    FP8_RETURN_IF_ERROR(be->cast(d, b));
    return b;
  };
  FP8_ASSIGN_OR_RETURN(Tensor out, be->empty({E * M, N}, DType::kF32));
  std::vector<Fp8GemmArgs> f8;
  std::vector<GemmArgs> g16;
  const DType in = fp8 ? DType::kF32 : DType::kBF16;
  FP8_ASSIGN_OR_RETURN(Tensor x, upload(E * M, 1, in));
  for (int64_t e = 0; e < E; ++e) {
    FP8_ASSIGN_OR_RETURN(Tensor w, upload(N, 100 + static_cast<uint32_t>(e), in));
    Tensor xe = x.slice_rows(e * M, (e + 1) * M), oe = out.slice_rows(e * M, (e + 1) * M);
    if (fp8) {
      FP8_ASSIGN_OR_RETURN(Tensor xq, be->quantize(xe, Granularity::k1x128, {}));
      FP8_ASSIGN_OR_RETURN(Tensor wq, be->quantize(w, Granularity::k128x128, {}));
      f8.push_back({xq, wq, oe});
    } else {
      g16.push_back({xe, false, w, true, oe});
    }
  }
  Status failed;
  auto keep = [&](Status s) {
    if (failed.ok() && !s.ok()) failed = s;
  };
  auto serial = [&] {
    for (int i = 0; i < inner; ++i) {
      for (const auto& g : f8) {
        Tensor o = g.out;
        keep(be->gemm_fp8(g.a, g.b, o, kernels::GemmMode::kFast));
      }
      for (const auto& g : g16) {
        Tensor o = g.c;
        keep(be->gemm(g.a, false, g.b, true, o));
      }
    }
    be->compute().synchronize();
  };
  auto grouped = [&] {
    for (int i = 0; i < inner; ++i) {
      keep(fp8 ? be->gemm_fp8_grouped(f8, kernels::GemmMode::kFast) : be->gemm_grouped(g16));
    }
    be->compute().synchronize();
  };
  const auto [tg, ts] = paired_median(grouped, serial, reps);
  FP8_RETURN_IF_ERROR(failed);
  const char* lanes = std::getenv("FP8PIPE_GEMM_STREAMS");
  return Row{fp8 ? "expert gemms fp8" : "expert gemms bf16",
             fmt::format("{} x {}x{}x{}{}", E, M, N, K,
                         cuda ? fmt::format(", {} streams", lanes ? lanes : "4") : ""),
             "ms per group (grouped | serial), ratio = serial / grouped",
             1e3 * tg / inner,
             1e3 * ts / inner,
             ts / tg};
}

// A "train" row's setup: a config file shrunk to CPU size by overrides (printed as its shape).
struct TrainCase {
  std::string name, config;
  std::vector<std::string> overrides;
};

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : " ") + x;
  return s.empty() ? "(as is)" : s;
}

Result<std::unique_ptr<Trainer>> make_trainer(const std::string& path,
                                              std::vector<std::string> overrides,
                                              const char* mode) {
  overrides.push_back(fmt::format("--precision.mode={}", mode));
  FP8_ASSIGN_OR_RETURN(auto cfg, load_config(path, overrides));
  return Trainer::create(cfg);
}

// Whole training steps (forward, backward, optimizer) in FP8 against BF16, same config, seed and
// data otherwise; one warm-up step each, then `reps` steps timed alternately (median). Two rows:
// tokens/s and achieved GFLOP/s = flops_per_token(...).train() x tokens / s; ratio = FP8 / BF16
// step time (> 1: FP8 slower; on the CPU backend both are emulated in fp32).
Result<std::vector<Row>> bench_train(const TrainCase& c, const std::string& dir, int reps,
                                     double peak_tflops) {
  const std::string path = dir + "/" + c.config;
  if (!std::filesystem::exists(path)) {
    return Status(Code::kNotFound, fmt::format("bench {}: no config '{}'", c.name, path),
                  "run from the repository root or pass --configs DIR");
  }
  FP8_ASSIGN_OR_RETURN(const auto cfg, load_config(path, c.overrides));
  const log::Level saved = log::threshold();
  log::set_threshold(log::Level::kWarn);  // the trainers' set-up lines would break the table
  auto fp8 = make_trainer(path, c.overrides, "FP8");
  auto bf16 = make_trainer(path, c.overrides, "BF16");
  Status failed;
  auto step = [&](Result<std::unique_ptr<Trainer>>& t) {
    if (!failed.ok()) return;
    if (auto r = (*t)->train_step(); !r.ok()) failed = r.status();
  };
  std::pair<double, double> times{1, 1};
  if (fp8.ok() && bf16.ok()) {
    times = paired_median([&] { step(fp8); }, [&] { step(bf16); }, reps);
  }
  log::set_threshold(saved);
  FP8_RETURN_IF_ERROR(fp8.status());
  FP8_RETURN_IF_ERROR(bf16.status());
  FP8_RETURN_IF_ERROR(failed);
  const auto [t8, t16] = times;
  const double tokens = double(cfg.train().global_batch()) * cfg.train().seq_len();
  const double flop = flops_per_token(cfg.model(), cfg.train().seq_len()).train();
  const std::string shape = join(c.overrides);
  std::vector<Row> rows = {
      {c.name, shape, "tok/s (fp8 | bf16), ratio = fp8/bf16 step time", tokens / t8, tokens / t16,
       t8 / t16},
      {c.name, shape, fmt::format("GFLOP/s (fp8 | bf16) at {:.4g} train FLOP/token", flop),
       flop * tokens / t8 / 1e9, flop * tokens / t16 / 1e9, t8 / t16},
  };
  if (peak_tflops > 0) {  // MFU against the dense BF16 peak, the usual convention
    rows.push_back({c.name, shape, fmt::format("MFU % (fp8 | bf16) of {:g} TFLOP/s", peak_tflops),
                    100 * flop * tokens / t8 / (peak_tflops * 1e12),
                    100 * flop * tokens / t16 / (peak_tflops * 1e12), t8 / t16});
  }
  return rows;
}

// tiny as is (--quick: a quarter of the batch); small cut to 2 blocks (1 dense + 1 MoE, + MTP),
// 16 routed experts, a 4096 vocabulary and a few sequences, keeping its widths (hidden 1024, MLA
// ranks, expert_hidden 384, top-8 routing) so a step takes seconds on a CPU.
std::vector<TrainCase> train_cases(bool quick, bool cuda) {
  if (cuda) {  // one GPU: tiny as is, small whole at a shrunken batch (launch/device_check.sh's)
    const std::vector<std::string> dev = {"--train.device=cuda", "--train.eval_every=0"};
    std::vector<std::string> small = dev;
    small.insert(small.end(), {"--parallel.microbatches=1", "--train.global_batch=8",
                               quick ? "--train.seq_len=512" : "--train.seq_len=1024"});
    return {{"train tiny cuda", "tiny.textproto", dev},
            {"train small cuda", "small.textproto", small}};
  }
  std::vector<std::string> tiny;
  if (quick) tiny = {"--train.global_batch=8"};
  std::vector<std::string> small = {"--model.layers=2", "--model.moe.routed_experts=16",
                                    "--model.vocab_size=4096", "--parallel.microbatches=1"};
  small.push_back(quick ? "--train.seq_len=64" : "--train.seq_len=128");
  small.push_back(quick ? "--train.global_batch=1" : "--train.global_batch=2");
  return {{"train tiny", "tiny.textproto", tiny}, {"train small", "small.textproto", small}};
}

int usage() {
  std::fprintf(stderr,
               "usage: fp8pipe bench [--filter SUBSTRING] [--json FILE] [--reps N] [--quick] "
               "[--configs DIR] [--device cpu|cuda] [--peak-tflops X]\n"
               "  --device cuda: the GPU micro-benchmarks (FP8 GEMM vs raw cuBLASLt vs BF16, "
               "quantize vs copy), then FP8/BF16 training steps on GPU 0 with MFU against "
               "--peak-tflops (default: 989 on an H100/H200, the dense BF16 peak)\n");
  return 2;
}

// Appends one JSON object per row to `path`.
bool write_json(const std::string& path, const std::vector<Row>& rows, const std::string& backend) {
  FILE* f = std::fopen(path.c_str(), "a");
  if (!f) {
    log::error("bench: cannot open --json file '{}'", path);
    return false;
  }
  for (const auto& r : rows) {
    fmt::print(f,
               "{{\"bench\":\"{}\",\"shape\":\"{}\",\"metric\":\"{}\",\"value\":{:.6g},"
               "\"baseline\":{:.6g},\"ratio\":{:.6g},\"backend\":\"{}\"}}\n",
               r.name, r.shape, r.metric, r.value, r.baseline, r.ratio, backend);
  }
  std::fclose(f);
  return true;
}

struct Options {
  std::string filter, json, configs = "configs", device = "cpu";
  int reps = 7;
  bool quick = false;
  double peak_tflops = -1;  // MFU denominator; < 0: from the device name
};

// A whole-string number > 0, or an error naming the flag and the value.
bool positive(const char* flag, const std::string& v, double* out) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !(x > 0) || !std::isfinite(x)) {
    std::fprintf(stderr, "fp8pipe bench: %s=%s: expected a number > 0\n", flag, v.c_str());
    return false;
  }
  *out = x;
  return true;
}

bool parse_options(int argc, char** argv, Options& o) {
  // --flag=value is --flag value.
  std::vector<std::string> split;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    const size_t eq = a.find('=');
    if (a.rfind("--", 0) == 0 && eq != std::string::npos) {
      split.push_back(a.substr(0, eq));
      split.push_back(a.substr(eq + 1));
    } else {
      split.push_back(a);
    }
  }
  std::vector<char*> args;
  for (auto& a : split) args.push_back(a.data());
  argc = static_cast<int>(args.size());
  argv = args.data();
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--filter" && i + 1 < argc)
      o.filter = argv[++i];
    else if (a == "--json" && i + 1 < argc)
      o.json = argv[++i];
    else if (a == "--reps" && i + 1 < argc) {
      double r = 0;
      if (!positive("--reps", argv[++i], &r) || r != std::floor(r)) {
        if (r > 0) std::fprintf(stderr, "fp8pipe bench: --reps=%s: expected an integer\n", argv[i]);
        return false;
      }
      o.reps = static_cast<int>(std::min(r, 1e6));
    } else if (a == "--configs" && i + 1 < argc)
      o.configs = argv[++i];
    else if (a == "--quick")
      o.quick = true;
    else if (a == "--device" && i + 1 < argc)
      o.device = argv[++i];
    else if (a == "--peak-tflops" && i + 1 < argc) {
      if (!positive("--peak-tflops", argv[++i], &o.peak_tflops)) return false;
    } else {
      std::fprintf(stderr, "fp8pipe bench: unknown argument '%s'\n", a.c_str());
      return false;
    }
  }
  return true;
}

using Bench = std::pair<std::string, std::function<Result<std::vector<Row>>()>>;

std::vector<Bench> all_benches(const Options& o) {
  const int reps = o.reps;
  const int64_t qR = o.quick ? 512 : 4096, qC = o.quick ? 1024 : 4096;
  const int64_t gm = o.quick ? 256 : 1024;
  using kernels::GemmMode;
  auto one = [](Row r) { return Result<std::vector<Row>>(std::vector<Row>{std::move(r)}); };
  const bool cuda = o.device == "cuda";
  std::vector<Bench> b;
  if (!cuda)
    b = {
        {"quantize 1x128", [=] { return one(bench_quantize(Granularity::k1x128, qR, qC, reps)); }},
        {"quantize 128x128",
         [=] { return one(bench_quantize(Granularity::k128x128, qR, qC, reps)); }},
        {"quantize 128x1", [=] { return one(bench_quantize(Granularity::k128x1, qR, qC, reps)); }},
        {"fp8 gemm fast", [=] { return one(bench_gemm(GemmMode::kFast, gm, gm, gm, reps)); }},
        {"fp8 gemm fast",
         [=] { return one(bench_gemm(GemmMode::kFast, gm, 2 * gm, gm / 2, reps)); }},
        {"fp8 gemm exact",
         [=] { return one(bench_gemm(GemmMode::kExact, 256, 256, 1024, std::min(reps, 3))); }},
    };
  for (bool fp8 : {true, false}) {
    b.push_back({fp8 ? "expert gemms fp8" : "expert gemms bf16", [=]() -> Result<std::vector<Row>> {
                   FP8_ASSIGN_OR_RETURN(Row r, bench_grouped(cuda, fp8, std::min(reps, 7)));
                   return std::vector<Row>{r};
                 }});
  }
  b.push_back({"moe layer host", [=]() -> Result<std::vector<Row>> {
                 FP8_ASSIGN_OR_RETURN(Row r, bench_moe_host(cuda, std::min(reps, 5)));
                 return std::vector<Row>{r};
               }});
  const int train_reps = std::min(reps, o.quick ? 3 : 5);  // training steps take seconds
  for (const auto& c : train_cases(o.quick, cuda)) {
    b.push_back({c.name, [=] { return bench_train(c, o.configs, train_reps, o.peak_tflops); }});
  }
  return b;
}

}  // namespace

constexpr int kNoDevice = 3;

// --device cuda: the GPU micro-benchmarks first (their own tables and JSONL lines), and the MFU
// peak from the device name when not given.
int gpu_micro_benchmarks(Options& o) {
#ifdef FP8PIPE_HAVE_CUDA
  auto be = make_cuda_backend(0);
  if (!be.ok()) {
    std::fprintf(stderr, "%s\n", be.status().to_string().c_str());
    return kNoDevice;
  }
  const std::string name = (*be)->name();
  if (o.peak_tflops < 0 &&
      (name.find("H100") != std::string::npos || name.find("H200") != std::string::npos)) {
    o.peak_tflops = 989.4;  // dense BF16, SXM (DEVICE.md)
  }
  fmt::print("device: {}; MFU peak {} TFLOP/s\n", name,
             o.peak_tflops > 0 ? fmt::format("{:g}", o.peak_tflops) : "unknown (--peak-tflops)");
  if (!o.filter.empty() && std::string("gpu micro").find(o.filter) == std::string::npos) return 0;
  std::vector<std::string> args = {"fp8pipe bench"};
  if (o.quick) args.push_back("--quick");
  if (!o.json.empty()) args.insert(args.end(), {"--json", o.json});  // truncates; rows follow
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  return run_gpu_bench(static_cast<int>(argv.size()), argv.data());
#else
  (void)o;
  std::fprintf(stderr, "fp8pipe bench --device=cuda: this fp8pipe was built without CUDA\n");
  return kNoDevice;
#endif
}

int cmd_bench(int argc, char** argv) {
  Options o;
  if (!parse_options(argc, argv, o)) return usage();
  if (o.device != "cpu" && o.device != "cuda") {
    std::fprintf(stderr, "fp8pipe bench: --device=%s (valid: cpu, cuda)\n", o.device.c_str());
    return usage();
  }
  std::vector<Row> rows;
  int rc = 0;
  if (o.device == "cuda" && (rc = gpu_micro_benchmarks(o)) == kNoDevice) return 1;
  for (const auto& [name, run] : all_benches(o)) {
    if (!o.filter.empty() && name.find(o.filter) == std::string::npos) continue;
    auto r = run();
    if (!r.ok()) {
      std::fprintf(stderr, "%s\n", r.status().to_string().c_str());
      rc = 1;
      continue;
    }
    rows.insert(rows.end(), r->begin(), r->end());
  }
  print_rows(rows);
  if (!o.json.empty() && !write_json(o.json, rows, o.device)) return 1;
  return rc;
}

}  // namespace fp8pipe::cli
