// `fp8pipe quantize IN.safetensors OUT.safetensors [--granularity G] [--format F] [--scales S]
// [--skip REGEX]`: converts every floating tensor of a safetensors file to FP8 with the CPU
// kernels (FP8.md §2), writes the FP8 bytes plus their dequant scales, and reports the error.
//
// Output convention (DeepSeek-V3's checkpoint naming: `x.weight` -> `x.weight_scale_inv`):
//   NAME            F8_E4M3 | F8_E5M2, the original shape
//   NAME_scale_inv  F32, the DEQUANT scale (x ~= decode(NAME) * NAME_scale_inv) in the LOGICAL
//                   row-major shape of NAME viewed as [R, C] (R = product of the leading dims,
//                   C = last dim; rank 1 is [1, N]): 1x128 -> [R, ceil(C/128)],
//                   128x1 -> [ceil(R/128), C], 128x128 -> [ceil(R/128), ceil(C/128)], tensor -> []
// Floating tensors are F32, BF16, F16 and F64 (F16/F64 go through f32); tensors of rank 0, with no
// elements, of other dtypes or matching --skip (std::regex, ECMAScript, searched anywhere in the
// name) are copied unchanged. Metadata keeps the input's and adds fp8pipe.quant.* keys.
// Python (safetensors 0.8.0's numpy API cannot build F8 arrays; see
// tests/scripts/check_quantized.py):
//   with safe_open(OUT, framework="numpy") as f: s = f.get_tensor("w_scale_inv")
//   raw = dict(safetensors.deserialize(open(OUT, "rb").read()))
//   q = numpy.frombuffer(raw["w"]["data"], numpy.uint8).reshape(raw["w"]["shape"])
#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/safetensors.h"
#include "kernels/cpu/quantize.h"
#include "launch/commands.h"

namespace fp8pipe::cli {
namespace {

namespace k = fp8pipe::kernels;
namespace st = fp8pipe::safetensors;

constexpr char kScaleSuffix[] = "_scale_inv";
constexpr char kUsage[] =
    "usage: fp8pipe quantize IN.safetensors OUT.safetensors [--granularity "
    "1x128|128x1|128x128|tensor] [--format e4m3|e5m2] [--scales pow2|fp32] [--skip REGEX]";

struct Options {
  std::string in, out;
  Granularity gran = Granularity::k128x128;
  k::QuantParams params;  // e4m3, pow2
  std::string skip_pattern;
  std::optional<std::regex> skip;
};

Status set_flag(Options& o, std::string_view flag, const std::string& v) {
  if (flag == "--granularity") {
    auto g = parse_granularity(v);
    if (!g.ok()) return g.status().with_context("--granularity");
    o.gran = *g;
  } else if (flag == "--format") {
    if (v != "e4m3" && v != "e5m2") {
      return FP8_INVALID("--format: unknown format '{}' (valid: e4m3, e5m2)", v);
    }
    o.params.fmt = v == "e4m3" ? k::Fp8Format::kE4M3 : k::Fp8Format::kE5M2;
  } else if (flag == "--scales") {
    if (v != "pow2" && v != "fp32") {
      return FP8_INVALID("--scales: unknown scale mode '{}' (valid: pow2, fp32)", v);
    }
    o.params.pow2 = v == "pow2";
  } else if (flag == "--skip") {
    try {
      o.skip.emplace(v, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      return FP8_INVALID("--skip: invalid regular expression '{}': {}", v, e.what());
    }
    o.skip_pattern = v;
  } else {
    return FP8_INVALID("unknown flag '{}' (valid: --granularity, --format, --scales, --skip)",
                       flag);
  }
  return Status::Ok();
}

Result<Options> parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> pos;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0) {
      pos.push_back(a);
      continue;
    }
    std::string value;
    if (const auto eq = a.find('='); eq != std::string::npos) {
      value = a.substr(eq + 1);
      a.resize(eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      return FP8_INVALID("flag '{}' needs a value\n{}", a, kUsage);
    }
    FP8_RETURN_IF_ERROR(set_flag(o, a, value));
  }
  if (pos.size() != 2) {
    return FP8_INVALID("expected IN and OUT paths, got {} positional argument(s)\n{}", pos.size(),
                       kUsage);
  }
  o.in = pos[0];
  o.out = pos[1];
  return o;
}

const char* format_name(k::Fp8Format f) { return f == k::Fp8Format::kE4M3 ? "e4m3" : "e5m2"; }

// IEEE binary16 -> float, exact.
float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1F, m = h & 0x3FFu;
  if (e == 0x1F) return k::bits_f32(sign | 0x7F800000u | (m << 13));
  if (e != 0) return k::bits_f32(sign | ((e + 112) << 23) | (m << 13));
  const float v = std::ldexp(static_cast<float>(m), -24);  // zero or subnormal, exact
  return sign ? -v : v;
}

