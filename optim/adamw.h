// AdamW over named flat fp32 parameter arrays: fp32 master weights and grads, BF16 moments owned
// here (FP8.md §1.1), global-norm clipping, state export/import for checkpoints, and ZeRO-1-ready
// sharding (each group may be a [begin, end) slice of its array). Math: kernels/cpu/adamw.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "kernels/cpu/adamw.h"

namespace fp8pipe::optim {

// A [begin, end) view of one named flat fp32 parameter array and its gradient. param[0] and
// grad[0] are element `begin` of the array; the view holds end - begin values. Unsharded: begin 0,
// end = numel. weight_decay is false for norms and biases. The MoE router bias is not an Adam
// parameter at all (optim/bias_update.h updates it); never register it here.
struct ParamGroup {
  std::string name;
  float* param = nullptr;
  const float* grad = nullptr;
  int64_t begin = 0;
  int64_t end = 0;
  bool weight_decay = true;
  int64_t numel() const { return end - begin; }
};

// Defaults are DeepSeek-V3's (DSV3_FACTS.md "Training hyperparameters").
struct AdamWConfig {
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;
  float clip_norm = 1.0f;  // max global gradient norm; <= 0 disables clipping
};

// Optimizer state as named arrays, for checkpoints. Per group two arrays, "<name>.exp_avg" and
// "<name>.exp_avg_sq", each holding elements [begin, end) of that group's array as bf16
// (2 bytes per value, little-endian). A dp-sharded run exports one piece per rank; the ranges let
// the checkpoint layer reassemble or reshard them.
struct StateArray {
  std::string name;
  int64_t begin = 0;
  int64_t end = 0;
  std::vector<uint8_t> bytes;
};
struct AdamWState {
  int64_t step = 0;  // completed steps (the bias-correction counter)
  std::vector<StateArray> arrays;
};

// The fp32 constants of one step for one group (kernels::adamw_scalars of the config's
// hyperparameters): AdamW::step and DeviceAdamW::step (optim/device_adamw.h) share them.
kernels::AdamWScalars step_scalars(const AdamWConfig& cfg, bool weight_decay, float lr,
                                   int64_t step, float grad_scale);
// lr and grad_scale must be finite and >= 0 (a non-finite norm means: skip the step).
Status check_step_args(float lr, float grad_scale);

// The contiguous piece [begin, end) of an n-element array owned by `rank` of `world` (ZeRO-1):
// pieces differ in size by at most one, lower ranks take the larger ones.
struct Range {
  int64_t begin = 0;
  int64_t end = 0;
};
Range shard_range(int64_t n, int rank, int world);

// ZeRO-1 use (DESIGN.md §2): every dp rank builds AdamW over shard_range(numel, dp_rank, dp) of
// each array (param pointing into its full replica, grad at its reduce-scatter output), so it owns
// moments for its shard only. Per step: reduce-scatter grads; s = grad_sq_sum() on each rank;
// all-reduce s (sum, fp64); f = clip_factor(sqrt(s), clip_norm); step(lr, f); all-gather params.
// Elements are updated independently, so the result is bitwise the unsharded update for the same
// grads and factor. (The fp64 norm depends on the summation order only in its last bits.)
class AdamW {
 public:
  static Result<AdamW> create(const AdamWConfig& cfg, std::vector<ParamGroup> groups);

  // Sum of squared gradients over this optimizer's groups in fp64: groups in registration order,
  // elements in index order, each square exact. Deterministic for a fixed layout.
  double grad_sq_sum() const;
  // min(1, max_norm / (norm + 1e-6)) in fp64, rounded to fp32; 1 when max_norm <= 0; NaN when
  // norm is not finite (the caller must skip the step).
  static float clip_factor(double norm, float max_norm);

  // One step: step_count() += 1, then every group's slice is updated with gradients multiplied
  // by grad_scale. Fails without changing anything when lr or grad_scale is not finite / < 0.
  Status step(float lr, float grad_scale = 1.0f);
  // Single-replica convenience: global norm of the local grads, clip with config().clip_norm,
  // step. Returns the norm; fails (and skips the step) when the norm is not finite.
  Result<double> clip_and_step(float lr);

  int64_t step_count() const { return step_; }
  const AdamWConfig& config() const { return cfg_; }
  const std::vector<ParamGroup>& groups() const { return groups_; }

  AdamWState export_state() const;
  // Requires exactly this optimizer's arrays (names and ranges); otherwise fails, unchanged.
  Status import_state(const AdamWState& state);

 private:
  AdamW(const AdamWConfig& cfg, std::vector<ParamGroup> groups);

  AdamWConfig cfg_;
  std::vector<ParamGroup> groups_;
  std::vector<std::vector<uint16_t>> m_, v_;  // bf16 bits, one per group, numel() each
  int64_t step_ = 0;
};

}  // namespace fp8pipe::optim
