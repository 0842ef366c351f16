// Fused AdamW over one flat fp32 array: fp32 master weights and grads, BF16 moments (FP8.md §1.1).
// This file is the numerics contract that the CUDA fused AdamW must reproduce bit for bit: the
// per-step scalars are computed once on the host by adamw_scalars(), the per-element math below.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cpu/fp8_codec.h"

namespace fp8pipe::kernels {

// Hyperparameters of one step, as the optimizer holds them.
struct AdamWHyper {
  float lr = 0.0f;            // learning rate of this step
  float beta1 = 0.9f;         // first-moment decay
  float beta2 = 0.95f;        // second-moment decay
  float eps = 1e-8f;          // added to sqrt(v_hat)
  float weight_decay = 0.0f;  // decoupled (AdamW): p *= 1 - lr*wd, never added to the gradient
  int64_t step = 1;           // 1-based index of this step (bias correction); < 1 acts as 1
  float grad_scale = 1.0f;    // multiplies every gradient (the clip factor; 1 = no clipping)
};

// Per-step scalars, computed on the host (fp64, then rounded once to fp32) and passed unchanged to
// the CPU loop and to the CUDA kernel, so both see the same fp32 constants:
//   one_minus_beta1 = fp32(1 - beta1)                  one_minus_beta2 = fp32(1 - beta2)
//   decay           = fp32(1 - lr*weight_decay)
//   step_size       = fp32(lr / (1 - beta1^step))
//   sqrt_bc2        = fp32(sqrt(1 - beta2^step))
// beta^step is computed by binary exponentiation in fp64 (exact IEEE products, no libm pow), so
// the scalars do not depend on the host's math library.
struct AdamWScalars {
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float eps;
  float decay;
  float step_size;
  float sqrt_bc2;
  float grad_scale;
};

AdamWScalars adamw_scalars(const AdamWHyper& h);

// One AdamW step over elements [0, n) of p, g, m, v (m and v are bf16 bits). For each i, in fp32,
// every operation rounded to nearest-even, no FMA contraction, in exactly this order:
//   g  = g[i] * grad_scale
//   m  = bf16_to_float(m[i]);               v  = bf16_to_float(v[i])
//   m  = (beta1 * m) + (one_minus_beta1 * g)
//   v  = (beta2 * v) + (one_minus_beta2 * (g * g))
//   d  = (sqrtf(v) / sqrt_bc2) + eps        (sqrtf correctly rounded)
//   p  = p[i] * decay
//   p  = p - (step_size * (m / d))
//   p[i] = p;  m[i] = float_to_bf16(m);  v[i] = float_to_bf16(v)   (RNE)
// The update uses the fp32 moments before they are rounded for storage. Elements are
// independent, so any [begin, end) slice updated alone gives the same bits (ZeRO-1 sharding).
// NaN/Inf gradients propagate into p, m and v; callers skip non-finite steps before calling.
void adamw_step(float* p, const float* g, uint16_t* m, uint16_t* v, int64_t n,
                const AdamWScalars& s);

// The per-element math above, shared by adamw_step and the CUDA kernel (one definition of every
// operation; the CUDA build uses -fmad=false -prec-div=true -prec-sqrt=true, so sqrtf and / are
// correctly rounded there as on the host).
FP8PIPE_HD void adamw_element(float& p, float g, uint16_t& m, uint16_t& v, const AdamWScalars& s) {
  const float gi = g * s.grad_scale;
  float mi = bf16_to_float(m);
  float vi = bf16_to_float(v);
  const float m_decayed = s.beta1 * mi;
  const float m_new = s.one_minus_beta1 * gi;
  mi = m_decayed + m_new;
  const float g2 = gi * gi;
  const float v_decayed = s.beta2 * vi;
  const float v_new = s.one_minus_beta2 * g2;
  vi = v_decayed + v_new;
  const float root = sqrtf(vi);
  const float scaled_root = root / s.sqrt_bc2;
  const float denom = scaled_root + s.eps;
  const float ratio = mi / denom;
  const float delta = s.step_size * ratio;
  const float decayed = p * s.decay;
  p = decayed - delta;
  m = float_to_bf16(mi);
  v = float_to_bf16(vi);
}

// Sum of g[i]^2 over [0, n) in fp64, in index order. Each square of an fp32 value is exact in
// fp64, so only the additions round; the result is deterministic for a fixed order.
double sum_squares_f64(const float* g, int64_t n);

}  // namespace fp8pipe::kernels
