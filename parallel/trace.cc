#include "parallel/trace.h"

#include <fmt/format.h>

#include <cstdio>
#include <filesystem>

#include "core/json.h"

namespace fp8pipe::parallel {

void Tracer::interval(const std::string& name, const char* thread, double begin_us, double end_us,
                      int64_t step) {
  events_.push_back({name, thread, begin_us, end_us - begin_us, step});
}

void Tracer::instant(const std::string& name, const char* thread, double at_us, int64_t step) {
  events_.push_back({name, thread, at_us, -1.0, step});
}

Status Tracer::write(const std::string& path) const {
  const auto tid = [](const char* t) { return std::string(t) == "compute" ? 0 : 1; };
  std::string out = "{\"traceEvents\":[\n";
  out += fmt::format(
      "{{\"ph\":\"M\",\"name\":\"process_name\",\"pid\":{0},\"args\":{{\"name\":\"rank {0}\"}}}},\n"
      "{{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":{0},\"tid\":0,\"args\":{{\"name\":"
      "\"compute\"}}}},\n"
      "{{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":{0},\"tid\":1,\"args\":{{\"name\":\"comm\"}}"
      "}}",
      rank_);
  for (const Event& e : events_) {
    if (e.dur >= 0) {
      out += fmt::format(
          ",\n{{\"ph\":\"X\",\"name\":{},\"pid\":{},\"tid\":{},\"ts\":{:.3f},\"dur\":{:.3f},"
          "\"args\":{{\"step\":{}}}}}",
          fp8pipe::json::quote(e.name), rank_, tid(e.thread), e.ts, e.dur, e.step);
    } else {
      out += fmt::format(
          ",\n{{\"ph\":\"i\",\"s\":\"t\",\"name\":{},\"pid\":{},\"tid\":{},\"ts\":{:.3f},"
          "\"args\":{{\"step\":{}}}}}",
          fp8pipe::json::quote(e.name), rank_, tid(e.thread), e.ts, e.step);
    }
  }
  out += "\n]}\n";
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "w");
  if (!f) return FP8_ERROR(Code::kIo, "log.trace: cannot write '{}'", tmp);
  const bool ok = std::fwrite(out.data(), 1, out.size(), f) == out.size();
  if (std::fclose(f) != 0 || !ok)
    return FP8_ERROR(Code::kIo, "log.trace: short write to '{}'", tmp);
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return FP8_ERROR(Code::kIo, "log.trace: cannot rename '{}': {}", tmp, ec.message());
  return Status::Ok();
}

}  // namespace fp8pipe::parallel
