// CUDA model operators (kernels/cuda/ops.cuh): the kernels/cpu/ops.cc math on the GPU, written
// for equality with the CPU reference first and speed second.
//
// Kernel shapes:
// - elementwise ops (add, axpy, swiglu, round_bf16, AdamW, gather, embedding forward): grid-stride
//   loops, one element per thread per iteration; same expression order as the CPU (no FMA: the
//   build uses -fmad=false), so results are bit-identical where the math has no libm call.
// - accumulating ops whose CPU loop runs over rows in order (embedding backward, scatter_add_rows,
//   rmsnorm's dw): one thread per column walks the rows in the CPU's order. Duplicate ids then add
//   in the same order as on the CPU: deterministic and bit-identical, with D-way parallelism only
//   (a sort-based segmented reduction is the faster follow-up).
// - row reductions (rmsnorm, cross-entropy): one 256-thread block per row, double accumulation
//   like the CPU but tree-reduced.
// - attention: one warp per query row (forward, dQ) or key row (dK, dV), head dims spread over
//   the lanes (<= 8 per lane, d <= 256), one key (query) per iteration with a xor-butterfly warp
//   dot product (every lane gets the same bits), online softmax in fp32. No T x T buffer, no
//   atomics: the backward is two passes (dQ and D_i by query rows; dK, dV by key rows, re-forming
//   P from the saved lse). Chosen over cuBLAS-batched GEMMs for its O(T) memory and deterministic
//   backward; it is a correctness baseline, not a tensor-core kernel (the tiled
//   FlashAttention-style version is the follow-up for the throughput goals of issue #7).
// - router: one thread per token running the CPU's insertion top-k and group limit verbatim.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cub/device/device_radix_sort.cuh>
#include <limits>
#include <string_view>

#include "kernels/cpu/fp8_codec.h"
#include "kernels/cpu/moe_routing.h"
#include "kernels/cpu/topk.h"
#include "kernels/cuda/ops.cuh"

namespace fp8pipe::kernels::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kColThreads = 128;
constexpr int kMaxPerLane = static_cast<int>(kAttnMaxHeadDim / 32);
constexpr unsigned kFull = 0xFFFFFFFFu;

int grid_for(int64_t n, int per = kThreads) {
  const int64_t b = (n + per - 1) / per;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535 * 8));
}

__device__ __forceinline__ int64_t gtid() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t gstride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// xor-butterfly sum: every lane ends with the same bits (each pairwise add is commutative).
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Block-wide reductions for kThreads threads; the result is returned to every thread.
__device__ double block_sum_d(double v) {
  __shared__ double sh[kThreads / 32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  v = warp_sum_d(v);
  __syncthreads();  // sh may still be read by a previous call
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  double r = 0.0;
  for (int w = 0; w < kThreads / 32; ++w) r += sh[w];
  return r;
}
__device__ float block_max(float v) {
  __shared__ float sh[kThreads / 32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  float r = -INFINITY;
  for (int w = 0; w < kThreads / 32; ++w) r = fmaxf(r, sh[w]);
  return r;
}

// ---- indices, embedding, rows ------------------------------------------------------------------

__global__ void k_find_bad(const int32_t* ids, int64_t n, int64_t lo, int64_t hi,
                           unsigned long long* first) {
  for (int64_t i = gtid(); i < n; i += gstride()) {
    const int64_t v = ids[i];
    if (v < lo || v >= hi) atomicMin(first, static_cast<unsigned long long>(i));
  }
}

__global__ void k_gather(const float* in, const int32_t* rows, int64_t n, int64_t D, float* out) {
  for (int64_t i = gtid(); i < n * D; i += gstride()) {
    const int64_t r = i / D, c = i - r * D;
    out[i] = in[static_cast<int64_t>(rows[r]) * D + c];
  }
}

__global__ void k_gather_scaled(const float* in, const int32_t* rows, const float* w, int64_t n,
                                int64_t D, float* out) {
  for (int64_t i = gtid(); i < n * D; i += gstride()) {
    const int64_t r = i / D, c = i - r * D;
    const int32_t src = rows[r];
    out[i] = src < 0 ? 0.0f
                     : __fadd_rn(0.0f,
                                 __fmul_rn(w ? w[r] : 1.0f, in[static_cast<int64_t>(src) * D + c]));
  }
}

// One thread per column, rows in order (the CPU's order for every output element).
__global__ void k_iota(int32_t* v, int64_t n) {
  for (int64_t i = gtid(); i < n; i += gstride()) v[i] = static_cast<int32_t>(i);
}

// First position in keys[0, n) (ascending) whose key is >= r.
__device__ int64_t lower_bound_key(const uint32_t* keys, int64_t n, uint32_t r) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (keys[mid] < r) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// out[r] += w[i] * in[i] over the inputs i of output row r, given the rows sorted stably (keys)
// with their input indices (idx): one block per output row, its columns across the threads, the
// inputs in increasing i: the CPU loop's order for every element (bit-identical), and parallel
// over rows and columns instead of serial over all n inputs.
__global__ void k_scatter_add_sorted(const float* in, const uint32_t* keys, const int32_t* idx,
                                     const float* w, int64_t n, int64_t D, int64_t R, float* out) {
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const int64_t lo = lower_bound_key(keys, n, static_cast<uint32_t>(r));
    const int64_t hi = lower_bound_key(keys, n, static_cast<uint32_t>(r) + 1);
    if (lo == hi) continue;
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
      float acc = out[r * D + c];
      for (int64_t k = lo; k < hi; ++k) {
        const int64_t i = idx[k];
        const float a = w ? w[i] : 1.0f;
        acc = acc + a * in[i * D + c];
      }
      out[r * D + c] = acc;
    }
  }
}

// The fallback (FP8PIPE_SCATTER=columns): one thread per column, serial over all n inputs.
__global__ void k_scatter_add_cols(const float* in, const int32_t* rows, const float* w, int64_t n,
                                   int64_t D, float* out) {
  for (int64_t c = gtid(); c < D; c += gstride()) {  // grid_for caps the grid: stride over D
    for (int64_t i = 0; i < n; ++i) {
      const float a = w ? w[i] : 1.0f;
      float* y = out + static_cast<int64_t>(rows[i]) * D + c;
      *y = *y + a * in[i * D + c];
    }
  }
}

// ---- rmsnorm
// --------------------------------------------------------------------------------------