bool is_float_dtype(const std::string& d) {
  return d == "F32" || d == "BF16" || d == "F16" || d == "F64";
}

// The input of one tensor as the kernels take it: f32 or bf16 bits, aligned (copied if needed).
struct Source {
  const float* f32 = nullptr;
  const uint16_t* bf16 = nullptr;
  std::vector<float> f32_copy;
  std::vector<uint16_t> bf16_copy;
  float at(int64_t i) const { return f32 ? f32[i] : k::bf16_to_float(bf16[i]); }
};

Source make_source(const st::TensorView& t) {
  Source s;
  const int64_t n = t.numel();
  const auto addr = reinterpret_cast<uintptr_t>(t.data);
  if (t.dtype == "BF16") {
    if (addr % alignof(uint16_t) == 0) {
      s.bf16 = reinterpret_cast<const uint16_t*>(t.data);
    } else {
      s.bf16_copy.resize(n);
      std::memcpy(s.bf16_copy.data(), t.data, t.nbytes);
      s.bf16 = s.bf16_copy.data();
    }
    return s;
  }
  if (t.dtype == "F32" && addr % alignof(float) == 0) {
    s.f32 = reinterpret_cast<const float*>(t.data);
    return s;
  }
  s.f32_copy.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    if (t.dtype == "F32") {
      std::memcpy(&s.f32_copy[i], t.data + 4 * i, 4);
    } else if (t.dtype == "F16") {
      uint16_t h;
      std::memcpy(&h, t.data + 2 * i, 2);
      s.f32_copy[i] = half_to_float(h);
    } else {  // F64, rounded to nearest
      double d;
      std::memcpy(&d, t.data + 8 * i, 8);
      s.f32_copy[i] = static_cast<float>(d);
    }
  }
  s.f32 = s.f32_copy.data();
  return s;
}

// Kernel scale layout (quantize.h, cuBLASLt's) -> logical row-major array and its shape.
std::vector<float> logical_scales(const std::vector<float>& s, Granularity g, int64_t rows,
                                  int64_t cols, std::vector<int64_t>& shape) {
  const int64_t rb = k::ceil_div(rows, 128), kb = k::ceil_div(cols, 128);
  std::vector<float> out;
  switch (g) {
    case Granularity::k1x128:  // s[kb*R + r] -> [R][KB]
      shape = {rows, kb};
      out.resize(rows * kb);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t b = 0; b < kb; ++b) out[r * kb + b] = s[b * rows + r];
      break;
    case Granularity::k128x1:  // s[rb*C + c] is already [RB][C]
      shape = {rb, cols};
      out.assign(s.begin(), s.begin() + rb * cols);
      break;
    case Granularity::k128x128:  // s[rb*pad4(KB) + kb] -> [RB][KB], padding dropped
      shape = {rb, kb};
      out.resize(rb * kb);
      for (int64_t r = 0; r < rb; ++r)
        for (int64_t b = 0; b < kb; ++b) out[r * kb + b] = s[r * k::pad4(kb) + b];
      break;
    case Granularity::kPerTensor:
      shape = {};
      out = {s[0]};
      break;
  }
  return out;
}

// Scale of element (r, c) in the logical layout above.
float logical_scale_at(const std::vector<float>& s, Granularity g, int64_t cols, int64_t r,
                       int64_t c) {
  switch (g) {
    case Granularity::k1x128:
      return s[r * k::ceil_div(cols, 128) + c / 128];
    case Granularity::k128x1:
      return s[(r / 128) * cols + c];
    case Granularity::k128x128:
      return s[(r / 128) * k::ceil_div(cols, 128) + c / 128];
    case Granularity::kPerTensor:
      break;
  }
  return s[0];
}

