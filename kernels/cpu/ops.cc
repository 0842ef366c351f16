// The CPU (fp32) model operators of kernels/cpu/ops.h with their backwards. Plain serial loops
// written so the inner loops are contiguous axpys the compiler can vectorise; attention splits its
// (batch, head) pairs over a few threads. Every result is independent of the thread count.
#include "kernels/cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "kernels/cpu/fp8_codec.h"
#include "kernels/cpu/topk.h"

namespace fp8pipe::kernels {
namespace {

// y[0..n) += a * x[0..n): the vectorisable building block of the loops below.
inline void axpy_n(float a, const float* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// Runs fn(lo, hi) over [0, n) split into contiguous chunks on up to 4 threads (only when the work
// is worth a thread). Each index is processed by exactly one call, so results never depend on nt.
template <class Fn>
void parallel_for(int64_t n, int64_t work, Fn&& fn) {
  const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  const int64_t nt = work < (int64_t{1} << 20) ? 1 : std::min<int64_t>({4, hw, n});
  if (nt <= 1) return fn(int64_t{0}, n);
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < nt; ++t) pool.emplace_back(fn, n * t / nt, n * (t + 1) / nt);
  fn(int64_t{0}, n / nt);
  for (auto& th : pool) th.join();
}

// ---- attention --------------------------------------------------------------------------------

// One (b, h) slice copied out of the [B][T][H][d] layout: rows [T][d] and, for the dot products
// against every key at once, the transpose [d][T] (so a score row is d axpys over contiguous t).
struct HeadSlice {
  std::vector<float> k, kt, v, vt;
  void load(const float* kp, const float* vp, int64_t T, int64_t H, int64_t dk, int64_t dv) {
    k.resize(T * dk), kt.resize(T * dk), v.resize(T * dv), vt.resize(T * dv);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t c = 0; c < dk; ++c) k[t * dk + c] = kt[c * T + t] = kp[t * H * dk + c];
      for (int64_t c = 0; c < dv; ++c) v[t * dv + c] = vt[c * T + t] = vp[t * H * dv + c];
    }
  }
};

// s[0..n) = sum_c a[c] * mt[c][0..n)  (mt is [d][T]); i.e. s[j] = dot(a, m[j]).
inline void dots_t(const float* a, const float* mt, int64_t d, int64_t T, int64_t n, float* s) {
  std::fill(s, s + n, 0.0f);
  for (int64_t c = 0; c < d; ++c) axpy_n(a[c], mt + c * T, n, s);
}

struct AttnDims {
  int64_t B, T, H, dk, dv;
  float scale;
};

// Forward for the (b, h) pairs [lo, hi): per query i, scores over keys j <= i, stable softmax
// (max subtracted), o_i = sum_j p_j v_j / l, lse_i = max + log(l).
void attention_fwd_heads(const float* q, const float* k, const float* v, const AttnDims& a,
                         int64_t lo, int64_t hi, float* o, float* lse) {
  const int64_t T = a.T, H = a.H, dk = a.dk, dv = a.dv;
  HeadSlice hs;
  std::vector<float> s(T), acc(dv);
  for (int64_t bh = lo; bh < hi; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t base_k = (b * T * H + h) * dk, base_v = (b * T * H + h) * dv;
    hs.load(k + base_k, v + base_v, T, H, dk, dv);
    for (int64_t i = 0; i < T; ++i) {
      const int64_t n = i + 1;
      dots_t(q + base_k + i * H * dk, hs.kt.data(), dk, T, n, s.data());
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j] *= a.scale);
      float l = 0.0f;
      for (int64_t j = 0; j < n; ++j) l += (s[j] = std::exp(s[j] - m));
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < n; ++j) axpy_n(s[j], hs.v.data() + j * dv, dv, acc.data());
      float* oi = o + base_v + i * H * dv;
      const float inv_l = 1.0f / l;
      for (int64_t c = 0; c < dv; ++c) oi[c] = acc[c] * inv_l;
      lse[bh * T + i] = m + std::log(l);
    }
  }
}

