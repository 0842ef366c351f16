// Execution traces: intervals of executed instructions (compute stream) and of communication
// waits (comm stream) on one rank, written as Chrome-trace / Perfetto JSON (one file per rank,
// pid = rank). The executor records into a Tracer when one is attached.
//
// Two levels of events:
//   - instructions: one complete event ("ph":"X") per executed F, B, W, FB and receive wait, and
//     an instant ("i") per send post (with matched point-to-point groups, p2p_plan.h: per send
//     when produced, a run's comm events recorded at its plan point), in instruction order; the
//     simulator's calibration (parallel/sim/measured.h) reads exactly these;
//   - phases: begin/end pairs ("B"/"E", with a category) for what happens inside an instruction:
//     cat "compute", the compute slices of a compute instruction, each from its start or the end
//     of an all-to-all wait to the post of the next all-to-all (nested in the instruction on the
//     compute row; in an overlapped FB the slices of its forward and backward halves alternate),
//     and cat "a2a", each MoE all-to-all from its post to its completion on a row of its own
//     per model chunk ("a2a d0", "a2a d1"), and on row "zero1" each wait for a chunk's weights
//     before its first instruction (optim.overlap_param_gather). Readers of the instruction level
//     skip them;
//     bench/a2a_overlap.py measures how much all-to-all time they show hidden behind compute.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/status.h"
#include "parallel/comm.h"

namespace fp8pipe::parallel {

class Tracer {
 public:
  using Clock = std::chrono::steady_clock;
  explicit Tracer(int rank) : rank_(rank), origin_(Clock::now()) {}

  double now_us() const {
    return std::chrono::duration<double, std::micro>(Clock::now() - origin_).count();
  }
  // A complete interval [begin_us, end_us) on row `thread` ("compute", "comm", or another name:
  // rows get thread ids compute = 0, comm = 1, then 2, 3, ... in order of first use), with its
  // step. Thread-safe (the FB overlap records from two threads, one at a time).
  void interval(const std::string& name, const std::string& thread, double begin_us, double end_us,
                int64_t step);
  void instant(const std::string& name, const std::string& thread, double at_us, int64_t step);
  // A phase [begin_us, end_us) of category `cat` ("compute" or "a2a"), written as a "B"/"E" pair.
  void phase(const std::string& name, const std::string& thread, const std::string& cat,
             double begin_us, double end_us, int64_t step);
  size_t size() const;
  // Writes {"traceEvents": [...]} with thread-name metadata; atomic (tmp + rename).
  Status write(const std::string& path) const;

 private:
  struct Event {
    std::string name, thread, cat;  // cat empty: an instruction event (X or i)
    double ts, dur;                 // dur < 0: instant
    int64_t step;
  };
  int rank_;
  Clock::time_point origin_;
  mutable std::mutex mu_;
  std::vector<Event> events_;
};

// When traced comm ops completed. One thread waits on each watched op in turn (woken by the op's
// completion, no polling) and stamps the time, so an all-to-all's interval ends when it completed
// rather than when the compute thread came back to wait for it (in an overlapped FB that is
// after the other half's compute slice, which would count that whole slice as hidden). The
// waiter stamps too; the earlier stamp wins. Live only while a step is traced.
class CompletionClock {
 public:
  struct Stamp {
    std::atomic<double> at{-1};  // trace time of the first observed completion; < 0: not yet
    void observe(double t_us);
  };
  explicit CompletionClock(const Tracer& tracer);
  ~CompletionClock();  // stops the thread; ops still in flight are not waited for
  CompletionClock(const CompletionClock&) = delete;
  CompletionClock& operator=(const CompletionClock&) = delete;

  std::shared_ptr<Stamp> watch(const Work& w);

 private:
  void loop();
  const Tracer& tracer_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<Work, std::shared_ptr<Stamp>>> queue_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace fp8pipe::parallel