struct Stats {
  double max_abs = 0, sum_sq_err = 0, sum_sq = 0, max_rel = 0;
  int64_t nonfinite_groups = 0;
};

// Error of decode(q) * scale against the input. Groups with a non-finite scale (NaN/Inf input)
// are left out. The relative error is taken over elements whose scaled value lies in the format's
// normal range (|x| >= scale * 2^emin), where it is bounded by half an ulp (2^-4 / 2^-3).
Stats error_stats(const Source& src, const std::vector<uint8_t>& q, const std::vector<float>& s,
                  Granularity g, k::Fp8Format fmt, int64_t rows, int64_t cols) {
  Stats st;
  const float min_normal = fmt == k::Fp8Format::kE4M3 ? 0x1p-6f : 0x1p-14f;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float sf = logical_scale_at(s, g, cols, r, c);
      if (!std::isfinite(sf)) continue;
      const int64_t i = r * cols + c;
      const float x = src.at(i);
      const float y = k::fp8_to_float(q[i], fmt) * sf;
      const double err = std::fabs(static_cast<double>(y) - x);
      st.max_abs = std::max(st.max_abs, err);
      st.sum_sq_err += err * err;
      st.sum_sq += static_cast<double>(x) * x;
      if (std::fabs(x) >= min_normal * sf && x != 0) {
        st.max_rel = std::max(st.max_rel, err / std::fabs(x));
      }
    }
  }
  return st;
}

struct Quantized {
  std::vector<uint8_t> q;
  std::vector<float> scales;  // logical layout
  std::vector<int64_t> scale_shape;
  Stats stats;
  double seconds = 0;
  int64_t kernel_bytes = 0;  // read + written by the quantize kernel
};

Quantized quantize_tensor(const st::TensorView& t, const Options& o) {
  const int64_t cols = t.shape.back(), rows = t.numel() / cols;
  const Source src = make_source(t);
  std::vector<float> s(k::scale_count(o.gran, rows, cols));
  Quantized out;
  out.q.resize(rows * cols);
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t bad =
      src.f32 ? k::quantize(src.f32, rows, cols, o.gran, o.params, out.q.data(), s.data())
              : k::quantize_bf16(src.bf16, rows, cols, o.gran, o.params, out.q.data(), s.data());
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  out.kernel_bytes = rows * cols * ((src.f32 ? 4 : 2) + 1) + static_cast<int64_t>(s.size()) * 4;
  out.scales = logical_scales(s, o.gran, rows, cols, out.scale_shape);
  out.stats = error_stats(src, out.q, out.scales, o.gran, o.params.fmt, rows, cols);
  out.stats.nonfinite_groups = bad;
  return out;
}

bool should_quantize(const st::TensorView& t, const Options& o) {
  return is_float_dtype(t.dtype) && !t.shape.empty() && t.numel() > 0 &&
         !(o.skip && std::regex_search(t.name, *o.skip));
}

std::span<const uint8_t> bytes_of(const std::vector<float>& v) {
  return {reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(float)};
}

// Every output name must be new: NAME_scale_inv may not collide with an input tensor.
Status check_names(const st::Reader& in, const Options& o) {
  for (const st::TensorView& t : in.tensors()) {
    if (!should_quantize(t, o)) continue;
    const std::string sname = t.name + kScaleSuffix;
    if (in.find(sname)) {
      return FP8_INVALID(
          "{}: tensor '{}' would be written as '{}' + '{}', but the input already "
          "has a tensor '{}' (exclude one with --skip)",
          in.path(), t.name, t.name, sname, sname);
    }
  }
  return Status::Ok();
}

void print_row(const st::TensorView& t, const std::string& action, const Stats* s, int width) {
  if (!s) {
    fmt::print("{:<{}} {:<18} {:<7} {:<10}\n", t.name, width, t.shape_str(), t.dtype, action);
    return;
  }
  const double rel_rms = s->sum_sq > 0 ? std::sqrt(s->sum_sq_err / s->sum_sq) : 0.0;
  fmt::print("{:<{}} {:<18} {:<7} {:<10} {:>11.4g} {:>11.4g} {:>11.4g} {:>9}\n", t.name, width,
             t.shape_str(), t.dtype, action, s->max_abs, rel_rms, s->max_rel, s->nonfinite_groups);
}