// Backward for the (b, h) pairs [lo, hi). With P = softmax(S), S = scale * Q K^T (causal):
//   dV = P^T dO;  dP = dO V^T;  dS = P ∘ (dP - D), D_i = rowsum(dO_i ∘ O_i) = sum_j P_ij dP_ij;
//   dQ = scale * dS K;  dK = scale * dS^T Q.  P is recomputed from the saved lse.
void attention_bwd_heads(const float* dout, const float* q, const float* k, const float* v,
                         const float* o, const float* lse, const AttnDims& a, int64_t lo,
                         int64_t hi, float* dq, float* dk_out, float* dv_out) {
  const int64_t T = a.T, H = a.H, dk = a.dk, dv = a.dv;
  HeadSlice hs;
  std::vector<float> p(T), dp(T), gk(T * dk), gv(T * dv);
  for (int64_t bh = lo; bh < hi; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t base_k = (b * T * H + h) * dk, base_v = (b * T * H + h) * dv;
    hs.load(k + base_k, v + base_v, T, H, dk, dv);
    std::fill(gk.begin(), gk.end(), 0.0f);
    std::fill(gv.begin(), gv.end(), 0.0f);
    for (int64_t i = 0; i < T; ++i) {
      const int64_t n = i + 1;
      const float* qi = q + base_k + i * H * dk;
      const float* doi = dout + base_v + i * H * dv;
      const float* oi = o + base_v + i * H * dv;
      float Di = 0.0f;
      for (int64_t c = 0; c < dv; ++c) Di += doi[c] * oi[c];
      dots_t(qi, hs.kt.data(), dk, T, n, p.data());
      const float li = lse[bh * T + i];
      for (int64_t j = 0; j < n; ++j) p[j] = std::exp(p[j] * a.scale - li);
      dots_t(doi, hs.vt.data(), dv, T, n, dp.data());
      float* dqi = dq + base_k + i * H * dk;
      std::fill(dqi, dqi + dk, 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        const float ds = p[j] * (dp[j] - Di) * a.scale;
        axpy_n(ds, hs.k.data() + j * dk, dk, dqi);
        axpy_n(ds, qi, dk, gk.data() + j * dk);
        axpy_n(p[j], doi, dv, gv.data() + j * dv);
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(dk_out + base_k + t * H * dk, gk.data() + t * dk, dk * sizeof(float));
      std::memcpy(dv_out + base_v + t * H * dv, gv.data() + t * dv, dv * sizeof(float));
    }
  }
}

// ---- router -----------------------------------------------------------------------------------

// Marks allowed[e] = 1 for the experts of the max_groups best groups of one token. A group's score
// is the sum of its top max(1, topk / max_groups) biased scores (DeepSeek-V3's node limit).
void limit_groups(const float* biased, int64_t E, int64_t topk, int64_t n_groups,
                  int64_t max_groups, uint8_t* allowed) {
  const int64_t gsize = E / n_groups;
  const int64_t per = std::min(gsize, std::max<int64_t>(1, topk / max_groups));
  std::vector<int32_t> best(per), kept(max_groups);
  std::vector<float> gscore(n_groups);
  for (int64_t g = 0; g < n_groups; ++g) {
    top_k(biased + g * gsize, nullptr, gsize, per, best.data());
    float sum = 0.0f;
    for (int64_t r = 0; r < per; ++r) sum += biased[g * gsize + best[r]];
    gscore[g] = sum;
  }
  top_k(gscore.data(), nullptr, n_groups, max_groups, kept.data());
  std::fill(allowed, allowed + E, uint8_t{0});
  for (int64_t r = 0; r < max_groups; ++r) {
    std::fill(allowed + kept[r] * gsize, allowed + (kept[r] + 1) * gsize, uint8_t{1});
  }
}

}  // namespace

// ---- embedding, norms, rope -------------------------------------------------------------------

void embedding_fwd(const float* table, const int32_t* ids, int64_t n, int64_t D, float* out) {
  for (int64_t r = 0; r < n; ++r) std::memcpy(out + r * D, table + ids[r] * D, D * sizeof(float));
}

void embedding_bwd_acc(const float* dout, const int32_t* ids, int64_t n, int64_t D, float* dtable) {
  for (int64_t r = 0; r < n; ++r) axpy_n(1.0f, dout + r * D, D, dtable + ids[r] * D);
}

void rmsnorm_fwd(const float* x, const float* w, int64_t n, int64_t D, float eps, float* y,
                 float* rstd) {
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = x + r * D;
    double ss = 0.0;
    for (int64_t c = 0; c < D; ++c) ss += static_cast<double>(xr[c]) * xr[c];
    const float rs = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(D) + eps));
    rstd[r] = rs;
    for (int64_t c = 0; c < D; ++c) y[r * D + c] = xr[c] * rs * w[c];
  }
}

