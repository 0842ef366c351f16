// Learning-rate schedules. Every kind is stored as one piecewise description (warm-up, constant,
// cosine, two tails), so lr(step) is one short function; the factories validate and fill it.
#include "optim/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>

namespace fp8pipe::optim {
namespace {

Status check_lr(const char* name, double v) {
  if (!std::isfinite(v) || v < 0.0) {
    return FP8_INVALID("lr schedule: {} must be finite and >= 0, got {}", name, v);
  }
  return Status::Ok();
}

Status check_order(const char* lo_name, int64_t lo, const char* hi_name, int64_t hi) {
  if (hi < lo) {
    return FP8_INVALID("lr schedule: {} ({}) must be >= {} ({})", hi_name, hi, lo_name, lo);
  }
  return Status::Ok();
}

}  // namespace

Result<LrSchedule> LrSchedule::constant(double lr, int64_t warmup_steps) {
  FP8_RETURN_IF_ERROR(check_lr("lr", lr));
  if (warmup_steps < 0) {
    return FP8_INVALID("lr schedule: warmup_steps must be >= 0, got {}", warmup_steps);
  }
  LrSchedule s;
  s.kind_ = Kind::kConstant;
  s.p_ = Piecewise{lr, lr, lr, warmup_steps, INT64_MAX, INT64_MAX, INT64_MAX};
  return s;
}

Result<LrSchedule> LrSchedule::warmup_cosine(double peak_lr, double min_lr, int64_t warmup_steps,
                                             int64_t total_steps) {
  FP8_RETURN_IF_ERROR(check_lr("peak_lr", peak_lr));
  FP8_RETURN_IF_ERROR(check_lr("min_lr", min_lr));
  if (min_lr > peak_lr) {
    return FP8_INVALID("lr schedule: min_lr ({}) must be <= peak_lr ({})", min_lr, peak_lr);
  }
  if (warmup_steps < 0) {
    return FP8_INVALID("lr schedule: warmup_steps must be >= 0, got {}", warmup_steps);
  }
  FP8_RETURN_IF_ERROR(check_order("warmup_steps", warmup_steps, "total_steps", total_steps));
  LrSchedule s;
  s.kind_ = Kind::kWarmupCosine;
  s.p_ = Piecewise{peak_lr, min_lr, min_lr, warmup_steps, warmup_steps, total_steps, INT64_MAX};
  return s;
}

Result<LrSchedule> LrSchedule::step_decay(double peak_lr, double min_lr, int64_t warmup_steps,
                                          int64_t every, double gamma) {
  FP8_RETURN_IF_ERROR(check_lr("peak_lr", peak_lr));
  FP8_RETURN_IF_ERROR(check_lr("min_lr", min_lr));
  if (min_lr > peak_lr) {
    return FP8_INVALID("lr schedule: min_lr ({}) must be <= peak_lr ({})", min_lr, peak_lr);
  }
  if (warmup_steps < 0 || every < 1 || !(gamma > 0.0 && gamma <= 1.0)) {
    return FP8_INVALID(
        "lr schedule: step decay needs warmup_steps >= 0, step_every >= 1 and step_gamma in "
        "(0, 1]; got {}, {}, {}",
        warmup_steps, every, gamma);
  }
  LrSchedule s;
  s.kind_ = Kind::kStep;
  s.p_ = Piecewise{peak_lr, min_lr, min_lr, warmup_steps, INT64_MAX, INT64_MAX, INT64_MAX};
  s.every_ = every;
  s.gamma_ = gamma;
  return s;
}

Result<LrSchedule> LrSchedule::phases(double peak_lr, int64_t warmup_steps,
                                      std::vector<LrPhase> phases) {
  FP8_RETURN_IF_ERROR(check_lr("peak_lr", peak_lr));
  if (warmup_steps < 0) {
    return FP8_INVALID("lr schedule: warmup_steps must be >= 0, got {}", warmup_steps);
  }
  if (phases.empty()) return FP8_INVALID("lr schedule: phases needs at least one phase");
  int64_t prev = 0;
  for (size_t i = 0; i < phases.size(); ++i) {
    const LrPhase& ph = phases[i];
    if (ph.until_tokens <= prev) {
      return FP8_INVALID("lr schedule: phase {} ends at {} tokens, not after {}", i,
                         ph.until_tokens, prev);
    }
    if (ph.has_lr) FP8_RETURN_IF_ERROR(check_lr("a phase's lr", ph.lr));
    if (ph.shape != LrPhase::Shape::kConstant && !ph.has_lr) {
      return FP8_INVALID("lr schedule: phase {} (linear or cosine) needs the lr it ends at", i);
    }
    prev = ph.until_tokens;
  }
  LrSchedule s;
  s.kind_ = Kind::kPhases;
  s.p_ = Piecewise{peak_lr, peak_lr, peak_lr, warmup_steps, INT64_MAX, INT64_MAX, INT64_MAX};
  s.phases_ = std::move(phases);
  return s;
}

double LrSchedule::phase_lr(int64_t tokens) const {
  double from = p_.peak_lr;
  int64_t begin = 0;
  for (const LrPhase& ph : phases_) {
    const double to = ph.has_lr ? ph.lr : from;
    if (tokens < ph.until_tokens) {
      const double x =
          static_cast<double>(tokens - begin) / static_cast<double>(ph.until_tokens - begin);
      switch (ph.shape) {
        case LrPhase::Shape::kConstant:
          return to;
        case LrPhase::Shape::kLinear:
          return from + (to - from) * x;
        case LrPhase::Shape::kCosine:
          return to + (from - to) * 0.5 * (1.0 + std::cos(std::numbers::pi * x));
      }
    }
    from = to;
    begin = ph.until_tokens;
  }
  return from;
}

double LrSchedule::warmup(int64_t step) const {
  return p_.peak_lr * static_cast<double>(step) / static_cast<double>(p_.warmup_steps);
}

float LrSchedule::lr(int64_t step, int64_t tokens) const {
  const Piecewise& p = p_;
  double lr;
  if (step <= 0) {
    lr = p.warmup_steps > 0 ? 0.0 : p.peak_lr;
  } else if (step <= p.warmup_steps) {
    lr = warmup(step);
  } else if (kind_ == Kind::kPhases) {
    lr = phase_lr(tokens);
  } else if (kind_ == Kind::kStep) {
    const int64_t drops = (step - p.warmup_steps) / every_;
    lr = std::max(p.min_lr, p.peak_lr * std::pow(gamma_, static_cast<double>(drops)));
  } else if (step <= p.constant_end) {
    lr = p.peak_lr;
  } else if (step <= p.cosine_end) {
    const double span = static_cast<double>(p.cosine_end - p.constant_end);
    const double progress = static_cast<double>(step - p.constant_end) / span;
    const double cosine = 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
    lr = p.min_lr + (p.peak_lr - p.min_lr) * cosine;
  } else if (step <= p.tail_end) {
    lr = p.min_lr;
  } else {
    lr = p.final_lr;
  }
  return static_cast<float>(lr);
}

}  // namespace fp8pipe::optim