__global__ void k_rmsnorm_fwd(const float* x, const float* w, int64_t D, float eps, float* y,
                              float* rstd) {
  const int64_t r = blockIdx.x;
  const float* xr = x + r * D;
  double ss = 0.0;
  for (int64_t c = threadIdx.x; c < D; c += kThreads) ss += static_cast<double>(xr[c]) * xr[c];
  ss = block_sum_d(ss);
  const float rs = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(D) + eps));
  if (threadIdx.x == 0) rstd[r] = rs;
  for (int64_t c = threadIdx.x; c < D; c += kThreads) y[r * D + c] = xr[c] * rs * w[c];
}

__global__ void k_rmsnorm_bwd_dx(const float* dy, const float* x, const float* w, const float* rstd,
                                 int64_t D, float* dx) {
  const int64_t r = blockIdx.x;
  const float *xr = x + r * D, *dyr = dy + r * D;
  const float rs = rstd[r];
  double dot = 0.0;
  for (int64_t c = threadIdx.x; c < D; c += kThreads) {
    dot += static_cast<double>(xr[c]) * w[c] * dyr[c];
  }
  dot = block_sum_d(dot);
  const float k = static_cast<float>(dot / static_cast<double>(D)) * (rs * rs * rs);
  for (int64_t c = threadIdx.x; c < D; c += kThreads)
    dx[r * D + c] = rs * (w[c] * dyr[c]) - xr[c] * k;
}

// dw[c] += sum over rows r, in row order, of dy[r][c] * (x[r][c] * rstd[r]) (the CPU's order:
// bit-identical). The products are independent, so a block computes a chunk of rows x 32 columns
// of them in parallel into shared memory; one thread per column then adds them in row order.
// The serial part is one fp32 add per row (~n * 4 cycles), not a global load per row.
constexpr int kDwCols = 32, kDwLanes = 8, kDwChunk = 64;
__global__ void k_rmsnorm_bwd_dw(const float* dy, const float* x, const float* rstd, int64_t n,
                                 int64_t D, float* dw) {
  __shared__ float prod[kDwChunk][kDwCols + 1];
  const int tx = threadIdx.x % kDwCols, ty = threadIdx.x / kDwCols;
  for (int64_t c0 = static_cast<int64_t>(blockIdx.x) * kDwCols; c0 < D;
       c0 += static_cast<int64_t>(gridDim.x) * kDwCols) {
    const int64_t c = c0 + tx;
    float acc = ty == 0 && c < D ? dw[c] : 0.0f;
    for (int64_t r0 = 0; r0 < n; r0 += kDwChunk) {
      for (int k = ty; k < kDwChunk; k += kDwLanes) {
        const int64_t r = r0 + k;
        prod[k][tx] = r < n && c < D ? dy[r * D + c] * (x[r * D + c] * rstd[r]) : 0.0f;
      }
      __syncthreads();
      if (ty == 0 && c < D) {
        const int m = static_cast<int>(n - r0 < kDwChunk ? n - r0 : kDwChunk);
        for (int k = 0; k < m; ++k) acc = acc + prod[k][tx];
      }
      __syncthreads();
    }
    if (ty == 0 && c < D) dw[c] = acc;
  }
}

// ---- rope ---------------------------------------------------------------------------------------

__global__ void k_rope(float* x, const int32_t* pos, int64_t n, int64_t H, int64_t d,
                       const double* freq, double magnitude, bool inverse) {
  const int64_t half = d / 2, total = n * H * half;
  const double sign = inverse ? -magnitude : magnitude;
  for (int64_t t = gtid(); t < total; t += gstride()) {
    const int64_t i = t % half, rh = t / half, r = rh / H;
    const double ang = static_cast<double>(pos[r]) * freq[i];
    const float cs = static_cast<float>(magnitude * cos(ang));
    const float sn = static_cast<float>(sign * sin(ang));
    float* xh = x + rh * d;
    const float a = xh[2 * i], b = xh[2 * i + 1];
    xh[2 * i] = a * cs - b * sn;
    xh[2 * i + 1] = a * sn + b * cs;
  }
}

// ---- attention
// ------------------------------------------------------------------------------------

struct AttnArgs {
  int64_t B, T, H, dk, dv;
  float scale;
};

// Loads row[c] for c = lane + 32 t (zeros past d).
__device__ __forceinline__ void load_row(const float* row, int64_t d, int lane, float* r) {
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int64_t c = lane + 32 * t;
    r[t] = c < d ? row[c] : 0.0f;
  }
}
// Dot of a register row with a memory row, reduced over the warp.
__device__ __forceinline__ float dot_row(const float* r, const float* row, int64_t d, int lane) {
  float part = 0.0f;
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < d) part += r[t] * row[c];
  }
  return warp_sum(part);
}

// Row (b, t, h) of a [B][T][H][d] tensor.
__device__ __forceinline__ int64_t row_off(int64_t b, int64_t t, int64_t h, const AttnArgs& a,
                                           int64_t d) {
  return ((b * a.T + t) * a.H + h) * d;
}

// One key of an online softmax: score s of value row vj (lane's columns lane + 32 t of dv) into
// the running max m, normalizer l and unnormalized output acc.
__device__ __forceinline__ float cache_value(float x) { return x; }
__device__ __forceinline__ float cache_value(uint16_t x) { return bf16_to_float(x); }

template <int N, typename VT>
__device__ __forceinline__ void online_softmax_step(float s, const VT* vj, int64_t dv, int lane,
                                                    float& m, float& l, float (&acc)[N]) {
  const float mn = fmaxf(m, s);
  const float corr = expf(m - mn);
  const float p = expf(s - mn);
  l = l * corr + p;
#pragma unroll
  for (int t = 0; t < N; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < dv) acc[t] = acc[t] * corr + p * cache_value(vj[c]);
  }
  m = mn;
}

__global__ void k_attn_fwd(const float* q, const float* k, const float* v, AttnArgs a, float* o,
                           float* lse) {
  const int64_t wid = gtid() / 32;
  const int lane = threadIdx.x & 31;
  if (wid >= a.B * a.H * a.T) return;
  const int64_t bh = wid / a.T, i = wid % a.T, b = bh / a.H, h = bh % a.H;
  float qr[kMaxPerLane], acc[kMaxPerLane];
  load_row(q + row_off(b, i, h, a, a.dk), a.dk, lane, qr);
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) acc[t] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int64_t j = 0; j <= i; ++j) {
    const float s = dot_row(qr, k + row_off(b, j, h, a, a.dk), a.dk, lane) * a.scale;
    online_softmax_step(s, v + row_off(b, j, h, a, a.dv), a.dv, lane, m, l, acc);
  }
  const float inv_l = 1.0f / l;
  float* oi = o + row_off(b, i, h, a, a.dv);
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < a.dv) oi[c] = acc[t] * inv_l;
  }
  if (lane == 0) lse[bh * a.T + i] = m + logf(l);
}