// y_j = x_j r w_j with r = (mean(x^2) + eps)^(-1/2), so dr/dx_j = -r^3 x_j / D and
//   dx_j = r w_j dy_j + sum_i dy_i w_i x_i (-r^3 x_j / D) = r (w_j dy_j) - x_j r^3 mean(x w dy).
// The mean is accumulated in double; dw_j += dy_j x_j r.
void rmsnorm_bwd(const float* dy, const float* x, const float* w, const float* rstd, int64_t n,
                 int64_t D, float* dx, float* dw_acc) {
  for (int64_t r = 0; r < n; ++r) {
    const float *xr = x + r * D, *dyr = dy + r * D;
    const float rs = rstd[r];
    double dot = 0.0;
    for (int64_t c = 0; c < D; ++c) dot += static_cast<double>(xr[c]) * w[c] * dyr[c];
    const float k = static_cast<float>(dot / static_cast<double>(D)) * (rs * rs * rs);
    for (int64_t c = 0; c < D; ++c) {
      dx[r * D + c] = rs * (w[c] * dyr[c]) - xr[c] * k;
      dw_acc[c] += dyr[c] * (xr[c] * rs);
    }
  }
}

// Angles pos * theta^(-2i/d) are formed and reduced in double (pos * freq reaches ~1e3..1e5 rad,
// where a float angle would already be off by ~1e-3), then cos/sin are rounded once to float.
void rope(float* x, const int32_t* pos, int64_t n, int64_t H, int64_t d, const double* freq,
          double magnitude, bool inverse) {
  const int64_t half = d / 2;
  std::vector<float> cs(half), sn(half);
  const double sign = inverse ? -magnitude : magnitude;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t i = 0; i < half; ++i) {
      const double ang = static_cast<double>(pos[r]) * freq[i];
      cs[i] = static_cast<float>(magnitude * std::cos(ang));
      sn[i] = static_cast<float>(sign * std::sin(ang));
    }
    for (int64_t h = 0; h < H; ++h) {
      float* xh = x + (r * H + h) * d;
      for (int64_t i = 0; i < half; ++i) {
        const float a = xh[2 * i], b = xh[2 * i + 1];
        xh[2 * i] = a * cs[i] - b * sn[i];
        xh[2 * i + 1] = a * sn[i] + b * cs[i];
      }
    }
  }
}

// ---- attention --------------------------------------------------------------------------------

void attention_fwd(const float* q, const float* k, const float* v, int64_t B, int64_t T, int64_t H,
                   int64_t dk, int64_t dv, float scale, float* o, float* lse) {
  const AttnDims a{B, T, H, dk, dv, scale};
  parallel_for(B * H, B * H * T * T * (dk + dv) / 2,
               [&](int64_t lo, int64_t hi) { attention_fwd_heads(q, k, v, a, lo, hi, o, lse); });
}

void attention_bwd(const float* dout, const float* q, const float* k, const float* v,
                   const float* o, const float* lse, int64_t B, int64_t T, int64_t H, int64_t dk,
                   int64_t dv, float scale, float* dq, float* dk_out, float* dv_out) {
  const AttnDims a{B, T, H, dk, dv, scale};
  parallel_for(B * H, B * H * T * T * (dk + dv), [&](int64_t lo, int64_t hi) {
    attention_bwd_heads(dout, q, k, v, o, lse, a, lo, hi, dq, dk_out, dv_out);
  });
}

