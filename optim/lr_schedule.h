// Learning-rate schedules as pure functions of the step (and, for token-keyed phases, of the
// tokens trained before it): constant, linear warm-up + cosine decay, step decay, and phases in
// tokens, which express DeepSeek-V3's warm-up / constant / cosine / two constant tails
// (DSV3_FACTS.md "Training hyperparameters") exactly, also under a batch ramp. Construction
// validates every parameter; lr() cannot fail.
#pragma once

#include <cstdint>
#include <vector>

#include "core/status.h"

namespace fp8pipe::optim {

// One phase of a token-keyed schedule (config optim.schedule=phases): it runs until the run has
// trained `until_tokens` tokens, starting from the lr the previous phase ended at (the peak lr for
// the first). kConstant holds `lr` (has_lr) or the starting lr; kLinear and kCosine go from the
// starting lr to `lr` (required) over the phase.
struct LrPhase {
  enum class Shape { kConstant, kLinear, kCosine };
  int64_t until_tokens = 0;
  Shape shape = Shape::kConstant;
  double lr = 0;
  bool has_lr = false;
};

class LrSchedule {
 public:
  enum class Kind { kConstant, kWarmupCosine, kStep, kPhases };

  // lr for every step after an optional linear warm-up from 0.
  static Result<LrSchedule> constant(double lr, int64_t warmup_steps = 0);
  // Linear warm-up from 0 to peak_lr over warmup_steps, then cosine from peak_lr at warmup_steps
  // to min_lr at total_steps, min_lr afterwards: half-way through the cosine lr = (peak+min)/2.
  static Result<LrSchedule> warmup_cosine(double peak_lr, double min_lr, int64_t warmup_steps,
                                          int64_t total_steps);
  // Step decay: after the warm-up, peak_lr * gamma^floor((s - warmup_steps) / every), never below
  // min_lr (config optim.schedule=step with step_every and step_gamma).
  static Result<LrSchedule> step_decay(double peak_lr, double min_lr, int64_t warmup_steps,
                                       int64_t every, double gamma);

  // Linear warm-up over warmup_steps (in steps, as DeepSeek-V3 states it), then the phases by
  // tokens trained: DeepSeek-V3 §4.2 is constant 2.2e-4 to 10T, cosine to 2.2e-5 at 14.3T,
  // constant to 14.633T, 7.3e-6 to 14.8T. After the last phase its final lr holds.
  static Result<LrSchedule> phases(double peak_lr, int64_t warmup_steps,
                                   std::vector<LrPhase> phases);

  // lr of the 1-based optimizer step (the AdamW step counter after increment) that starts with
  // `tokens` trained (used by kPhases only); lr(0) = 0 when there is a warm-up. Computed in fp64,
  // returned rounded to fp32.
  float lr(int64_t step, int64_t tokens = 0) const;
  Kind kind() const { return kind_; }

 private:
  LrSchedule() = default;
  double warmup(int64_t step) const;

  // With s the 1-based step, after the warm-up (s <= warmup_steps: peak_lr * s / warmup_steps):
  // peak_lr to constant_end, cosine to min_lr at cosine_end, min_lr to tail_end, then final_lr.
  // kConstant and kWarmupCosine are expressed with these fields; kStep and kPhases use the
  // warm-up only.
  struct Piecewise {
    double peak_lr = 0, min_lr = 0, final_lr = 0;
    int64_t warmup_steps = 0, constant_end = 0, cosine_end = 0, tail_end = 0;
  };
  Kind kind_ = Kind::kConstant;
  Piecewise p_;
  int64_t every_ = 0;
  double gamma_ = 1.0;
  std::vector<LrPhase> phases_;
  double phase_lr(int64_t tokens) const;
};

}  // namespace fp8pipe::optim