// attention_cached: block `blockIdx.x` is query i = blockIdx.x / H, head h, over keys 0..L-n+i of
// kv head h / (H / G). Its kDecodeWarps warps take every kDecodeWarps-th key (a decoding step has
// one query row per head, n * H blocks: one warp per row would leave most of the GPU idle over a
// long cache), each an online softmax over its keys with lane's columns lane + 32 t of q and of
// its output; the warps' (max, sum, output) are then merged through shared memory.
constexpr int kDecodePerLane = static_cast<int>(kDecodeMaxHeadDim / 32);
constexpr int kDecodeWarps = 8;
struct DecodeArgs {
  int64_t n, L, H, G, dk, dv, v_ld;
  float scale;
};
template <typename KV>
__global__ void k_attn_cached(const float* q, const KV* k, const KV* v, DecodeArgs a, float* o) {
  __shared__ float part_m[kDecodeWarps], part_l[kDecodeWarps];
  __shared__ float part_o[kDecodeWarps][kDecodeMaxHeadDim];
  const int64_t row = blockIdx.x;  // (query, head)
  const int w = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int64_t i = row / a.H, h = row % a.H, g = h / (a.H / a.G), seen = a.L - a.n + i + 1;
  float qr[kDecodePerLane], acc[kDecodePerLane];
#pragma unroll
  for (int t = 0; t < kDecodePerLane; ++t) {
    const int64_t c = lane + 32 * t;
    qr[t] = c < a.dk ? q[row * a.dk + c] : 0.0f;
    acc[t] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int64_t j = w; j < seen; j += kDecodeWarps) {
    const KV* kj = k + (j * a.G + g) * a.dk;
    float part = 0.0f;
#pragma unroll
    for (int t = 0; t < kDecodePerLane; ++t) {
      const int64_t c = lane + 32 * t;
      if (c < a.dk) part += qr[t] * cache_value(kj[c]);
    }
    const float s = warp_sum(part) * a.scale;
    online_softmax_step(s, v + j * a.v_ld + g * a.dv, a.dv, lane, m, l, acc);
  }
  if (lane == 0) {
    part_m[w] = m;
    part_l[w] = l;
  }
#pragma unroll
  for (int t = 0; t < kDecodePerLane; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < a.dv) part_o[w][c] = acc[t];
  }
  __syncthreads();
  float mx = -INFINITY;  // every row sees key 0, so some warp's max is finite
  for (int x = 0; x < kDecodeWarps; ++x) mx = fmaxf(mx, part_m[x]);
  float sum = 0.0f;
  float f[kDecodeWarps];
  for (int x = 0; x < kDecodeWarps; ++x) {
    f[x] = part_m[x] == -INFINITY ? 0.0f : expf(part_m[x] - mx);  // a warp without keys adds 0
    sum += part_l[x] * f[x];
  }
  const float inv = 1.0f / sum;
  for (int64_t c = threadIdx.x; c < a.dv; c += blockDim.x) {
    float val = 0.0f;
    for (int x = 0; x < kDecodeWarps; ++x) val += part_o[x][c] * f[x];
    o[row * a.dv + c] = val * inv;
  }
}

// dQ by query rows; also stores D_i = rowsum(dO_i * O_i) for the key pass.
__global__ void k_attn_bwd_dq(const float* dout, const float* q, const float* k, const float* v,
                              const float* o, const float* lse, AttnArgs a, float* dq,
                              float* dsum) {
  const int64_t wid = gtid() / 32;
  const int lane = threadIdx.x & 31;
  if (wid >= a.B * a.H * a.T) return;
  const int64_t bh = wid / a.T, i = wid % a.T, b = bh / a.H, h = bh % a.H;
  float qr[kMaxPerLane], dor[kMaxPerLane], g[kMaxPerLane];
  load_row(q + row_off(b, i, h, a, a.dk), a.dk, lane, qr);
  load_row(dout + row_off(b, i, h, a, a.dv), a.dv, lane, dor);
  const float Di = dot_row(dor, o + row_off(b, i, h, a, a.dv), a.dv, lane);
  if (lane == 0) dsum[bh * a.T + i] = Di;
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) g[t] = 0.0f;
  const float li = lse[bh * a.T + i];
  for (int64_t j = 0; j <= i; ++j) {
    const float* kj = k + row_off(b, j, h, a, a.dk);
    const float p = expf(dot_row(qr, kj, a.dk, lane) * a.scale - li);
    const float dp = dot_row(dor, v + row_off(b, j, h, a, a.dv), a.dv, lane);
    const float ds = p * (dp - Di) * a.scale;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      const int64_t c = lane + 32 * t;
      if (c < a.dk) g[t] += ds * kj[c];
    }
  }
  float* dqi = dq + row_off(b, i, h, a, a.dk);
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < a.dk) dqi[c] = g[t];
  }
}

// dK, dV by key rows j, over the queries i >= j.
__global__ void k_attn_bwd_dkdv(const float* dout, const float* q, const float* k, const float* v,
                                const float* lse, const float* dsum, AttnArgs a, float* dk,
                                float* dv) {
  const int64_t wid = gtid() / 32;
  const int lane = threadIdx.x & 31;
  if (wid >= a.B * a.H * a.T) return;
  const int64_t bh = wid / a.T, j = wid % a.T, b = bh / a.H, h = bh % a.H;
  float kr[kMaxPerLane], vr[kMaxPerLane], gk[kMaxPerLane], gv[kMaxPerLane];
  load_row(k + row_off(b, j, h, a, a.dk), a.dk, lane, kr);
  load_row(v + row_off(b, j, h, a, a.dv), a.dv, lane, vr);
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) gk[t] = gv[t] = 0.0f;
  for (int64_t i = j; i < a.T; ++i) {
    const float* qi = q + row_off(b, i, h, a, a.dk);
    const float* doi = dout + row_off(b, i, h, a, a.dv);
    const float p = expf(dot_row(kr, qi, a.dk, lane) * a.scale - lse[bh * a.T + i]);
    const float dp = dot_row(vr, doi, a.dv, lane);
    const float ds = p * (dp - dsum[bh * a.T + i]) * a.scale;
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) {
      const int64_t c = lane + 32 * t;
      if (c < a.dk) gk[t] += ds * qi[c];
      if (c < a.dv) gv[t] += p * doi[c];
    }
  }
  float* dkj = dk + row_off(b, j, h, a, a.dk);
  float* dvj = dv + row_off(b, j, h, a, a.dv);
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) {
    const int64_t c = lane + 32 * t;
    if (c < a.dk) dkj[c] = gk[t];
    if (c < a.dv) dvj[c] = gv[t];
  }
}

