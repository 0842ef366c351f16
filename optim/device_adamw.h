// AdamW next to the weights (optim.placement=device): the twin of a host AdamW whose moments live
// on a Backend as bf16 Tensors and whose step is Backend::adamw, the same per-element math and
// fp32 step constants as AdamW::step (optim/adamw.h), so the CPU backend gives the host bits and
// a GPU copies nothing per step. The host AdamW stays the checkpoint format: store_to() before a
// save, load_from() after a restore.
#pragma once

#include <string>
#include <vector>

#include "core/backend.h"
#include "optim/adamw.h"

namespace fp8pipe::optim {

// One parameter on the backend: fp32 value and fp32 gradient (the step's rounded sum), of which
// the group steps elements [begin, end) (ZeRO-1: this rank's shard; end < 0: to the end).
struct TensorGroup {
  std::string name;
  Tensor* param = nullptr;
  Tensor* grad = nullptr;
  bool weight_decay = true;
  int64_t begin = 0, end = -1;
};

// The parameters and gradients as consecutive views of two flat buffers (launch/trainer.cc):
// group i's tensors start at element offset[i] of `value` and `grad`, groups in buffer order,
// anything between them zero. The moments hold each group's [begin, end) in group order; where
// consecutive groups with the same decay flag are whole tensors the moments keep the gap between
// them too, so a step is one Backend::adamw per such run (zeros stay zeros) instead of one per
// group. (One rank, one copy of each parameter: one call per run of equal flags; ZeRO-1 shards:
// one call per shard.)
struct FlatLayout {
  Tensor value, grad;
  std::vector<int64_t> offset;
};

class DeviceAdamW {
 public:
  // The twin of `host` (its config, step count and moments) on `be`: one group per host group,
  // in the same order with the same names and element ranges, the groups' tensors laid out as
  // `flat` says. The moments take the shards' elements only (ZeRO-1).
  static Result<DeviceAdamW> create(Backend& be, const AdamW& host, std::vector<TensorGroup> groups,
                                    const FlatLayout& flat);

  Status step(float lr, float grad_scale = 1.0f);  // as AdamW::step
  int64_t step_count() const { return step_; }

  Status store_to(AdamW& host) const;   // moments and step count -> host (for a checkpoint)
  Status load_from(const AdamW& host);  // host's moments and step count -> here

 private:
  DeviceAdamW() = default;
  Backend* be_ = nullptr;
  AdamWConfig cfg_;
  std::vector<TensorGroup> groups_;
  std::vector<Tensor> m_, v_;  // bf16, one per group (views of the flat moments)
  // [begin, end) element ranges of the flat value/grad buffers, where the run's moments start in
  // the flat moments, and the decay flag: one Backend::adamw_runs per step.
  using Run = AdamWRun;
  std::vector<Run> runs_;
  Tensor value_, grad_, m_flat_, v_flat_;
  int64_t step_ = 0;
};

}  // namespace fp8pipe::optim
