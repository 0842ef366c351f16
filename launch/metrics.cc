#include "launch/metrics.h"

#include <fmt/format.h>
#include <unistd.h>

#include "core/log.h"

namespace fp8pipe {

Result<MetricsSink> MetricsSink::open(const std::string& jsonl_path, int rank, int64_t every,
                                      bool console) {
  MetricsSink s;
  s.every_ = every < 1 ? 1 : every;
  s.console_ = console;
  if (!jsonl_path.empty()) {
    std::string p = jsonl_path;
    for (size_t pos; (pos = p.find("{rank}")) != std::string::npos;) {
      p.replace(pos, 6, std::to_string(rank));
    }
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
        "TFLOP/s {:.4f} | mfu {} | mem {:.2f} GiB | overload {:.2f} | skipped {} | {:.0f} ms",
        r.step, r.loss, r.mtp_loss, r.lr, r.grad_norm, r.tokens_per_s, r.tflops, mfu, r.mem_gib,
        r.expert_overload, r.skipped, r.ms);
    if (r.eval_loss >= 0) line += fmt::format(" | eval {:.4f}", r.eval_loss);
    log::info("{}", line);
  }
  if (!f_) return;
  std::string loads;
  for (const auto& l : r.loads) {
    loads += fmt::format("{}{{\"layer\":\"{}\",\"max_over_mean\":{:.6g},\"dead\":{}}}",
                         loads.empty() ? "" : ",", l.layer, l.max_over_mean, l.dead);
  }
  fmt::print(f_,
             "{{\"step\":{},\"loss\":{:.8g},\"mtp_loss\":{:.8g},\"aux_loss\":{:.6g},\"lr\":{:.6g},"
             "\"grad_norm\":{:.6g},\"tokens_per_s\":{:.6g},\"tflops\":{:.6g},\"mfu\":{:.6g},"
             "\"mem_gib\":{:.4g},\"ms\":{:.6g},\"tokens\":{},\"skipped\":{},\"dropped\":{},"
             "\"expert_overload\":{:.6g},\"eval_loss\":{:.8g},\"expert_load\":[{}]}}\n",
             r.step, r.loss, r.mtp_loss, r.aux_loss, r.lr, r.grad_norm, r.tokens_per_s, r.tflops,
             r.mfu, r.mem_gib, r.ms, r.tokens_seen, r.skipped, r.dropped, r.expert_overload,
             r.eval_loss, loads);
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