// ---- swiglu, cross-entropy --------------------------------------------------------------------

__global__ void k_swiglu_fwd(const float* g, const float* u, int64_t n, float* h) {
  for (int64_t i = gtid(); i < n; i += gstride()) h[i] = g[i] * sigmoidf_(g[i]) * u[i];
}

__global__ void k_swiglu_bwd(const float* dh, const float* g, const float* u, int64_t n, float* dg,
                             float* du) {
  for (int64_t i = gtid(); i < n; i += gstride()) {
    const float s = sigmoidf_(g[i]);
    dg[i] = dh[i] * u[i] * (s + g[i] * s * (1.0f - s));
    du[i] = dh[i] * g[i] * s;
  }
}

// (max, log-sum) of one row, as kernels/cpu/ops.cc log_sum_exp: the sum of float exps in double.
struct RowLse {
  float m;
  double ls;
};
__device__ RowLse row_lse(const float* x, int64_t V) {
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) m = fmaxf(m, x[j]);
  m = block_max(m);
  double s = 0.0;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) s += static_cast<double>(expf(x[j] - m));
  s = block_sum_d(s);
  return {m, log(s)};
}

// One row r of s[R][T], valid columns [0, r % T]: lse (unless recompute) then p.
__global__ void k_causal_softmax(const float* s, int64_t T, float* p, float* lse, bool recompute) {
  const int64_t r = blockIdx.x, n = r % T + 1;
  const float* x = s + r * T;
  float* y = p + r * T;
  __shared__ float c;
  if (!recompute) {
    const RowLse l = row_lse(x, n);
    if (threadIdx.x == 0) lse[r] = static_cast<float>(static_cast<double>(l.m) + l.ls);
  }
  __syncthreads();
  if (threadIdx.x == 0) c = lse[r];
  __syncthreads();
  const float cr = c;
  __syncthreads();  // every thread has read c before any writes p (p may alias s, not c)
  for (int64_t j = threadIdx.x; j < T; j += kThreads) y[j] = j < n ? expf(x[j] - cr) : 0.0f;
}

__global__ void k_softmax_bwd(const float* p, const float* dp, int64_t T, float* ds) {
  const int64_t r = blockIdx.x;
  const float* pr = p + r * T;
  const float* dr = dp + r * T;
  double dot = 0.0;
  for (int64_t j = threadIdx.x; j < T; j += kThreads) dot += static_cast<double>(pr[j]) * dr[j];
  const float d = static_cast<float>(block_sum_d(dot));
  float* o = ds + r * T;
  for (int64_t j = threadIdx.x; j < T; j += kThreads) o[j] = pr[j] * (dr[j] - d);
}

__global__ void k_ce_fwd(const float* logits, const int32_t* targets, int64_t V, float* loss) {
  const int64_t r = blockIdx.x;
  const int32_t t = targets[r];
  if (t < 0) {
    if (threadIdx.x == 0) loss[r] = 0.0f;
    return;
  }
  const float* x = logits + r * V;
  const RowLse l = row_lse(x, V);
  if (threadIdx.x == 0) {
    loss[r] = static_cast<float>(static_cast<double>(l.m) - x[t] + l.ls);
  }
}

__global__ void k_ce_bwd(const float* logits, const int32_t* targets, int64_t V, float row_scale,
                         float* dlogits) {
  const int64_t r = blockIdx.x;
  const int32_t t = targets[r];
  float* d = dlogits + r * V;
  if (t < 0) {
    for (int64_t j = threadIdx.x; j < V; j += kThreads) d[j] = 0.0f;
    return;
  }
  const float* x = logits + r * V;
  const RowLse l = row_lse(x, V);
  const float ls = static_cast<float>(l.ls);
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    float v = expf((x[j] - l.m) - ls) * row_scale;
    if (j == t) v -= row_scale;
    d[j] = v;
  }
}

// ---- router -------------------------------------------------------------------------------------

__global__ void k_router(const float* logits, const float* bias, int64_t n, int64_t E, int64_t topk,
                         int64_t n_groups, int64_t max_groups, float route_scale, float* scores,
                         int32_t* idx, float* gates) {
  // Per-thread arrays are sized by the top-k and group limits only: the biased affinities are read
  // back from the scores row this thread wrote (same expression, same bits) and the node limit is
  // a mask over groups, so the kernel's local memory, which the driver reserves for every thread
  // the GPU can hold, stays small (it was 5 KiB a thread with E-sized arrays: ~1.3 GiB on an H100).
  for (int64_t r = gtid(); r < n; r += gstride()) {  // grid_for caps the grid: stride over tokens
    const bool limited = n_groups > 1 && max_groups < n_groups;
    float* s = scores + r * E;
    for (int64_t e = 0; e < E; ++e) s[e] = sigmoidf_(logits[r * E + e]);
    auto biased = [s, bias](int64_t e) { return s[e] + (bias ? bias[e] : 0.0f); };
    uint8_t group_ok[kRouterMaxGroups];
    const int64_t gsize = limited ? E / n_groups : E;
    if (limited) {  // kernels/cpu/ops.cc limit_groups, verbatim
      const int64_t per = min(gsize, max(int64_t{1}, topk / max_groups));
      int32_t best[kRouterMaxTopk];  // per <= topk
      int32_t kept[kRouterMaxGroups];
      float gscore[kRouterMaxGroups];
      auto all = [](int64_t) { return true; };
      for (int64_t g = 0; g < n_groups; ++g) {
        auto in_group = [&biased, g, gsize](int64_t e) { return biased(g * gsize + e); };
        top_k_by(in_group, all, gsize, per, best);
        float sum = 0.0f;
        for (int64_t q = 0; q < per; ++q) sum += biased(g * gsize + best[q]);
        gscore[g] = sum;
      }
      top_k(gscore, nullptr, n_groups, max_groups, kept);
      for (int64_t g = 0; g < n_groups; ++g) group_ok[g] = 0;
      for (int64_t q = 0; q < max_groups; ++q) group_ok[kept[q]] = 1;
    }
    auto allowed = [&group_ok, limited, gsize](int64_t e) {
      return !limited || group_ok[e / gsize] != 0;
    };
    int32_t* ir = idx + r * topk;
    top_k_by(biased, allowed, E, topk, ir);
    float sum = 0.0f;
    for (int64_t t = 0; t < topk; ++t) sum += s[ir[t]];
    for (int64_t t = 0; t < topk; ++t) gates[r * topk + t] = s[ir[t]] / sum * route_scale;
  }
}

