// CPU fused AdamW and the fp64 sum of squares used for the global gradient norm. The per-element
// order of operations is the contract documented in adamw.h; do not reorder or contract.
#include "kernels/cpu/adamw.h"

#include <cmath>

#include "kernels/cpu/fp8_codec.h"

namespace fp8pipe::kernels {
namespace {

// beta^k by binary exponentiation: a fixed sequence of IEEE fp64 multiplies (host independent).
double pow_int(double beta, int64_t k) {
  double result = 1.0;
  double base = beta;
  while (k > 0) {
    if (k & 1) result = result * base;
    base = base * base;
    k >>= 1;
  }
  return result;
}

}  // namespace

AdamWScalars adamw_scalars(const AdamWHyper& h) {
  const double b1 = h.beta1, b2 = h.beta2, lr = h.lr;
  const int64_t t = h.step < 1 ? 1 : h.step;
  AdamWScalars s;
  s.beta1 = h.beta1;
  s.one_minus_beta1 = static_cast<float>(1.0 - b1);
  s.beta2 = h.beta2;
  s.one_minus_beta2 = static_cast<float>(1.0 - b2);
  s.eps = h.eps;
  s.decay = static_cast<float>(1.0 - lr * static_cast<double>(h.weight_decay));
  s.step_size = static_cast<float>(lr / (1.0 - pow_int(b1, t)));
  s.sqrt_bc2 = static_cast<float>(std::sqrt(1.0 - pow_int(b2, t)));
  s.grad_scale = h.grad_scale;
  return s;
}

void adamw_step(float* p, const float* g, uint16_t* m, uint16_t* v, int64_t n,
                const AdamWScalars& s) {
  for (int64_t i = 0; i < n; ++i) adamw_element(p[i], g[i], m[i], v[i], s);
}

double sum_squares_f64(const float* g, int64_t n) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = g[i];
    acc = acc + x * x;
  }
  return acc;
}

}  // namespace fp8pipe::kernels