namespace {

inline float cache_value(float x) { return x; }
inline float cache_value(uint16_t x) { return bf16_to_float(x); }

template <typename KV>
void attention_cached_impl(const float* q, const KV* k, const KV* v, int64_t n, int64_t L,
                           int64_t H, int64_t G, int64_t dk, int64_t dv, int64_t v_ld, float scale,
                           float* o) {
  const int64_t per_kv = H / G;
  parallel_for(n * H, n * H * L * (dk + dv), [&](int64_t lo, int64_t hi) {
    std::vector<float> s(L), acc(dv), vrow(dv);
    for (int64_t ih = lo; ih < hi; ++ih) {
      const int64_t i = ih / H, h = ih % H, g = h / per_kv, seen = L - n + i + 1;
      const float* qi = q + ih * dk;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < seen; ++j) {
        const KV* kj = k + (j * G + g) * dk;
        float d = 0.0f;
        for (int64_t c = 0; c < dk; ++c) d += qi[c] * cache_value(kj[c]);
        m = std::max(m, s[j] = d * scale);
      }
      float l = 0.0f;
      for (int64_t j = 0; j < seen; ++j) l += (s[j] = std::exp(s[j] - m));
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < seen; ++j) {
        const KV* vj = v + j * v_ld + g * dv;
        for (int64_t c = 0; c < dv; ++c) vrow[c] = cache_value(vj[c]);
        axpy_n(s[j], vrow.data(), dv, acc.data());
      }
      const float inv_l = 1.0f / l;
      for (int64_t c = 0; c < dv; ++c) o[ih * dv + c] = acc[c] * inv_l;
    }
  });
}

}  // namespace

void attention_cached(const float* q, const float* k, const float* v, int64_t n, int64_t L,
                      int64_t H, int64_t G, int64_t dk, int64_t dv, int64_t v_ld, float scale,
                      float* o) {
  attention_cached_impl(q, k, v, n, L, H, G, dk, dv, v_ld, scale, o);
}

void attention_cached(const float* q, const uint16_t* k, const uint16_t* v, int64_t n, int64_t L,
                      int64_t H, int64_t G, int64_t dk, int64_t dv, int64_t v_ld, float scale,
                      float* o) {
  attention_cached_impl(q, k, v, n, L, H, G, dk, dv, v_ld, scale, o);
}

// ---- SwiGLU, cross-entropy ----------------------------------------------------------------------

void swiglu_fwd(const float* g, const float* u, int64_t n, float* h) {
  for (int64_t i = 0; i < n; ++i) h[i] = g[i] * sigmoid(g[i]) * u[i];
}

// h = g s(g) u with s' = s (1 - s):  dh/dg = u (s + g s (1 - s)),  dh/du = g s.
void swiglu_bwd(const float* dh, const float* g, const float* u, int64_t n, float* dg, float* du) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = sigmoid(g[i]);
    dg[i] = dh[i] * u[i] * (s + g[i] * s * (1.0f - s));
    du[i] = dh[i] * g[i] * s;
  }
}

namespace {
// log sum_j exp(x_j) = m + ls with m = max_j x_j and ls = log sum_j exp(x_j - m) (sum in double).
// Kept as the pair so that x_j - m stays accurate in float even for logits of magnitude ~1e4.
struct Lse {
  float m;
  double ls;
};
Lse log_sum_exp(const float* x, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < V; ++j) m = std::max(m, x[j]);
  double s = 0.0;
  for (int64_t j = 0; j < V; ++j) s += static_cast<double>(std::exp(x[j] - m));
  return {m, std::log(s)};
}
}  // namespace

void causal_softmax(const float* s, int64_t R, int64_t T, float* p, float* lse, bool recompute) {
  parallel_for(R, R * T, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* x = s + r * T;
      float* y = p + r * T;
      const int64_t n = r % T + 1;
      if (!recompute) {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
        double l = 0.0;
        for (int64_t j = 0; j < n; ++j) l += static_cast<double>(std::exp(x[j] - m));
        lse[r] = static_cast<float>(static_cast<double>(m) + std::log(l));
      }
      const float c = lse[r];
      for (int64_t j = 0; j < n; ++j) y[j] = std::exp(x[j] - c);
      for (int64_t j = n; j < T; ++j) y[j] = 0.0f;
    }
  });
}

void softmax_bwd(const float* p, const float* dp, int64_t R, int64_t T, float* ds) {
  parallel_for(R, R * T, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* pr = p + r * T;
      const float* dr = dp + r * T;
      double dot = 0.0;
      for (int64_t j = 0; j < T; ++j) dot += static_cast<double>(pr[j]) * dr[j];
      const float d = static_cast<float>(dot);
      float* o = ds + r * T;
      for (int64_t j = 0; j < T; ++j) o[j] = pr[j] * (dr[j] - d);
    }
  });
}