// ---- elementwise --------------------------------------------------------------------------------

__global__ void k_copy_ranges(const CopySeg* segs, const int32_t* items) {
  const CopySeg sg = segs[items[2 * blockIdx.x]];
  const int64_t begin = static_cast<int64_t>(items[2 * blockIdx.x + 1]) * kCopyChunk;
  const int64_t n = (sg.bytes - begin < kCopyChunk ? sg.bytes - begin : kCopyChunk);
  const char* src = sg.src + begin;
  char* dst = sg.dst + begin;
  const uintptr_t align = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                          static_cast<uintptr_t>(n);
  if ((align & 15) == 0) {
    for (int64_t i = threadIdx.x; i < n / 16; i += blockDim.x)
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
  } else if ((align & 3) == 0) {
    for (int64_t i = threadIdx.x; i < n / 4; i += blockDim.x)
      reinterpret_cast<uint32_t*>(dst)[i] = reinterpret_cast<const uint32_t*>(src)[i];
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
  }
}

template <class T>
__global__ void k_add(const T* a, const T* b, int64_t n, T* out) {
  for (int64_t i = gtid(); i < n; i += gstride()) out[i] = a[i] + b[i];
}
__global__ void k_axpy(float alpha, const float* x, int64_t n, float* y) {
  for (int64_t i = gtid(); i < n; i += gstride()) y[i] = y[i] + alpha * x[i];
}
// Tensor blockIdx.y of a pointer table: ys[z][i] += alpha * x[z*n + i] (k_axpy's expression).
__global__ void k_axpy_batch(float alpha, const float* x, int64_t n, float* const* ys) {
  float* y = ys[blockIdx.y];
  x += static_cast<int64_t>(blockIdx.y) * n;
  for (int64_t i = gtid(); i < n; i += gstride()) y[i] = y[i] + alpha * x[i];
}
__global__ void k_round_bf16(const float* x, int64_t n, float* out) {
  for (int64_t i = gtid(); i < n; i += gstride()) out[i] = bf16_to_float(float_to_bf16(x[i]));
}
__global__ void k_to_bf16(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = gtid(); i < n; i += gstride()) out[i] = float_to_bf16(x[i]);
}
__global__ void k_from_bf16(const uint16_t* x, int64_t n, float* out) {
  for (int64_t i = gtid(); i < n; i += gstride()) out[i] = bf16_to_float(x[i]);
}

// kernels/cpu/adamw.h adamw_element: the same definition on the device.
__global__ void k_adamw(float* p, const float* g, uint16_t* m, uint16_t* v, int64_t n,
                        AdamWScalars s) {
  for (int64_t i = gtid(); i < n; i += gstride()) adamw_element(p[i], g[i], m[i], v[i], s);
}

// k_adamw over the chunk of a run that block k owns (items), with the run's scalars.
__global__ void k_adamw_runs(float* p, const float* g, uint16_t* m, uint16_t* v,
                             const AdamWRunDev* runs, const int32_t* items, AdamWScalars s0,
                             AdamWScalars s1) {
  const AdamWRunDev r = runs[items[2 * blockIdx.x]];
  const int64_t first = r.begin + static_cast<int64_t>(items[2 * blockIdx.x + 1]) * kAdamWChunk;
  const int64_t last = first + kAdamWChunk < r.end ? first + kAdamWChunk : r.end;
  const AdamWScalars& s = r.decay ? s1 : s0;
  for (int64_t i = first + threadIdx.x; i < last; i += blockDim.x) {
    const int64_t j = r.moment + (i - r.begin);
    adamw_element(p[i], g[i], m[j], v[j], s);
  }
}

// MoE dispatch order: expert counts (integer atomics: exact in any order), then after the stable
// sort each place's token and each assignment's place.
__global__ void k_count_experts(const int32_t* idx, int64_t nk, int64_t E, int32_t* counts) {
  for (int64_t a = gtid(); a < nk; a += gstride()) {
    const int32_t e = idx[a];
    if (e >= 0 && e < E) atomicAdd(&counts[e], 1);
  }
}
__global__ void k_finish_sort(const int32_t* order, int64_t nk, int64_t K, int32_t* rows,
                              int32_t* slot) {
  for (int64_t i = gtid(); i < nk; i += gstride()) {
    rows[i] = static_cast<int32_t>(order[i] / K);
    slot[order[i]] = static_cast<int32_t>(i);
  }
}

// kernels/cpu/moe_routing.h router_grad_row, one thread per token (E and K are small).
__global__ void k_router_grad(const float* scores, const int32_t* idx, const float* gates,
                              const double* dgate, const int32_t* slot, const double* f,
                              RouterGradParams p, float* dlogits) {
  const int64_t n = p.B * p.T;
  for (int64_t t = gtid(); t < n; t += gstride()) {
    const int64_t a0 = t * p.K;
    auto dgate_at = [&](int64_t k) { return dgate[slot ? slot[a0 + k] : a0 + k]; };
    router_grad_row(scores + t * p.E, idx + a0, gates + a0, dgate_at,
                    f ? f + (t / p.T) * p.E : nullptr, p, dlogits + t * p.E);
  }
}

__global__ void k_score_sums(const float* scores, int64_t n, int64_t E, double* S) {
  for (int64_t t = gtid(); t < n; t += gstride()) S[t] = score_sum(scores + t * E, E);
}
__global__ void k_balance_fp(const float* scores, const int32_t* idx, const double* S, int64_t B,
                             int64_t T, int64_t E, int64_t K, double* f, double* P) {
  for (int64_t i = gtid(); i < B * E; i += gstride()) {
    const int64_t b = i / E, e = i % E;
    f[i] = balance_count(idx + b * T * K, T, K, E, e);
    P[i] = balance_share(scores + b * T * E, S + b * T, T, E, e);
  }
}
__global__ void k_balance_value(const double* f, const double* P, int64_t B, int64_t E, float alpha,
                                double* loss) {
  if (gtid() == 0) loss[0] += balance_value(f, P, B, E, alpha);
}

}  // namespace

#define FP8PIPE_LAUNCH(kernel, grid, block, stream, ...)      \
  do {                                                        \
    FP8PIPE_KERNEL(grid, block, stream, kernel)(__VA_ARGS__); \
    FP8PIPE_CUDA_LAUNCH_CHECK();                              \
  } while (0)

Result find_bad_index(const int32_t* ids, int64_t n, int64_t lo, int64_t hi, int64_t* first_bad,
                      cudaStream_t stream) {
  if (n == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_find_bad, grid_for(n), kThreads, stream, ids, n, lo, hi,
                 reinterpret_cast<unsigned long long*>(first_bad));
  return Result::Ok();
}

