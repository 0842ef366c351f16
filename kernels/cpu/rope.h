#pragma once
// RoPE's pair frequencies, with YaRN's context extension (Peng et al. 2023, "YaRN: Efficient
// Context Window Extension of Large Language Models"; DeepSeek-V3 TR §4.3 extends 4K to 128K
// with it). One host computation shared by the CPU kernel and the CUDA backend's table, so both
// rotate by the same angles.
//
// YaRN ("NTK-by-parts" interpolation plus an attention temperature), for a head's d RoPE dims and
// pair i with frequency f_i = theta^(-2i/d):
// - pairs that turn more than beta_fast times over the pretraining context L keep f_i; pairs
//   that turn fewer than beta_slow times are interpolated to f_i / factor; between, a linear ramp
//   over the pair index blends the two. The ramp's ends are the (fractional) pair indices where
//   L f_i / 2π equals beta_fast and beta_slow, rounded outward (floor and ceil) as DeepSeek's and
//   transformers' implementations do, so an exported model rotates as they do;
// - the attention logits are scaled by m(factor, mscale_all_dim)^2 and cos/sin by
//   m(factor, mscale) / m(factor, mscale_all_dim), with m(s, c) = 0.1 c ln s + 1 (1 when s <= 1).
//   DeepSeek-V3 sets mscale = mscale_all_dim = 1: cos/sin unscaled, logits times (0.1 ln s + 1)^2.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <vector>

namespace fp8pipe::kernels {

struct RopeSpec {
  double theta = 10000.0;
  double factor = 1.0;               // YaRN's s; <= 1: plain RoPE (the fields below unused)
  double original_max_position = 0;  // L: the context the model was pretrained on
  double beta_fast = 32.0, beta_slow = 1.0;
  double mscale = 1.0, mscale_all_dim = 1.0;
  bool yarn() const { return factor > 1.0; }
};

inline double yarn_mscale(double s, double c) {
  return s <= 1.0 ? 1.0 : 0.1 * c * std::log(s) + 1.0;
}

// The multiplier of cos and sin (1 for plain RoPE and for DeepSeek-V3's settings).
inline double rope_magnitude(const RopeSpec& r) {
  return r.yarn() ? yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim) : 1.0;
}

// The multiplier of the attention's softmax scale 1/sqrt(d_k).
inline double rope_softmax_factor(const RopeSpec& r) {
  if (!r.yarn()) return 1.0;
  const double m = yarn_mscale(r.factor, r.mscale_all_dim);
  return m * m;
}

// The fractional pair index whose frequency turns `turns` times over L positions.
inline double yarn_pair_at(double turns, int64_t d, const RopeSpec& r) {
  return static_cast<double>(d) *
         std::log(r.original_max_position / (turns * 2.0 * std::numbers::pi)) /
         (2.0 * std::log(r.theta));
}

// Frequencies of the d/2 pairs of a d-dim RoPE head.
inline std::vector<double> rope_frequencies(const RopeSpec& r, int64_t d) {
  const int64_t half = d / 2;
  std::vector<double> f(half);
  for (int64_t i = 0; i < half; ++i) {
    f[i] = std::pow(r.theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
  }
  if (!r.yarn()) return f;
  const double lo = std::max(std::floor(yarn_pair_at(r.beta_fast, d, r)), 0.0);
  double hi = std::min(std::ceil(yarn_pair_at(r.beta_slow, d, r)), static_cast<double>(d - 1));
  if (hi == lo) hi += 0.001;  // a step, not a division by zero
  for (int64_t i = 0; i < half; ++i) {
    // ramp 0 below lo (keep f_i), 1 above hi (interpolate to f_i / factor)
    const double ramp = std::clamp((static_cast<double>(i) - lo) / (hi - lo), 0.0, 1.0);
    f[i] = f[i] / r.factor * ramp + f[i] * (1.0 - ramp);
  }
  return f;
}

}  // namespace fp8pipe::kernels
