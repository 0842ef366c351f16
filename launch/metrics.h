// One metrics record per step and its sinks (STYLE.md 12): the console line of DESIGN.md §7 on
// the rank that owns the loss, and a JSONL file per rank (one JSON object per line).
#pragma once

#include <cstdio>
#include <string>
#include <vector>

#include "core/status.h"

namespace fp8pipe {

struct LayerLoad {
  std::string layer;         // "layers.3.ffn"
  double max_over_mean = 0;  // max expert load / mean expert load (1 = perfectly balanced)
  int dead = 0;              // experts with no token this step
};

struct StepRecord {
  int64_t step = 0;
  double loss = 0, mtp_loss = 0, aux_loss = 0, lr = 0, grad_norm = 0;
  double tokens_per_s = 0, tflops = 0, mfu = -1;  // mfu < 0: no peak known
  double mem_gib = 0, ms = 0;  // mem_gib: the process's resident host memory after the step
  // Peak bytes of the backend's live tensors during the step (Backend::memory; on a GPU its
  // device memory), GiB.
  double tensor_gib = 0;
  int64_t tokens_seen = 0, skipped = 0, dropped = 0;
  int64_t batch = 0;     // sequences in the step's global batch
  bool ramping = false;  // the batch is below train.global_batch (train.batch_ramp): shown
  // Bytes of token rows this rank sent to other ep ranks in the step's MoE all-to-alls
  // (MoeStepStats::a2a_bytes, every leg and layer); 0 without expert parallelism.
  int64_t a2a_bytes = 0;
  double expert_overload = 0;  // max over layers of max/mean load
  std::vector<LayerLoad> loads;
  double eval_loss = -1;      // < 0: no eval this step
  double eval_ema_loss = -1;  // the same for the weights' moving average (optim.ema_decay)
};

// `pattern` with every "{rank}" replaced by `rank` (log.jsonl, log.trace, log.op_profile).
std::string rank_path(std::string pattern, int rank);

class MetricsSink {
 public:
  // jsonl_path may contain "{rank}"; empty = no file. The console prints every `every` steps.
  static Result<MetricsSink> open(const std::string& jsonl_path, int rank, int64_t every,
                                  bool console);
  MetricsSink(MetricsSink&&) noexcept;
  ~MetricsSink();
  void write(const StepRecord& r);
  void note(const std::string& json_object);  // a free-form record (run start, eval, end)

 private:
  MetricsSink() = default;
  std::FILE* f_ = nullptr;
  int64_t every_ = 1;
  bool console_ = true;
};

// Resident memory of this process in GiB (from /proc/self/statm).
double resident_gib();

}  // namespace fp8pipe
