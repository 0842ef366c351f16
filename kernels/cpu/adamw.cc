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
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * s.grad_scale;
    float mi = bf16_to_float(m[i]);
    float vi = bf16_to_float(v[i]);
    const float m_decayed = s.beta1 * mi;
    const float m_new = s.one_minus_beta1 * gi;
    mi = m_decayed + m_new;
    const float g2 = gi * gi;
    const float v_decayed = s.beta2 * vi;
    const float v_new = s.one_minus_beta2 * g2;
    vi = v_decayed + v_new;
    const float root = std::sqrt(vi);
    const float scaled_root = root / s.sqrt_bc2;
    const float denom = scaled_root + s.eps;
    const float ratio = mi / denom;
    const float delta = s.step_size * ratio;
    const float decayed = p[i] * s.decay;
    p[i] = decayed - delta;
    m[i] = float_to_bf16(mi);
    v[i] = float_to_bf16(vi);
  }
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
