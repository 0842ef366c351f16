#include "parallel/trace.h"

#include <fmt/format.h>

#include <cstdio>
#include <filesystem>
#include <map>

#include "core/json.h"

namespace fp8pipe::parallel {

void Tracer::interval(const std::string& name, const std::string& thread, double begin_us,
                      double end_us, int64_t step) {
  std::lock_guard<std::mutex> lk(mu_);
  events_.push_back({name, thread, "", begin_us, end_us - begin_us, step});
}

void Tracer::instant(const std::string& name, const std::string& thread, double at_us,
                     int64_t step) {
  std::lock_guard<std::mutex> lk(mu_);
  events_.push_back({name, thread, "", at_us, -1.0, step});
}

void Tracer::phase(const std::string& name, const std::string& thread, const std::string& cat,
                   double begin_us, double end_us, int64_t step) {
  std::lock_guard<std::mutex> lk(mu_);
  events_.push_back({name, thread, cat.empty() ? "phase" : cat, begin_us,
                     std::max(0.0, end_us - begin_us), step});
}

size_t Tracer::size() const {
  std::lock_guard<std::mutex> lk(mu_);
  return events_.size();
}

Status Tracer::write(const std::string& path) const {
  std::lock_guard<std::mutex> lk(mu_);
  std::map<std::string, int> tids = {{"compute", 0}, {"comm", 1}};
  std::vector<std::string> rows = {"compute", "comm"};
  for (const Event& e : events_) {
    if (tids.emplace(e.thread, static_cast<int>(rows.size())).second) rows.push_back(e.thread);
  }
  std::string out = "{\"traceEvents\":[\n";
  out += fmt::format(
      "{{\"ph\":\"M\",\"name\":\"process_name\",\"pid\":{0},\"args\":{{\"name\":\"rank {0}\"}}}}",
      rank_);
  for (size_t t = 0; t < rows.size(); ++t) {
    out += fmt::format(
        ",\n{{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":{},\"tid\":{},\"args\":{{\"name\":{}}}}"
        "}",
        rank_, t, fp8pipe::json::quote(rows[t]));
  }
  for (const Event& e : events_) {
    const int tid = tids.at(e.thread);
    const std::string name = fp8pipe::json::quote(e.name);
    if (!e.cat.empty()) {  // a phase: a begin/end pair
      const std::string cat = fp8pipe::json::quote(e.cat);
      out += fmt::format(
          ",\n{{\"ph\":\"B\",\"name\":{},\"cat\":{},\"pid\":{},\"tid\":{},\"ts\":{:.3f},"
          "\"args\":{{\"step\":{}}}}}"
          ",\n{{\"ph\":\"E\",\"name\":{},\"cat\":{},\"pid\":{},\"tid\":{},\"ts\":{:.3f},"
          "\"args\":{{\"step\":{}}}}}",
          name, cat, rank_, tid, e.ts, e.step, name, cat, rank_, tid, e.ts + e.dur, e.step);
    } else if (e.dur >= 0) {
      out += fmt::format(
          ",\n{{\"ph\":\"X\",\"name\":{},\"pid\":{},\"tid\":{},\"ts\":{:.3f},\"dur\":{:.3f},"
          "\"args\":{{\"step\":{}}}}}",
          name, rank_, tid, e.ts, e.dur, e.step);
    } else {
      out += fmt::format(
          ",\n{{\"ph\":\"i\",\"s\":\"t\",\"name\":{},\"pid\":{},\"tid\":{},\"ts\":{:.3f},"
          "\"args\":{{\"step\":{}}}}}",
          name, rank_, tid, e.ts, e.step);
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

// ---- CompletionClock ----------------------------------------------------------------------------

void CompletionClock::Stamp::observe(double t_us) {
  double cur = at.load(std::memory_order_acquire);
  while ((cur < 0 || t_us < cur) && !at.compare_exchange_weak(cur, t_us)) {
  }
}

CompletionClock::CompletionClock(const Tracer& tracer) : tracer_(tracer) {
  thread_ = std::thread([this] { loop(); });
}

CompletionClock::~CompletionClock() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

std::shared_ptr<CompletionClock::Stamp> CompletionClock::watch(const Work& w) {
  auto stamp = std::make_shared<Stamp>();
  {
    std::lock_guard<std::mutex> lk(mu_);
    queue_.emplace_back(w, stamp);
  }
  cv_.notify_one();
  return stamp;
}

void CompletionClock::loop() {
  for (;;) {
    std::pair<Work, std::shared_ptr<Stamp>> item;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      item = std::move(queue_.front());
      queue_.pop_front();
    }
    // Collectives on one communicator are matched in issue order and in practice complete in
    // it; one that finishes before the op ahead of it is stamped by its own waiter instead. The
    // wait is cut in slices so that a stop is seen while an op hangs (its error is the waiter's).
    while (!item.first.test()) {
      (void)item.first.wait_for(0.05);
      std::lock_guard<std::mutex> lk(mu_);
      if (stop_) return;
    }
    item.second->observe(tracer_.now_us());
  }
}

}  // namespace fp8pipe::parallel
