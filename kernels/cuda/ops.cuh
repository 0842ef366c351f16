// The model operators of kernels/cpu/ops.h on CUDA (fp32), with the same signatures plus a stream.
// Host-includable (no device code). All pointers are device pointers; every call is asynchronous
// on `stream` and returns a gpu::Result for launch/argument errors only.
//
// Numerics against the CPU reference (kernels/cpu/ops.cc), what the tests in tests/cuda check:
//   bit-identical: embedding fwd/bwd, gather/scatter_add rows, add, axpy, round_bf16, the
//     column sums of rmsnorm_bwd (dw); every accumulation that the CPU does in row order is done in
//     the same order here (one thread per column walking the rows), so duplicated ids/rows give
//     the same bits as the CPU and the result is deterministic (no atomics anywhere).
//   within a few ulp: rmsnorm (the per-row double sums are tree-reduced), rope (double sin/cos of
//     the device libm, rounded to float), swiglu and the router scores (expf: CUDA's <= 2 ulp vs
//     glibc's), cross-entropy (double sum in another order).
//   within ~1e-5 relative: attention (fp32 dot products reduced across a warp instead of in index
//     order; online softmax instead of two passes).
// Router top-k: the CPU algorithm verbatim (insertion top-k, ties to the lower index, group limit
// by the sum of each group's top topk/max_groups biased scores), one thread per token.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cpu/adamw.h"
#include "kernels/cpu/moe_routing.h"
#include "kernels/cuda/cuda_check.h"

