// Per-operator profile of a Backend (log.op_profile): a decorator that forwards every call to the
// real backend and times each operator twice, on the host (the time spent in the call: the launch
// cost on a GPU, the work itself on the CPU) and on the compute stream (timed events around the
// call: the kernels' time on a GPU, the same as the host time on the CPU, whose compute stream
// runs inline). Totals per operator name, with the GEMMs' FLOPs, as a table or JSON, like
// torch.profiler's key_averages.
//
// The profile's own cost: two timed events and two clock reads per operator call (a few us on a
// GPU), so it is for finding where time goes, not for headline throughput.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/backend.h"
#include "core/json.h"

namespace fp8pipe {

struct OpStats {
  std::string op;        // backend method name ("gemm_fp8", "rmsnorm_fwd", ...)
  int64_t calls = 0;     // calls made
  double device_ms = 0;  // sum over calls of the compute stream's time between the call's events
  double host_ms = 0;    // sum over calls of the host time spent inside the call
  double flops = 0;      // GEMMs: 2·M·N·K per successful product; 0 for other operators
};

// The calls made to `op` in `stats` (0 when absent).
int64_t calls_of(const std::vector<OpStats>& stats, std::string_view op);

class OpProfile {
 public:
  virtual ~OpProfile() = default;
  // Forgets everything so far (e.g. after a warm-up step); calls in flight are dropped.
  virtual void reset() = 0;
  // Waits for the compute stream, then the totals per operator, by device time, largest first.
  virtual std::vector<OpStats> totals() = 0;
};

// `inner` wrapped so that every call is timed into the returned profile (valid while the
// backend lives). The wrapper reports the inner backend's device and name.
std::unique_ptr<Backend> make_profiled_backend(std::unique_ptr<Backend> inner,
                                               std::shared_ptr<OpProfile>* profile);

// A fixed-width table of `stats` (at most `max_rows` rows, the rest summed into one), with each
// operator's share of the summed device time and, for GEMMs, TFLOP/s; `wall_ms` (> 0) adds the
// share of that wall time the device was busy with profiled operators.
std::string format_op_table(const std::vector<OpStats>& stats, double wall_ms, size_t max_rows);
json::Value op_stats_json(const std::vector<OpStats>& stats, double wall_ms);

}  // namespace fp8pipe