Result embedding_fwd(const float* table, const int32_t* ids, int64_t n, int64_t D, float* out,
                     cudaStream_t stream) {
  return gather_rows(table, ids, n, D, out, stream);  // the same row gather
}

Result embedding_bwd_acc(const float* dout, const int32_t* ids, int64_t n, int64_t D, int64_t V,
                         float* dtable, cudaStream_t stream) {
  return scatter_add_rows(dout, ids, nullptr, n, D, V, dtable, stream);
}

Result rmsnorm_fwd(const float* x, const float* w, int64_t n, int64_t D, float eps, float* y,
                   float* rstd, cudaStream_t stream) {
  if (n == 0) return Result::Ok();
  FP8PIPE_REQUIRE(n < (int64_t{1} << 31), "rmsnorm_fwd: more than 2^31 rows");
  FP8PIPE_LAUNCH(k_rmsnorm_fwd, static_cast<unsigned>(n), kThreads, stream, x, w, D, eps, y, rstd);
  return Result::Ok();
}

Result rmsnorm_bwd(const float* dy, const float* x, const float* w, const float* rstd, int64_t n,
                   int64_t D, float* dx, float* dw_acc, cudaStream_t stream) {
  if (n == 0 || D == 0) return Result::Ok();
  FP8PIPE_REQUIRE(n < (int64_t{1} << 31), "rmsnorm_bwd: more than 2^31 rows");
  FP8PIPE_LAUNCH(k_rmsnorm_bwd_dx, static_cast<unsigned>(n), kThreads, stream, dy, x, w, rstd, D,
                 dx);
  FP8PIPE_LAUNCH(k_rmsnorm_bwd_dw, grid_for(D, kDwCols), kDwCols * kDwLanes, stream, dy, x, rstd, n,
                 D, dw_acc);
  return Result::Ok();
}

Result rope(float* x, const int32_t* pos, int64_t n, int64_t H, int64_t d, const double* freq,
            double magnitude, bool inverse, cudaStream_t stream) {
  const int64_t total = n * H * (d / 2);
  if (total == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_rope, grid_for(total), kThreads, stream, x, pos, n, H, d, freq, magnitude,
                 inverse);
  return Result::Ok();
}

namespace {
constexpr int kAttnThreads = 128;  // 4 warps = 4 rows per block
Result check_attn(int64_t B, int64_t T, int64_t H, int64_t dk, int64_t dv) {
  FP8PIPE_REQUIRE(dk <= kAttnMaxHeadDim && dv <= kAttnMaxHeadDim,
                  "attention: head dims dk=" + std::to_string(dk) + " dv=" + std::to_string(dv) +
                      " exceed the warp-per-row kernel's limit of " +
                      std::to_string(kAttnMaxHeadDim));
  // attn_grid(B * H * T) must fit grid.x (<= 2^31 - 1 blocks of kAttnThreads / 32 rows each).
  FP8PIPE_REQUIRE(B * H * T <= ((int64_t{1} << 31) - 1) * (kAttnThreads / 32),
                  "attention: too many rows");
  return Result::Ok();
}
int attn_grid(int64_t rows) {
  return static_cast<int>((rows * 32 + kAttnThreads - 1) / kAttnThreads);
}
}  // namespace

Result attention_fwd(const float* q, const float* k, const float* v, int64_t B, int64_t T,
                     int64_t H, int64_t dk, int64_t dv, float scale, float* o, float* lse,
                     cudaStream_t stream) {
  FP8PIPE_GPU_TRY(check_attn(B, T, H, dk, dv));
  const int64_t rows = B * H * T;
  if (rows == 0) return Result::Ok();
  const AttnArgs a{B, T, H, dk, dv, scale};
  FP8PIPE_LAUNCH(k_attn_fwd, attn_grid(rows), kAttnThreads, stream, q, k, v, a, o, lse);
  return Result::Ok();
}

Result attention_bwd(const float* dout, const float* q, const float* k, const float* v,
                     const float* o, const float* lse, int64_t B, int64_t T, int64_t H, int64_t dk,
                     int64_t dv, float scale, float* dq, float* dk_out, float* dv_out,
                     float* dscratch, cudaStream_t stream) {
  FP8PIPE_GPU_TRY(check_attn(B, T, H, dk, dv));
  const int64_t rows = B * H * T;
  if (rows == 0) return Result::Ok();
  const AttnArgs a{B, T, H, dk, dv, scale};
  FP8PIPE_LAUNCH(k_attn_bwd_dq, attn_grid(rows), kAttnThreads, stream, dout, q, k, v, o, lse, a, dq,
                 dscratch);
  FP8PIPE_LAUNCH(k_attn_bwd_dkdv, attn_grid(rows), kAttnThreads, stream, dout, q, k, v, lse,
                 dscratch, a, dk_out, dv_out);
  return Result::Ok();
}

template <typename KV>
Result attention_cached_t(const float* q, const KV* k, const KV* v, int64_t n, int64_t L, int64_t H,
                          int64_t G, int64_t dk, int64_t dv, int64_t v_ld, float scale, float* o,
                          cudaStream_t stream) {
  FP8PIPE_REQUIRE(dk <= kDecodeMaxHeadDim && dv <= kDecodeMaxHeadDim,
                  "attention_cached: head dims above " + std::to_string(kDecodeMaxHeadDim));
  FP8PIPE_REQUIRE(n * H <= (int64_t{1} << 31) - 1,
                  "attention_cached: too many (query, head) rows for one grid");
  if (n * H == 0) return Result::Ok();
  const DecodeArgs a{n, L, H, G, dk, dv, v_ld, scale};
  FP8PIPE_LAUNCH(k_attn_cached<KV>, static_cast<unsigned>(n * H), kDecodeWarps * 32, stream, q, k,
                 v, a, o);
  return Result::Ok();
}

Result attention_cached(const float* q, const float* k, const float* v, int64_t n, int64_t L,
                        int64_t H, int64_t G, int64_t dk, int64_t dv, int64_t v_ld, float scale,
                        float* o, cudaStream_t stream) {
  return attention_cached_t(q, k, v, n, L, H, G, dk, dv, v_ld, scale, o, stream);
}

Result attention_cached(const float* q, const uint16_t* k, const uint16_t* v, int64_t n, int64_t L,
                        int64_t H, int64_t G, int64_t dk, int64_t dv, int64_t v_ld, float scale,
                        float* o, cudaStream_t stream) {
  return attention_cached_t(q, k, v, n, L, H, G, dk, dv, v_ld, scale, o, stream);
}