namespace fp8pipe::kernels::gpu {

// Limits of the one-thread-per-token router and the warp-per-row attention (checked, named in the
// error): experts per token row, top-k, groups; head dims.
constexpr int64_t kRouterMaxExperts = 512;
constexpr int64_t kRouterMaxTopk = 32;
constexpr int64_t kRouterMaxGroups = 64;
constexpr int64_t kAttnMaxHeadDim = 256;

// Index range check for ids living on the device: writes to *first_bad (device int64, caller sets
// it to n beforehand) the smallest i with ids[i] outside [lo, hi), or leaves n.
Result find_bad_index(const int32_t* ids, int64_t n, int64_t lo, int64_t hi, int64_t* first_bad,
                      cudaStream_t stream);

Result embedding_fwd(const float* table, const int32_t* ids, int64_t n, int64_t D, float* out,
                     cudaStream_t stream);
// dtable [V, D] += rows of dout by id (scatter_add_rows).
Result embedding_bwd_acc(const float* dout, const int32_t* ids, int64_t n, int64_t D, int64_t V,
                         float* dtable, cudaStream_t stream);

Result rmsnorm_fwd(const float* x, const float* w, int64_t n, int64_t D, float eps, float* y,
                   float* rstd, cudaStream_t stream);
Result rmsnorm_bwd(const float* dy, const float* x, const float* w, const float* rstd, int64_t n,
                   int64_t D, float* dx, float* dw_acc, cudaStream_t stream);

// freq[half] are the pair frequencies computed on the host in double by kernels/cpu/rope.h (so
// they are the CPU's bits); angles pos*freq are formed in double on the device, cos and sin are
// scaled by `magnitude` (kernels/cpu/ops.h).
Result rope(float* x, const int32_t* pos, int64_t n, int64_t H, int64_t d, const double* freq,
            double magnitude, bool inverse, cudaStream_t stream);

// Causal attention, layouts of kernels/cpu/ops.h. `dscratch` (backward only) holds B*H*T floats
// (D_i = rowsum(dO_i * O_i)).
Result attention_fwd(const float* q, const float* k, const float* v, int64_t B, int64_t T,
                     int64_t H, int64_t dk, int64_t dv, float scale, float* o, float* lse,
                     cudaStream_t stream);
Result attention_bwd(const float* dout, const float* q, const float* k, const float* v,
                     const float* o, const float* lse, int64_t B, int64_t T, int64_t H, int64_t dk,
                     int64_t dv, float scale, float* dq, float* dk_out, float* dv_out,
                     float* dscratch, cudaStream_t stream);

// Attention over a key/value cache (kernels/cpu/ops.h attention_cached): a block of 8 warps per
// (query, head), splitting the keys, online softmax; dk and dv up to kDecodeMaxHeadDim (MLA's
// latent keys are kv_lora_rank + rope dims wide: 576 in DeepSeek-V3).
constexpr int64_t kDecodeMaxHeadDim = 1024;
Result attention_cached(const float* q, const float* k, const float* v, int64_t n, int64_t L,
                        int64_t H, int64_t G, int64_t dk, int64_t dv, int64_t v_ld, float scale,
                        float* o, cudaStream_t stream);
// The same over a bf16 cache (bit patterns, widened exactly as read).
Result attention_cached(const float* q, const uint16_t* k, const uint16_t* v, int64_t n, int64_t L,
                        int64_t H, int64_t G, int64_t dk, int64_t dv, int64_t v_ld, float scale,
                        float* o, cudaStream_t stream);

Result swiglu_fwd(const float* g, const float* u, int64_t n, float* h, cudaStream_t stream);
Result swiglu_bwd(const float* dh, const float* g, const float* u, int64_t n, float* dg, float* du,
                  cudaStream_t stream);

Result cross_entropy_fwd(const float* logits, const int32_t* targets, int64_t n, int64_t V,
                         float* loss, cudaStream_t stream);
Result cross_entropy_bwd(const float* logits, const int32_t* targets, int64_t n, int64_t V,
                         float row_scale, float* dlogits, cudaStream_t stream);

// bias may be null (no bias).
Result router_topk(const float* logits, const float* bias, int64_t n, int64_t E, int64_t topk,
                   int64_t n_groups, int64_t max_groups, float route_scale, float* scores,
                   int32_t* idx, float* gates, cudaStream_t stream);

// kernels/cpu/ops.h sort_assignments (a stable cub radix sort: the same order) and
// kernels/cpu/moe_routing.h's router backward, one thread per token (bit-identical: -fmad=false).
Result sort_assignments(const int32_t* idx, int64_t n, int64_t K, int64_t E, int32_t* order,
                        int32_t* rows, int32_t* slot, int32_t* counts, cudaStream_t stream);
Result router_grad(const float* scores, const int32_t* idx, const float* gates, const double* dgate,
                   const int32_t* slot, const double* f, const RouterGradParams& p, float* dlogits,
                   cudaStream_t stream);

// kernels/cpu/moe_routing.h's balance loss pieces: S per token, then f and P per (sequence,
// expert) in token order, then the value in one thread (bit-identical); loss[0] += value.
// `work` holds B*T + B*E doubles.
Result balance_stats(const float* scores, const int32_t* idx, int64_t B, int64_t T, int64_t E,
                     int64_t K, float alpha, double* f, double* loss, double* work,
                     cudaStream_t stream);

Result gather_rows(const float* in, const int32_t* rows, int64_t n, int64_t D, float* out,
                   cudaStream_t stream);
// out[i] = 0 + w[i] * in[rows[i]] (w may be null: weight 1), zeros where rows[i] < 0
// (bit-identical to the CPU).
Result gather_rows_scaled(const float* in, const int32_t* rows, const float* w, int64_t n,
                          int64_t D, float* out, cudaStream_t stream);
// out [R, D]: out[rows[i]] += w[i] * in[i], w may be null (weight 1); each element's adds in
// increasing i (bit-identical to the CPU). A stable radix sort of the rows (cub) groups each
// output row's inputs, then one block per output row sums them. FP8PIPE_SCATTER=columns selects
// the simple kernel (one thread per column, serial over n), kept as a reference.
Result scatter_add_rows(const float* in, const int32_t* rows, const float* w, int64_t n, int64_t D,
                        int64_t R, float* out, cudaStream_t stream);

Result add(const float* a, const float* b, int64_t n, float* out, cudaStream_t stream);
Result add(const double* a, const double* b, int64_t n, double* out, cudaStream_t stream);
// Byte ranges copied in one launch: segs[i] = {src, dst, bytes}; items[2k], items[2k + 1] = the
// segment and the kCopyChunk-byte chunk of it that block k copies (16-byte words where src, dst
// and the chunk allow, else 4-byte words or bytes).
struct CopySeg {
  const char* src;
  char* dst;
  int64_t bytes;
};
constexpr int64_t kCopyChunk = 16384;
Result copy_ranges(const CopySeg* segs, const int32_t* items, int64_t n_items, cudaStream_t stream);
Result axpy(float alpha, const float* x, int64_t n, float* y, cudaStream_t stream);
// ys[z] (a device pointer table of `count` arrays of n) += alpha * x[z*n ..]: axpy per array.
Result axpy_batch(float alpha, const float* x, int64_t n, float* const* ys, int64_t count,
                  cudaStream_t stream);
Result round_bf16(const float* x, int64_t n, float* out, cudaStream_t stream);
// out_bf16[i] = bf16_rne(x[i]) (bits), for GEMM outputs requested as bf16 and Backend::cast.
Result f32_to_bf16(const float* x, int64_t n, uint16_t* out, cudaStream_t stream);
Result bf16_to_f32(const uint16_t* x, int64_t n, float* out, cudaStream_t stream);  // exact

// kernels/cpu/ops.h causal_softmax / softmax_bwd: one block per row, the same double row sums
// tree-reduced (within a few ulp of the CPU: expf).
Result causal_softmax(const float* s, int64_t R, int64_t T, float* p, float* lse, bool recompute,
                      cudaStream_t stream);
Result softmax_bwd(const float* p, const float* dp, int64_t R, int64_t T, float* ds,
                   cudaStream_t stream);

// Fused AdamW, bit-identical to kernels::adamw_step (kernels/cpu/adamw.h: same fp32 scalars from
// adamw_scalars(), same operation order, no FMA contraction: the build uses -fmad=false).
Result adamw_step(float* p, const float* g, uint16_t* m, uint16_t* v, int64_t n,
                  const AdamWScalars& s, cudaStream_t stream);
// adamw_step over runs in one launch: runs[r] = {begin, end, moment, decay (0/1)} of the flat
// buffers, items[2k], items[2k + 1] = the run and the kAdamWChunk-element chunk block k updates;
// s[decay] are the run's scalars.
struct AdamWRunDev {
  int64_t begin, end, moment, decay;
};
constexpr int64_t kAdamWChunk = 8192;
Result adamw_runs(float* p, const float* g, uint16_t* m, uint16_t* v, const AdamWRunDev* runs,
                  const int32_t* items, int64_t n_items, AdamWScalars s0, AdamWScalars s1,
                  cudaStream_t stream);

// The optimizer on the device (kernels/cuda/optim_ops.cu; Backend::accumulate_grad .. adamw).
// acc[i] += double(g[i]); g[i] = 0 (bit-identical to the CPU loop: one exact add per element).
Result accumulate_f64(float* g, int64_t n, double* acc, cudaStream_t stream);
// out[r] = sum over c of double(a[r][c]) * b[r][c] for R rows of C floats: one block per row, a
// fixed tree (deterministic; the CPU sums in column order, so the last bits may differ).
Result row_dot(const float* a, const float* b, int64_t R, int64_t C, double* out,
               cudaStream_t stream);
// out[i] = float(acc[i]), round to nearest even (bit-identical).
Result round_f64(const double* acc, int64_t n, float* out, cudaStream_t stream);
// Squared sums in fp64, deterministic run to run (not the CPU's index-order bits): array `slot`
// has kSumSqBlocks partial sums (fixed strided subsets, fixed tree) at work[slot * kSumSqBlocks];
// sum_squares_final adds all `slots` * kSumSqBlocks partials in a fixed order into
// work[slots * kSumSqBlocks]. sum_squares_items computes the partials of every array in one
// launch: block k takes item k (items[2k] the array, items[2k + 1] the partial), so only the
// partials that hold elements (block b of an n-element array: b * kSumSqThreads < n) need an item;
// the caller zeroes `work` first, which is what the others sum to. ptrs/lens: each array's data and
// length.
constexpr int kSumSqBlocks = 256;
constexpr int kSumSqThreads = 256;  // threads per partial
Result sum_squares_items(const float* const* ptrs, const int64_t* lens, const int32_t* items,
                         int64_t n_items, double* work, cudaStream_t stream);
Result sum_squares_final(double* work, int64_t slots, cudaStream_t stream);

}  // namespace fp8pipe::kernels::gpu
