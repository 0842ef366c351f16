// Execution traces: intervals of executed instructions (compute stream) and of communication
// waits (comm stream) on one rank, written as Chrome-trace / Perfetto JSON (one file per rank,
// pid = rank). The executor records into a Tracer when one is attached.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "core/status.h"

namespace fp8pipe::parallel {

class Tracer {
 public:
  using Clock = std::chrono::steady_clock;
  explicit Tracer(int rank) : rank_(rank), origin_(Clock::now()) {}

  double now_us() const {
    return std::chrono::duration<double, std::micro>(Clock::now() - origin_).count();
  }
  // A complete interval [begin_us, end_us) on thread "compute" or "comm", with its step.
  void interval(const std::string& name, const char* thread, double begin_us, double end_us,
                int64_t step);
  void instant(const std::string& name, const char* thread, double at_us, int64_t step);
  size_t size() const { return events_.size(); }
  // Writes {"traceEvents": [...]} with thread-name metadata; atomic (tmp + rename).
  Status write(const std::string& path) const;

 private:
  struct Event {
    std::string name;
    const char* thread;
    double ts, dur;  // dur < 0: instant
    int64_t step;
  };
  int rank_;
  Clock::time_point origin_;
  std::vector<Event> events_;
};

}  // namespace fp8pipe::parallel
