// Auxiliary-loss-free router bias update: an integer comparison of each expert's load with the
// mean, then one fp32 add or subtract of gamma.
#include "optim/bias_update.h"

#include <cmath>

namespace fp8pipe::optim {

Status update_router_bias(float* bias, const int64_t* counts, int64_t n_experts, float gamma) {
  if (n_experts < 1) return FP8_INVALID("router bias: n_experts must be >= 1, got {}", n_experts);
  if (!std::isfinite(gamma) || gamma < 0.0f) {
    return FP8_INVALID("router bias: gamma must be finite and >= 0, got {}", gamma);
  }
  if (bias == nullptr || counts == nullptr) {
    return FP8_INVALID("router bias: null bias or counts pointer");
  }
  int64_t total = 0;
  for (int64_t i = 0; i < n_experts; ++i) {
    if (counts[i] < 0) {
      return FP8_INVALID("router bias: counts[{}] must be >= 0, got {}", i, counts[i]);
    }
    total += counts[i];
  }
  for (int64_t i = 0; i < n_experts; ++i) {
    const int64_t scaled = counts[i] * n_experts;  // load_i - mean has the sign of this - total
    if (scaled > total) {
      bias[i] = bias[i] - gamma;
    } else if (scaled < total) {
      bias[i] = bias[i] + gamma;
    }
  }
  return Status::Ok();
}

}  // namespace fp8pipe::optim
