// The router's selection rule, shared by the CPU ops and the CUDA router kernel (FP8PIPE_HD), so
// both pick the same experts bit for bit: higher value first, ties to the lower index.
#pragma once

#include <cstdint>

#include "kernels/cpu/fp8_codec.h"

namespace fp8pipe::kernels {

// Strict "ranks before" for selection.
FP8PIPE_HD bool ranks_before(float va, int64_t ia, float vb, int64_t ib) {
  return va > vb || (va == vb && ia < ib);
}

// Indices of the k best of val(0..n) among those with allowed(e), best first; writes out[0..k).
// Accessors, so the GPU kernel can read values and masks it does not hold in per-thread arrays.
template <class Val, class Allowed>
FP8PIPE_HD void top_k_by(const Val& val, const Allowed& allowed, int64_t n, int64_t k,
                         int32_t* out) {
  if (k <= 0) return;
  int64_t m = 0;  // out[0..m) sorted best first (insertion: k and n are small)
  for (int64_t e = 0; e < n; ++e) {
    if (!allowed(e)) continue;
    const float v = val(e);
    if (m == k && !ranks_before(v, e, val(out[k - 1]), out[k - 1])) continue;
    int64_t pos = m < k ? m++ : k - 1;
    while (pos > 0 && ranks_before(v, e, val(out[pos - 1]), out[pos - 1])) {
      out[pos] = out[pos - 1];
      --pos;
    }
    out[pos] = static_cast<int32_t>(e);
  }
}

// Indices of the k best of val[0..n) restricted to allowed[] (all if null), best first.
FP8PIPE_HD void top_k(const float* val, const uint8_t* allowed, int64_t n, int64_t k,
                      int32_t* out) {
  top_k_by([val](int64_t e) { return val[e]; },
           [allowed](int64_t e) { return allowed == nullptr || allowed[e] != 0; }, n, k, out);
}

}  // namespace fp8pipe::kernels