Result swiglu_fwd(const float* g, const float* u, int64_t n, float* h, cudaStream_t stream) {
  if (n == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_swiglu_fwd, grid_for(n), kThreads, stream, g, u, n, h);
  return Result::Ok();
}

Result swiglu_bwd(const float* dh, const float* g, const float* u, int64_t n, float* dg, float* du,
                  cudaStream_t stream) {
  if (n == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_swiglu_bwd, grid_for(n), kThreads, stream, dh, g, u, n, dg, du);
  return Result::Ok();
}

Result cross_entropy_fwd(const float* logits, const int32_t* targets, int64_t n, int64_t V,
                         float* loss, cudaStream_t stream) {
  if (n == 0) return Result::Ok();
  FP8PIPE_REQUIRE(n < (int64_t{1} << 31), "cross_entropy_fwd: more than 2^31 rows");
  FP8PIPE_LAUNCH(k_ce_fwd, static_cast<unsigned>(n), kThreads, stream, logits, targets, V, loss);
  return Result::Ok();
}

Result cross_entropy_bwd(const float* logits, const int32_t* targets, int64_t n, int64_t V,
                         float row_scale, float* dlogits, cudaStream_t stream) {
  if (n == 0) return Result::Ok();
  FP8PIPE_REQUIRE(n < (int64_t{1} << 31), "cross_entropy_bwd: more than 2^31 rows");
  FP8PIPE_LAUNCH(k_ce_bwd, static_cast<unsigned>(n), kThreads, stream, logits, targets, V,
                 row_scale, dlogits);
  return Result::Ok();
}

Result causal_softmax(const float* s, int64_t R, int64_t T, float* p, float* lse, bool recompute,
                      cudaStream_t stream) {
  if (R == 0 || T == 0) return Result::Ok();
  FP8PIPE_REQUIRE(R < (int64_t{1} << 31), "causal_softmax: more than 2^31 rows");
  FP8PIPE_LAUNCH(k_causal_softmax, static_cast<unsigned>(R), kThreads, stream, s, T, p, lse,
                 recompute);
  return Result::Ok();
}

Result softmax_bwd(const float* p, const float* dp, int64_t R, int64_t T, float* ds,
                   cudaStream_t stream) {
  if (R == 0 || T == 0) return Result::Ok();
  FP8PIPE_REQUIRE(R < (int64_t{1} << 31), "softmax_bwd: more than 2^31 rows");
  FP8PIPE_LAUNCH(k_softmax_bwd, static_cast<unsigned>(R), kThreads, stream, p, dp, T, ds);
  return Result::Ok();
}

Result router_topk(const float* logits, const float* bias, int64_t n, int64_t E, int64_t topk,
                   int64_t n_groups, int64_t max_groups, float route_scale, float* scores,
                   int32_t* idx, float* gates, cudaStream_t stream) {
  FP8PIPE_REQUIRE(E <= kRouterMaxExperts && topk <= kRouterMaxTopk && n_groups <= kRouterMaxGroups,
                  "router_topk: experts=" + std::to_string(E) + " topk=" + std::to_string(topk) +
                      " groups=" + std::to_string(n_groups) + " exceed the kernel's limits (" +
                      std::to_string(kRouterMaxExperts) + ", " + std::to_string(kRouterMaxTopk) +
                      ", " + std::to_string(kRouterMaxGroups) + ")");
  if (n == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_router, grid_for(n, 64), 64, stream, logits, bias, n, E, topk, n_groups,
                 max_groups, route_scale, scores, idx, gates);
  return Result::Ok();
}

Result gather_rows(const float* in, const int32_t* rows, int64_t n, int64_t D, float* out,
                   cudaStream_t stream) {
  if (n * D == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_gather, grid_for(n * D), kThreads, stream, in, rows, n, D, out);
  return Result::Ok();
}

Result gather_rows_scaled(const float* in, const int32_t* rows, const float* w, int64_t n,
                          int64_t D, float* out, cudaStream_t stream) {
  if (n * D == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_gather_scaled, grid_for(n * D), kThreads, stream, in, rows, w, n, D, out);
  return Result::Ok();
}

namespace {

// Stable radix sort of (key, position) over the keys' low end_bit bits (cub): pos[i] is the input
// position at place i in key order, equal keys in input order; keys_out (nullable) the sorted
// keys. Temporaries are allocated and freed in stream order; the caller's buffers must hold n.
cudaError_t sort_positions(const uint32_t* keys_in, int64_t n, int end_bit, uint32_t* keys_out,
                           int32_t* pos, cudaStream_t stream) {
  const int items = static_cast<int>(n);
  uint32_t* keys = nullptr;
  int32_t* iota = nullptr;
  void* temp = nullptr;
  size_t temp_bytes = 0;
  cudaError_t e =
      cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in, static_cast<uint32_t*>(nullptr),
                                      static_cast<const int32_t*>(nullptr),
                                      static_cast<int32_t*>(nullptr), items, 0, end_bit, stream);
  if (e == cudaSuccess && !keys_out) {
    e = cudaMallocAsync(reinterpret_cast<void**>(&keys), n * 4, stream);
  }
  if (e == cudaSuccess) e = cudaMallocAsync(reinterpret_cast<void**>(&iota), n * 4, stream);
  if (e == cudaSuccess) e = cudaMallocAsync(&temp, std::max<size_t>(temp_bytes, 1), stream);
  if (e == cudaSuccess) {
    FP8PIPE_KERNEL(grid_for(n), kThreads, stream, k_iota)(iota, n);
    e = cudaGetLastError();
  }
  if (e == cudaSuccess) {
    e = cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out ? keys_out : keys, iota,
                                        pos, items, 0, end_bit, stream);
  }
  for (void* p : {static_cast<void*>(keys), static_cast<void*>(iota), temp}) {
    if (p != nullptr) cudaFreeAsync(p, stream);  // stream-ordered: after the sort
  }
  return e;
}

// Bits that hold every key below `bound`.
int bits_below(int64_t bound, int max_bits) {
  int b = 1;
  while (b < max_bits && (int64_t{1} << b) < bound) ++b;
  return b;
}

}  // namespace

