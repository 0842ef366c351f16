#include "launch/metrics.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cmath>

#include "core/log.h"

namespace fp8pipe {

std::string rank_path(std::string pattern, int rank) {
  for (size_t pos; (pos = pattern.find("{rank}")) != std::string::npos;) {
    pattern.replace(pos, 6, std::to_string(rank));
  }
  return pattern;
}

Result<MetricsSink> MetricsSink::open(const std::string& jsonl_path, int rank, int64_t every,
                                      bool console) {
  MetricsSink s;
  s.every_ = every < 1 ? 1 : every;
  s.console_ = console;
  if (!jsonl_path.empty()) {
    const std::string p = rank_path(jsonl_path, rank);
    s.f_ = std::fopen(p.c_str(), "w");
    if (!s.f_) {
      return FP8_ERROR(Code::kIo, "log.jsonl: cannot open '{}' for writing", p);
    }
  }
  return s;
}

MetricsSink::MetricsSink(MetricsSink&& o) noexcept
    : f_(o.f_), every_(o.every_), console_(o.console_) {
  o.f_ = nullptr;
}

MetricsSink::~MetricsSink() {
  if (f_) std::fclose(f_);
}

void MetricsSink::write(const StepRecord& r) {
  if (console_ && (r.step % every_ == 0 || r.step == 1 || r.eval_loss >= 0)) {
    std::string mfu = r.mfu < 0 ? "n/a" : fmt::format("{:.1f}%", 100 * r.mfu);
    std::string line = fmt::format(
        "step {:>6} | loss {:.4f} | mtp {:.4f} | lr {:.3e} | gnorm {:.3f} | tok/s {:.0f} | "
        "TFLOP/s {:.4f} | mfu {} | mem {:.2f} GiB | tensors {:.3f} GiB | overload {:.2f} | "
        "skipped {} | {:.0f} ms",
        r.step, r.loss, r.mtp_loss, r.lr, r.grad_norm, r.tokens_per_s, r.tflops, mfu, r.mem_gib,
        r.tensor_gib, r.expert_overload, r.skipped, r.ms);
    if (r.ramping) line += fmt::format(" | batch {}", r.batch);
    if (r.eval_loss >= 0) line += fmt::format(" | eval {:.4f}", r.eval_loss);
    if (r.eval_ema_loss >= 0) line += fmt::format(" | eval ema {:.4f}", r.eval_ema_loss);
    log::info("{}", line);
  }
  if (!f_) return;
  std::string loads;
  for (const auto& l : r.loads) {
    loads += fmt::format("{}{{\"layer\":\"{}\",\"max_over_mean\":{:.6g},\"dead\":{}}}",
                         loads.empty() ? "" : ",", l.layer, l.max_over_mean, l.dead);
  }
  // JSON has no NaN/Inf: a non-finite value (a skipped step's loss or norm) is written as null.
  auto g = [](double v, int digits) {
    return std::isfinite(v) ? fmt::format("{:.{}g}", v, digits) : std::string("null");
  };
  fmt::print(f_,
             "{{\"step\":{},\"loss\":{},\"mtp_loss\":{},\"aux_loss\":{},\"lr\":{},"
             "\"grad_norm\":{},\"tokens_per_s\":{},\"tflops\":{},\"mfu\":{},"
             "\"mem_gib\":{},\"tensor_gib\":{},\"ms\":{},\"tokens\":{},\"batch\":{},\"skipped\":{},"
             "\"dropped\":{},"
             "\"a2a_bytes\":{},\"expert_overload\":{},\"eval_loss\":{},\"eval_ema_loss\":{},"
             "\"expert_load\":[{}]}}\n",
             r.step, g(r.loss, 8), g(r.mtp_loss, 8), g(r.aux_loss, 6), g(r.lr, 6),
             g(r.grad_norm, 6), g(r.tokens_per_s, 6), g(r.tflops, 6), g(r.mfu, 6), g(r.mem_gib, 4),
             g(r.tensor_gib, 4), g(r.ms, 6), r.tokens_seen, r.batch, r.skipped, r.dropped,
             r.a2a_bytes, g(r.expert_overload, 6), g(r.eval_loss, 8), g(r.eval_ema_loss, 8), loads);
  std::fflush(f_);
}

void MetricsSink::note(const std::string& json_object) {
  if (!f_) return;
  fmt::print(f_, "{}\n", json_object);
  std::fflush(f_);
}

double resident_gib() {
  long pages = 0, resident = 0;
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return 0;
  if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
  std::fclose(f);
  return static_cast<double>(resident) * sysconf(_SC_PAGESIZE) / (1024.0 * 1024 * 1024);
}

}  // namespace fp8pipe
