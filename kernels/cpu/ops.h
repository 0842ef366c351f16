// The non-GEMM operators of the model on the CPU (fp32), each with its backward. Leaf kernels:
// pointers and shapes only. The CUDA backend implements the same signatures in kernels/cuda, and
// core/backend.h exposes them on Tensors. Conventions: row-major; "rows" = tokens; gradients are
// written (not accumulated) unless the name says accumulate (`_acc`).
#pragma once

#include <cstdint>

namespace fp8pipe::kernels {

// out[n][D] = table[ids[n]][:].  Backward: dtable[ids[n]][:] += dout[n][:] (serial, deterministic).
void embedding_fwd(const float* table, const int32_t* ids, int64_t n, int64_t D, float* out);
void embedding_bwd_acc(const float* dout, const int32_t* ids, int64_t n, int64_t D, float* dtable);

// RMSNorm: y = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps) per row (accumulated in double).
void rmsnorm_fwd(const float* x, const float* w, int64_t n, int64_t D, float eps, float* y,
                 float* rstd);
// dx written; dw accumulated (+=) over rows.
void rmsnorm_bwd(const float* dy, const float* x, const float* w, const float* rstd, int64_t n,
                 int64_t D, float* dx, float* dw_acc);

// Rotary embedding on x[n][H][d] (d even, interleaved pairs (2i, 2i+1) as DeepSeek's reference
// code), position of row r = pos[r]; pair i turns by pos·freq[i] (rope_frequencies in rope.h)
// and is scaled by `magnitude` (1 but for YaRN with mscale != mscale_all_dim). In place.
// `inverse` turns by -angle with the same magnitude: the transpose, i.e. the backward.
void rope(float* x, const int32_t* pos, int64_t n, int64_t H, int64_t d, const double* freq,
          double magnitude, bool inverse);

// Causal multi-head attention for one sequence batch: q,k [B][T][H][dk], v [B][T][H][dv] ->
// o [B][T][H][dv]; lse [B][H][T] = log-sum-exp of the scaled scores (saved for backward).
void attention_fwd(const float* q, const float* k, const float* v, int64_t B, int64_t T, int64_t H,
                   int64_t dk, int64_t dv, float scale, float* o, float* lse);
// dq, dk, dv written.
void attention_bwd(const float* dout, const float* q, const float* k, const float* v,
                   const float* o, const float* lse, int64_t B, int64_t T, int64_t H, int64_t dk,
                   int64_t dv, float scale, float* dq, float* dk_out, float* dv_out);

// Attention of n new queries over a key/value cache (inference decoding): q [n][H][dk] are the
// last n of L positions of a sequence whose keys k [L][G][dk] and values (rows v_ld floats apart,
// kv head g's dv values at columns g*dv) cover positions 0..L-1; query i sees keys 0..L-n+i. Query
// head h reads kv head h / (H / G): G = H is multi-head, G = 1 one head shared by all (MLA's
// latent cache, whose values are the first columns of its keys). o [n][H][dv]. The softmax as
// attention_fwd's (max subtracted, fp32).
void attention_cached(const float* q, const float* k, const float* v, int64_t n, int64_t L,
                      int64_t H, int64_t G, int64_t dk, int64_t dv, int64_t v_ld, float scale,
                      float* o);
// The same over a bf16 cache (k and v as bf16 bit patterns, widened exactly as they are read).
void attention_cached(const float* q, const uint16_t* k, const uint16_t* v, int64_t n, int64_t L,
                      int64_t H, int64_t G, int64_t dk, int64_t dv, int64_t v_ld, float scale,
                      float* o);

// The pieces of attention as GEMMs (precision.attention=gemm; core/model/attention_core.cc).
// Causal softmax over the rows of s[R][T], row r being query position r % T (columns j > r % T
// masked): lse[r] = m + log(sum_{j<=i} exp(s[r][j] - m)) with m the row max and the sum in
// double (as the fused kernel), p[r][j] = exp(s[r][j] - lse[r]) and 0 where masked. With
// `recompute`, lse is read instead of computed (the backward). p may alias s.
void causal_softmax(const float* s, int64_t R, int64_t T, float* p, float* lse, bool recompute);
// ds[r][j] = p[r][j] * (dp[r][j] - sum_j p[r][j] dp[r][j]) (the row sum in double); ds may
// alias dp.
void softmax_bwd(const float* p, const float* dp, int64_t R, int64_t T, float* ds);

// SwiGLU: h = silu(g) * u on [n][F]. Backward: dg, du from dh.
void swiglu_fwd(const float* g, const float* u, int64_t n, float* h);
void swiglu_bwd(const float* dh, const float* g, const float* u, int64_t n, float* dg, float* du);

// Cross-entropy of logits[n][V] against targets (target < 0 = ignored): loss[n] per row (nats,
// 0 for ignored). Backward: dlogits = (softmax - onehot) * row_scale for non-ignored rows.
void cross_entropy_fwd(const float* logits, const int32_t* targets, int64_t n, int64_t V,
                       float* loss);
void cross_entropy_bwd(const float* logits, const int32_t* targets, int64_t n, int64_t V,
                       float row_scale, float* dlogits);

// MoE routing (DeepSeek-V3): scores s = sigmoid(logits) [n][E]; selection by s + bias among at
// most `max_groups` of `n_groups` contiguous expert groups (groups ranked by the sum of their top
// `topk / max_groups` biased scores; n_groups == 1 disables the limit); top-k experts by biased
// score (ties to the lower index); gates = s_sel / sum(s_sel) * route_scale (bias never in gates).
// idx[n][topk] lists the chosen experts in descending biased-score order.
void router_topk(const float* logits, const float* bias, int64_t n, int64_t E, int64_t topk,
                 int64_t n_groups, int64_t max_groups, float route_scale, float* scores,
                 int32_t* idx, float* gates);

// The MoE dispatch order (no expert parallelism): the n*K assignments a = t*K + k of idx[n][K]
// (experts in [0, E)) stably sorted by expert. order[i] is the assignment at place i, rows[i] =
// order[i] / K its token, slot[a] the place of assignment a, counts[e] the assignments of e.
void sort_assignments(const int32_t* idx, int64_t n, int64_t K, int64_t E, int32_t* order,
                      int32_t* rows, int32_t* slot, int32_t* counts);

// Row gather / scatter-add: out[i] = in[rows[i]];  out[rows[i]] += w[i] * in[i] (w may be null).
void gather_rows(const float* in, const int32_t* rows, int64_t n, int64_t D, float* out);
// out[i] = 0 + w[i] * in[rows[i]] (w may be null: weight 1), a zero row where rows[i] < 0: the
// bits of scatter_add_rows of those rows into zeros (the 0 + makes -0 +0), without a scatter.
void gather_rows_scaled(const float* in, const int32_t* rows, const float* w, int64_t n, int64_t D,
                        float* out);
void scatter_add_rows(const float* in, const int32_t* rows, const float* w, int64_t n, int64_t D,
                      float* out);

// Elementwise helpers.
void add(const float* a, const float* b, int64_t n, float* out);  // out = a + b
void add(const double* a, const double* b, int64_t n, double* out);
void axpy(float alpha, const float* x, int64_t n, float* y);  // y += alpha * x
void round_bf16(const float* x, int64_t n, float* out);       // out = f32(bf16_rne(x))

}  // namespace fp8pipe::kernels