void cross_entropy_fwd(const float* logits, const int32_t* targets, int64_t n, int64_t V,
                       float* loss) {
  for (int64_t r = 0; r < n; ++r) {
    const float* x = logits + r * V;
    if (targets[r] < 0) {
      loss[r] = 0.0f;
      continue;
    }
    const Lse l = log_sum_exp(x, V);
    loss[r] = static_cast<float>(static_cast<double>(l.m) - x[targets[r]] + l.ls);
  }
}

void cross_entropy_bwd(const float* logits, const int32_t* targets, int64_t n, int64_t V,
                       float row_scale, float* dlogits) {
  for (int64_t r = 0; r < n; ++r) {
    const float* x = logits + r * V;
    float* d = dlogits + r * V;
    if (targets[r] < 0) {
      std::fill(d, d + V, 0.0f);
      continue;
    }
    const Lse l = log_sum_exp(x, V);
    const float ls = static_cast<float>(l.ls);
    for (int64_t j = 0; j < V; ++j) d[j] = std::exp((x[j] - l.m) - ls) * row_scale;
    d[targets[r]] -= row_scale;
  }
}

// ---- router -----------------------------------------------------------------------------------

void router_topk(const float* logits, const float* bias, int64_t n, int64_t E, int64_t topk,
                 int64_t n_groups, int64_t max_groups, float route_scale, float* scores,
                 int32_t* idx, float* gates) {
  const bool limited = n_groups > 1 && max_groups < n_groups;
  std::vector<float> biased(E);
  std::vector<uint8_t> allowed(E);
  for (int64_t r = 0; r < n; ++r) {
    float* s = scores + r * E;
    for (int64_t e = 0; e < E; ++e) {
      s[e] = sigmoid(logits[r * E + e]);
      biased[e] = s[e] + (bias ? bias[e] : 0.0f);
    }
    if (limited) limit_groups(biased.data(), E, topk, n_groups, max_groups, allowed.data());
    int32_t* ir = idx + r * topk;
    top_k(biased.data(), limited ? allowed.data() : nullptr, E, topk, ir);
    float sum = 0.0f;
    for (int64_t t = 0; t < topk; ++t) sum += s[ir[t]];
    for (int64_t t = 0; t < topk; ++t) gates[r * topk + t] = s[ir[t]] / sum * route_scale;
  }
}

// ---- rows and elementwise -----------------------------------------------------------------------

void sort_assignments(const int32_t* idx, int64_t n, int64_t K, int64_t E, int32_t* order,
                      int32_t* rows, int32_t* slot, int32_t* counts) {
  std::fill(counts, counts + E, 0);
  for (int64_t a = 0; a < n * K; ++a) ++counts[idx[a]];
  std::vector<int64_t> next(E, 0);  // counting sort: each expert's next place
  for (int64_t e = 1; e < E; ++e) next[e] = next[e - 1] + counts[e - 1];
  for (int64_t a = 0; a < n * K; ++a) {
    const int64_t i = next[idx[a]]++;
    order[i] = static_cast<int32_t>(a);
    rows[i] = static_cast<int32_t>(a / K);
    slot[a] = static_cast<int32_t>(i);
  }
}

void gather_rows(const float* in, const int32_t* rows, int64_t n, int64_t D, float* out) {
  for (int64_t i = 0; i < n; ++i) std::memcpy(out + i * D, in + rows[i] * D, D * sizeof(float));
}

void gather_rows_scaled(const float* in, const int32_t* rows, const float* w, int64_t n, int64_t D,
                        float* out) {
  for (int64_t i = 0; i < n; ++i) {
    float* o = out + i * D;
    if (rows[i] < 0) {
      std::fill(o, o + D, 0.0f);
      continue;
    }
    const float a = w ? w[i] : 1.0f;
    const float* x = in + static_cast<int64_t>(rows[i]) * D;
    for (int64_t j = 0; j < D; ++j) o[j] = 0.0f + a * x[j];
  }
}

void scatter_add_rows(const float* in, const int32_t* rows, const float* w, int64_t n, int64_t D,
                      float* out) {
  for (int64_t i = 0; i < n; ++i) axpy_n(w ? w[i] : 1.0f, in + i * D, D, out + rows[i] * D);
}

void add(const float* a, const float* b, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}
void add(const double* a, const double* b, int64_t n, double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

void axpy(float alpha, const float* x, int64_t n, float* y) { axpy_n(alpha, x, n, y); }

void round_bf16(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(float_to_bf16(x[i]));
}

}  // namespace fp8pipe::kernels
