// AdamW driver: validates groups and hyperparameters, owns the bf16 moments, computes the global
// gradient norm in fp64 and calls the fused kernel on each group's slice.
#include "optim/adamw.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <utility>

#include "kernels/cpu/adamw.h"

namespace fp8pipe::optim {
namespace {

Status check_config(const AdamWConfig& c) {
  auto in_unit = [](float b) { return std::isfinite(b) && b >= 0.0f && b < 1.0f; };
  if (!in_unit(c.beta1)) return FP8_INVALID("adamw: beta1 must be in [0, 1), got {}", c.beta1);
  if (!in_unit(c.beta2)) return FP8_INVALID("adamw: beta2 must be in [0, 1), got {}", c.beta2);
  if (!std::isfinite(c.eps) || c.eps <= 0.0f) {
    return FP8_INVALID("adamw: eps must be finite and > 0, got {}", c.eps);
  }
  if (!std::isfinite(c.weight_decay) || c.weight_decay < 0.0f) {
    return FP8_INVALID("adamw: weight_decay must be finite and >= 0, got {}", c.weight_decay);
  }
  if (!std::isfinite(c.clip_norm)) {
    return FP8_INVALID("adamw: clip_norm must be finite (<= 0 disables), got {}", c.clip_norm);
  }
  return Status::Ok();
}

Status check_groups(const std::vector<ParamGroup>& groups) {
  std::set<std::string> names;
  for (const ParamGroup& g : groups) {
    if (g.name.empty()) return FP8_INVALID("adamw: a parameter group has an empty name");
    if (!names.insert(g.name).second) {
      return FP8_INVALID("adamw: parameter group name '{}' is used twice", g.name);
    }
    if (g.begin < 0 || g.end < g.begin) {
      return FP8_INVALID("adamw: group '{}' needs 0 <= begin <= end, got [{}, {})", g.name, g.begin,
                         g.end);
    }
    if (g.numel() > 0 && (g.param == nullptr || g.grad == nullptr)) {
      return FP8_INVALID("adamw: group '{}' has a null param or grad pointer", g.name);
    }
  }
  return Status::Ok();
}

std::vector<uint8_t> to_bytes(const std::vector<uint16_t>& bits) {
  std::vector<uint8_t> out(bits.size() * 2);
  for (size_t i = 0; i < bits.size(); ++i) {
    out[2 * i] = static_cast<uint8_t>(bits[i] & 0xFF);
    out[2 * i + 1] = static_cast<uint8_t>(bits[i] >> 8);
  }
  return out;
}

std::vector<uint16_t> from_bytes(const std::vector<uint8_t>& bytes) {
  std::vector<uint16_t> out(bytes.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) {
    out[i] = static_cast<uint16_t>(bytes[2 * i] | (bytes[2 * i + 1] << 8));
  }
  return out;
}

}  // namespace

Range shard_range(int64_t n, int rank, int world) {
  const int64_t base = n / world, extra = n % world;
  const int64_t begin = rank * base + std::min<int64_t>(rank, extra);
  return Range{begin, begin + base + (rank < extra ? 1 : 0)};
}

AdamW::AdamW(const AdamWConfig& cfg, std::vector<ParamGroup> groups)
    : cfg_(cfg), groups_(std::move(groups)) {
  for (const ParamGroup& g : groups_) {
    m_.emplace_back(static_cast<size_t>(g.numel()), uint16_t{0});
    v_.emplace_back(static_cast<size_t>(g.numel()), uint16_t{0});
  }
}

Result<AdamW> AdamW::create(const AdamWConfig& cfg, std::vector<ParamGroup> groups) {
  FP8_RETURN_IF_ERROR(check_config(cfg));
  FP8_RETURN_IF_ERROR(check_groups(groups));
  return AdamW(cfg, std::move(groups));
}

double AdamW::grad_sq_sum() const {
  double total = 0.0;
  for (const ParamGroup& g : groups_) total = total + kernels::sum_squares_f64(g.grad, g.numel());
  return total;
}

float AdamW::clip_factor(double norm, float max_norm) {
  if (max_norm <= 0.0f) return 1.0f;
  if (!std::isfinite(norm)) return std::nanf("");
  return static_cast<float>(std::min(1.0, static_cast<double>(max_norm) / (norm + 1e-6)));
}

kernels::AdamWScalars step_scalars(const AdamWConfig& cfg, bool weight_decay, float lr,
                                   int64_t step, float grad_scale) {
  kernels::AdamWHyper h;
  h.lr = lr;
  h.beta1 = cfg.beta1;
  h.beta2 = cfg.beta2;
  h.eps = cfg.eps;
  h.weight_decay = weight_decay ? cfg.weight_decay : 0.0f;
  h.step = step;
  h.grad_scale = grad_scale;
  return kernels::adamw_scalars(h);
}

Status check_step_args(float lr, float grad_scale) {
  if (!std::isfinite(lr) || lr < 0.0f) {
    return FP8_INVALID("adamw: lr must be finite and >= 0, got {}", lr);
  }
  if (!std::isfinite(grad_scale) || grad_scale < 0.0f) {
    return Status(Code::kInvalidArgument,
                  fmt::format("adamw: grad_scale must be finite and >= 0, got {}", grad_scale),
                  "a non-finite gradient norm means the step must be skipped on every rank");
  }
  return Status::Ok();
}

Status AdamW::step(float lr, float grad_scale) {
  FP8_RETURN_IF_ERROR(check_step_args(lr, grad_scale));
  ++step_;
  for (size_t i = 0; i < groups_.size(); ++i) {
    const ParamGroup& g = groups_[i];
    kernels::adamw_step(g.param, g.grad, m_[i].data(), v_[i].data(), g.numel(),
                        step_scalars(cfg_, g.weight_decay, lr, step_, grad_scale));
  }
  return Status::Ok();
}

Result<double> AdamW::clip_and_step(float lr) {
  const double norm = std::sqrt(grad_sq_sum());
  if (!std::isfinite(norm)) {
    return FP8_ERROR(Code::kAborted, "adamw: gradient norm is {}, step {} skipped", norm,
                     step_ + 1);
  }
  FP8_RETURN_IF_ERROR(step(lr, clip_factor(norm, cfg_.clip_norm)));
  return norm;
}

AdamWState AdamW::export_state() const {
  AdamWState s;
  s.step = step_;
  for (size_t i = 0; i < groups_.size(); ++i) {
    const ParamGroup& g = groups_[i];
    s.arrays.push_back(StateArray{g.name + ".exp_avg", g.begin, g.end, to_bytes(m_[i])});
    s.arrays.push_back(StateArray{g.name + ".exp_avg_sq", g.begin, g.end, to_bytes(v_[i])});
  }
  return s;
}

Status AdamW::import_state(const AdamWState& state) {
  if (state.step < 0) return FP8_INVALID("adamw state: step must be >= 0, got {}", state.step);
  if (state.arrays.size() != 2 * groups_.size()) {
    return FP8_INVALID("adamw state: {} arrays, expected {} (exp_avg and exp_avg_sq per group)",
                       state.arrays.size(), 2 * groups_.size());
  }
  std::vector<std::vector<uint16_t>> m(groups_.size()), v(groups_.size());
  std::set<std::string> seen;
  for (const StateArray& a : state.arrays) {
    size_t gi = 0;
    bool is_m = false;
    for (; gi < groups_.size(); ++gi) {
      is_m = a.name == groups_[gi].name + ".exp_avg";
      if (is_m || a.name == groups_[gi].name + ".exp_avg_sq") break;
    }
    if (gi == groups_.size()) return FP8_INVALID("adamw state: unknown array '{}'", a.name);
    const ParamGroup& g = groups_[gi];
    if (a.begin != g.begin || a.end != g.end || a.bytes.size() != 2 * size_t(g.numel())) {
      return FP8_INVALID(
          "adamw state: '{}' covers [{}, {}) with {} bytes, expected [{}, {}) "
          "with {} bytes",
          a.name, a.begin, a.end, a.bytes.size(), g.begin, g.end, 2 * g.numel());
    }
    if (!seen.insert(a.name).second) {
      return FP8_INVALID("adamw state: array '{}' appears twice", a.name);
    }
    (is_m ? m[gi] : v[gi]) = from_bytes(a.bytes);
  }
  m_ = std::move(m);
  v_ = std::move(v);
  step_ = state.step;
  return Status::Ok();
}

}  // namespace fp8pipe::optim