struct Totals {
  int quantized = 0, copied = 0;
  double seconds = 0;
  int64_t kernel_bytes = 0;
};

Result<Totals> convert(const st::Reader& in, const Options& o, st::Writer& w) {
  int width = 6;
  for (const auto& t : in.tensors())
    width = std::max<int>(width, std::min<size_t>(t.name.size(), 60));
  fmt::print("{:<{}} {:<18} {:<7} {:<10} {:>11} {:>11} {:>11} {:>9}\n", "tensor", width, "shape",
             "dtype", "action", "max_abs_err", "rms_err/rms", "max_rel_err", "nonfinite");
  Totals tot;
  for (const st::TensorView& t : in.tensors()) {
    if (!should_quantize(t, o)) {
      FP8_RETURN_IF_ERROR(w.add(t.name, t.dtype, t.shape, std::span(t.data, t.nbytes)));
      print_row(t, "copy", nullptr, width);
      ++tot.copied;
      continue;
    }
    Quantized qt = quantize_tensor(t, o);
    const std::string fp8 = o.params.fmt == k::Fp8Format::kE4M3 ? "F8_E4M3" : "F8_E5M2";
    FP8_RETURN_IF_ERROR(w.add(t.name, fp8, t.shape, std::move(qt.q)));
    const auto sbytes = bytes_of(qt.scales);
    FP8_RETURN_IF_ERROR(w.add(t.name + kScaleSuffix, "F32", qt.scale_shape,
                              std::vector<uint8_t>(sbytes.begin(), sbytes.end())));
    print_row(t, granularity_name(o.gran), &qt.stats, width);
    ++tot.quantized;
    tot.seconds += qt.seconds;
    tot.kernel_bytes += qt.kernel_bytes;
  }
  return tot;
}

Status run(const Options& o) {
  const auto start = std::chrono::steady_clock::now();
  FP8_ASSIGN_OR_RETURN(st::Reader in, st::Reader::open(o.in));
  FP8_RETURN_IF_ERROR(check_names(in, o));
  st::Writer w;
  for (const auto& [key, value] : in.metadata()) w.set_metadata(key, value);
  w.set_metadata("fp8pipe.quant.granularity", granularity_name(o.gran));
  w.set_metadata("fp8pipe.quant.format", format_name(o.params.fmt));
  w.set_metadata("fp8pipe.quant.scales", o.params.pow2 ? "pow2" : "fp32");
  w.set_metadata("fp8pipe.quant.scale_suffix", kScaleSuffix);
  if (o.skip) w.set_metadata("fp8pipe.quant.skip", o.skip_pattern);
  FP8_ASSIGN_OR_RETURN(Totals tot, convert(in, o, w));
  FP8_RETURN_IF_ERROR(w.write(o.out));
  std::error_code ec;
  const auto out_bytes = std::filesystem::file_size(o.out, ec);
  fmt::print("{} tensors quantized ({}, {}, {} scales), {} copied; {} bytes in, {} bytes out\n",
             tot.quantized, granularity_name(o.gran), format_name(o.params.fmt),
             o.params.pow2 ? "pow2" : "fp32", tot.copied, in.file_bytes(), out_bytes);
  const double gbs = tot.seconds > 0 ? tot.kernel_bytes / tot.seconds / 1e9 : 0.0;
  const double wall =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print(
      "quantize kernels: {:.3f} s, {:.2f} GB/s (bytes read + written, first touch of the "
      "mapped input included); total {:.3f} s\n",
      tot.seconds, gbs, wall);
  return Status::Ok();
}

}  // namespace

int cmd_quantize(int argc, char** argv) {
  auto opts = parse_args(argc, argv);
  if (!opts.ok()) {
    std::fprintf(stderr, "fp8pipe quantize: %s\n", opts.status().message().c_str());
    return 2;
  }
  if (Status s = run(*opts); !s.ok()) {
    std::fprintf(stderr, "fp8pipe quantize: %s\n", s.to_string().c_str());
    return 1;
  }
  return 0;
}

}  // namespace fp8pipe::cli
