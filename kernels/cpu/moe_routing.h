// The MoE's per-token routing arithmetic, shared by the CPU ops and the CUDA kernels (FP8PIPE_HD)
// so both give the same bits (the CUDA build uses -fmad=false: no contraction on either side).
//
// Router backward of one token t (core/model/moe.cc). The gates are g_k = rs * s_k / Z over the
// selected experts (Z = sum of their scores s), so by the quotient rule
//   ds_j = (rs * dg_j - sum_k dg_k g_k) / Z   for a selected j;
// the sequence-wise balance loss alpha * sum_i f_i P_i (P_i = mean over the sequence's T tokens
// of s_i / S, S = sum_e s_e) adds, scaled by the trainer's loss scale and averaged over the B
// sequences,
//   ds_j += scale * alpha / (B * T * S) * (f_j - sum_i f_i s_i / S);
// then dlogit_j = ds_j * s_j * (1 - s_j) (the sigmoid). Sums in fp64 in index order.
#pragma once

#include <cstdint>

#include "kernels/cpu/fp8_codec.h"

namespace fp8pipe::kernels {

struct RouterGradParams {
  int64_t E = 0, K = 0;  // experts, selected per token
  float route_scale = 1.0f;
  float alpha = 0.0f;       // balance-loss weight (0: no balance term; f unused)
  double loss_scale = 1.0;  // d(objective)/d(micro-batch loss)
  int64_t B = 1, T = 1;     // sequences and tokens per sequence of the micro-batch
};

// s [E], idx [K], gates [K] of token t; dgate(k) its gate gradient for selection k; f [E] the
// balance counts of t's sequence (f_i = E/(K T) * selections of i), ignored when alpha == 0.
template <class DGate>
FP8PIPE_HD void router_grad_row(const float* s, const int32_t* idx, const float* gates, DGate dgate,
                                const double* f, const RouterGradParams& p, float* dlogits) {
  double S = 0.0, fs = 0.0, coef = 0.0;
  if (p.alpha != 0.0f) {
    for (int64_t e = 0; e < p.E; ++e) S += s[e];
    for (int64_t e = 0; e < p.E; ++e) fs += f[e] * s[e] / S;
    coef = p.loss_scale * p.alpha / (static_cast<double>(p.B) * p.T * S);
  }
  double Z = 0.0, dot = 0.0;
  for (int64_t k = 0; k < p.K; ++k) {
    Z += s[idx[k]];
    dot += dgate(k) * gates[k];
  }
  for (int64_t e = 0; e < p.E; ++e) {
    double ds = 0.0;
    if (p.alpha != 0.0f) ds += coef * (f[e] - fs);
    for (int64_t k = 0; k < p.K; ++k) {
      if (idx[k] == e) ds += (p.route_scale * dgate(k) - dot) / Z;
    }
    const double sc = s[e];
    dlogits[e] = static_cast<float>(ds * sc * (1.0 - sc));
  }
}

// The sequence-wise balance loss of one sequence of T tokens, in the pieces the backends share
// (Backend::balance_stats): f_e = E/(K T) added once per selection of e in token order; S_t =
// sum_e s_t,e; P_e = sum over tokens of s_t,e / S_t / T in token order; the micro-batch's value
// is sum over sequences b and experts e (in that order) of alpha f_b,e P_b,e, over B.
FP8PIPE_HD double balance_count(const int32_t* idx_seq, int64_t T, int64_t K, int64_t E,
                                int64_t e) {
  double f = 0.0;
  for (int64_t a = 0; a < T * K; ++a) {
    if (idx_seq[a] == e) f += static_cast<double>(E) / (K * T);
  }
  return f;
}
FP8PIPE_HD double score_sum(const float* s, int64_t E) {
  double S = 0.0;
  for (int64_t e = 0; e < E; ++e) S += s[e];
  return S;
}
FP8PIPE_HD double balance_share(const float* s_seq, const double* S_seq, int64_t T, int64_t E,
                                int64_t e) {
  double P = 0.0;
  for (int64_t t = 0; t < T; ++t) P += s_seq[t * E + e] / S_seq[t] / T;
  return P;
}
FP8PIPE_HD double balance_value(const double* f, const double* P, int64_t B, int64_t E,
                                float alpha) {
  double total = 0.0;
  for (int64_t i = 0; i < B * E; ++i) total += alpha * f[i] * P[i];
  return total / static_cast<double>(B);
}

}  // namespace fp8pipe::kernels