Result scatter_add_rows(const float* in, const int32_t* rows, const float* w, int64_t n, int64_t D,
                        int64_t R, float* out, cudaStream_t stream) {
  if (n == 0 || D == 0) return Result::Ok();
  static const bool by_columns = [] {
    const char* v = std::getenv("FP8PIPE_SCATTER");
    return v != nullptr && std::string_view(v) == "columns";
  }();
  if (by_columns || n > std::numeric_limits<int>::max() || R <= 0) {
    FP8PIPE_LAUNCH(k_scatter_add_cols, grid_for(D, kColThreads), kColThreads, stream, in, rows, w,
                   n, D, out);
    return Result::Ok();
  }
  // Stable radix sort of (row, input index): each output row's inputs in increasing input order.
  const auto* keys_in = reinterpret_cast<const uint32_t*>(rows);  // a negative row sorts last
  uint32_t* keys = nullptr;
  int32_t* idx = nullptr;
  cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&keys), n * 4, stream);
  if (e == cudaSuccess) e = cudaMallocAsync(reinterpret_cast<void**>(&idx), n * 4, stream);
  if (e == cudaSuccess) e = sort_positions(keys_in, n, bits_below(R, 32), keys, idx, stream);
  if (e == cudaSuccess) {
    const int blocks = static_cast<int>(std::min<int64_t>(R, int64_t{1} << 30));
    FP8PIPE_KERNEL(blocks, kColThreads, stream, k_scatter_add_sorted)
    (in, keys, idx, w, n, D, R, out);
    e = cudaGetLastError();
  }
  for (void* p : {static_cast<void*>(keys), static_cast<void*>(idx)}) {
    if (p != nullptr) cudaFreeAsync(p, stream);  // stream-ordered: after the kernels above
  }
  FP8PIPE_CUDA_TRY(e);
  return Result::Ok();
}

Result sort_assignments(const int32_t* idx, int64_t n, int64_t K, int64_t E, int32_t* order,
                        int32_t* rows, int32_t* slot, int32_t* counts, cudaStream_t stream) {
  FP8PIPE_CUDA_TRY(cudaMemsetAsync(counts, 0, E * sizeof(int32_t), stream));
  const int64_t nk = n * K;
  if (nk == 0) return Result::Ok();
  FP8PIPE_REQUIRE(nk < std::numeric_limits<int>::max(), "sort_assignments: too many assignments");
  FP8PIPE_LAUNCH(k_count_experts, grid_for(nk), kThreads, stream, idx, nk, E, counts);
  // Stable radix sort of (expert, assignment): the CPU's counting-sort order.
  FP8PIPE_CUDA_TRY(sort_positions(reinterpret_cast<const uint32_t*>(idx), nk, bits_below(E, 31),
                                  nullptr, order, stream));
  FP8PIPE_LAUNCH(k_finish_sort, grid_for(nk), kThreads, stream, order, nk, K, rows, slot);
  return Result::Ok();
}

Result router_grad(const float* scores, const int32_t* idx, const float* gates, const double* dgate,
                   const int32_t* slot, const double* f, const RouterGradParams& p, float* dlogits,
                   cudaStream_t stream) {
  const int64_t n = p.B * p.T;
  if (n == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_router_grad, grid_for(n, 128), 128, stream, scores, idx, gates, dgate, slot, f,
                 p, dlogits);
  return Result::Ok();
}

Result balance_stats(const float* scores, const int32_t* idx, int64_t B, int64_t T, int64_t E,
                     int64_t K, float alpha, double* f, double* loss, double* work,
                     cudaStream_t stream) {
  if (B * T == 0 || E == 0) return Result::Ok();
  double* S = work;
  double* P = work + B * T;
  FP8PIPE_LAUNCH(k_score_sums, grid_for(B * T, 128), 128, stream, scores, B * T, E, S);
  FP8PIPE_LAUNCH(k_balance_fp, grid_for(B * E, 64), 64, stream, scores, idx, S, B, T, E, K, f, P);
  FP8PIPE_LAUNCH(k_balance_value, 1, 1, stream, f, P, B, E, alpha, loss);
  return Result::Ok();
}

Result add(const float* a, const float* b, int64_t n, float* out, cudaStream_t stream) {
  if (n == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_add<float>, grid_for(n), kThreads, stream, a, b, n, out);
  return Result::Ok();
}

Result copy_ranges(const CopySeg* segs, const int32_t* items, int64_t n_items,
                   cudaStream_t stream) {
  if (n_items == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_copy_ranges, static_cast<unsigned>(n_items), kThreads, stream, segs, items);
  return Result::Ok();
}

Result add(const double* a, const double* b, int64_t n, double* out, cudaStream_t stream) {
  if (n == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_add<double>, grid_for(n), kThreads, stream, a, b, n, out);
  return Result::Ok();
}

Result axpy(float alpha, const float* x, int64_t n, float* y, cudaStream_t stream) {
  if (n == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_axpy, grid_for(n), kThreads, stream, alpha, x, n, y);
  return Result::Ok();
}

Result axpy_batch(float alpha, const float* x, int64_t n, float* const* ys, int64_t count,
                  cudaStream_t stream) {
  if (n == 0 || count == 0) return Result::Ok();
  FP8PIPE_REQUIRE(count <= 65535, "axpy_batch: too many outputs");
  const dim3 grid(static_cast<unsigned>(std::min(grid_for(n), 4096)), static_cast<unsigned>(count));
  FP8PIPE_LAUNCH(k_axpy_batch, grid, kThreads, stream, alpha, x, n, ys);
  return Result::Ok();
}

Result round_bf16(const float* x, int64_t n, float* out, cudaStream_t stream) {
  if (n == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_round_bf16, grid_for(n), kThreads, stream, x, n, out);
  return Result::Ok();
}

Result f32_to_bf16(const float* x, int64_t n, uint16_t* out, cudaStream_t stream) {
  if (n == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_to_bf16, grid_for(n), kThreads, stream, x, n, out);
  return Result::Ok();
}

Result bf16_to_f32(const uint16_t* x, int64_t n, float* out, cudaStream_t stream) {
  if (n == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_from_bf16, grid_for(n), kThreads, stream, x, n, out);
  return Result::Ok();
}

Result adamw_runs(float* p, const float* g, uint16_t* m, uint16_t* v, const AdamWRunDev* runs,
                  const int32_t* items, int64_t n_items, AdamWScalars s0, AdamWScalars s1,
                  cudaStream_t stream) {
  if (n_items == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_adamw_runs, static_cast<unsigned>(n_items), kThreads, stream, p, g, m, v, runs,
                 items, s0, s1);
  return Result::Ok();
}

Result adamw_step(float* p, const float* g, uint16_t* m, uint16_t* v, int64_t n,
                  const AdamWScalars& s, cudaStream_t stream) {
  if (n == 0) return Result::Ok();
  FP8PIPE_LAUNCH(k_adamw, grid_for(n), kThreads, stream, p, g, m, v, n, s);
  return Result::Ok();
}

}  // namespace fp8pipe::kernels::gpu
