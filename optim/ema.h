// Exponential moving average of the master weights in host memory, updated asynchronously after
// each optimizer step (DeepSeek-V3 §3.2.3: it estimates the model's quality after learning-rate
// decay without a decayed run, at no device memory or step time). Kept over this rank's optimizer
// groups (its ZeRO-1 shard), so it is sharded and checkpointed like the Adam moments.
#pragma once

#include <future>
#include <string>
#include <vector>

#include "core/status.h"
#include "optim/adamw.h"

namespace fp8pipe::optim {

class ParamEma {
 public:
  // decay in (0, 1); the average starts at the groups' current values.
  ParamEma(float decay, std::vector<ParamGroup> groups);
  ~ParamEma() { wait(); }
  ParamEma(const ParamEma&) = delete;
  ParamEma& operator=(const ParamEma&) = delete;

  // Starts e <- e + (1 - decay) (w - e), per element in fp32, on a worker thread. The caller must
  // not write the weights before wait() (the trainer waits before its next optimizer step).
  void update_async();
  void wait();  // the last update has finished (no-op when none is running)

  // "<name>.ema" per group: its [begin, end) as fp32 bytes (little-endian), for checkpoints.
  std::vector<StateArray> export_state();
  // Exactly this average's arrays (names and ranges); otherwise fails, unchanged.
  Status import_state(const std::vector<StateArray>& arrays);
  // Restarts the average at the groups' current values (a checkpoint without one).
  void reset();
  // Writes the average over the groups' weights (the trainer's EMA evaluation swaps them in).
  void copy_to_params();

 private:
  void update();
  float decay_;
  std::vector<ParamGroup> groups_;
  std::vector<std::vector<float>> ema_;  // one per group, numel() each
  std::future<void> running_;
};

}  // namespace fp8pipe::optim
