// Argument checks of the Backend ops (core/backend.h), shared by the CPU and CUDA backends: one
// function per op validates its tensors' dtypes and shapes and returns the error callers see
// ("<op>: <what is required> (got <tensor>)"), so both backends accept and refuse the same
// arguments with the same messages and the rules live in one place. What depends on the device
// stays in the backends: where a tensor lives (the CUDA backend's on_gpu), the CPU kernels'
// own limits, and data-dependent checks that must read the tensor (token ids in range), whose
// scan differs by device but whose message is built here.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <span>
#include <vector>

#include "core/backend.h"
#include "core/status.h"
#include "core/tensor.h"

namespace fp8pipe::checks {

// ---- generic rules
// Ok, or "op: what (got t.describe())".
Status need(bool ok, const char* op, const char* what, const Tensor& t);
Status f32(const char* op, std::initializer_list<const Tensor*> ts);  // defined fp32 tensors
Status i32(const char* op, const Tensor& t);                          // a defined i32 tensor
Status same(const char* op, const Tensor& a, const Tensor& b);        // equal element counts
Status float_input(const char* op, const Tensor& x);  // fp32 or bf16 of rank >= 1 (quantize input)
Status fp8(const char* op, const Tensor& q);          // FP8 with scales attached

// ---- one per Backend op (same argument names; scalars only where a rule needs them)
Status empty(const Shape& shape);
Status copy(const Tensor& src, const Tensor& dst);  // dtype and count; devices: the backend
Status copy_range(const CopyRange& r);              // dtypes, and offsets within both tensors
Status quantize(const Tensor& x);
Status quantize_transposed(const Tensor& x);
Status transpose_fp8(const Tensor& q);
Status quantize_e5m6(const Tensor& x);
Status dequantize(const Tensor& q, const Tensor& out);  // FP8 or E5M6 q
// quantize_groups / quantize_transposed_groups (x fp32 [total_rows, K]) and dequantize_groups.
Status grouped_input(const char* op, const Tensor& x, const RowGroups& groups);
Status dequantize_groups(const GroupedFp8& q, const RowGroups& groups, const Tensor& out);
Status requantize_transposed_groups(const GroupedFp8& q, const RowGroups& groups);  // [M, K] codes
Status requantize_transposed(const Tensor& q);  // 1x128-quantized, 2-D
Status gather_fp8_groups(const Tensor& codes, const Tensor& scales, const RowGroups& in_groups,
                         const Tensor& rows, const Tensor& pad, const RowGroups& groups);
Status quantize_blocks_batch(std::span<const Tensor* const> ws);  // same-shaped 2-D fp32
Status transpose_fp8_batch(const GroupedFp8& q);                  // a quantize_blocks_batch result
Status gemm_fp8(const Tensor& a, const Tensor& b, const Tensor& out);
Status gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c);
// gemm_fp8_grouped / gemm_grouped (each GEMM also passes gemm_fp8 / gemm): gemms[i] is GEMM i's
// {output, inputs...}. No output may overlap another output or any input (an FP8 input's scales
// included), since the GEMMs may run concurrently.
Status grouped_gemm_outputs(const char* op, std::span<const std::vector<const Tensor*>> gemms);
Status gemm_fp8_grouped(std::span<const Fp8GemmArgs> gs);
Status gemm_grouped(std::span<const GemmArgs> gs);
Status cast(const Tensor& src, const Tensor& dst);  // fp32 <-> bf16, equal counts
Status gemm_batched(const Tensor& a, const Tensor& b, const Tensor& c, const GemmBatch& g);
Status causal_softmax(const Tensor& s, const Tensor& p, const Tensor& lse);
Status softmax_bwd(const Tensor& p, const Tensor& dp, const Tensor& ds);

Status embedding_fwd(const Tensor& table, const Tensor& ids, const Tensor& out);
Status embedding_bwd_acc(const Tensor& dout, const Tensor& ids, const Tensor& dtable);
Status rmsnorm_fwd(const Tensor& x, const Tensor& w, const Tensor& y, const Tensor& rstd);
Status rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                   const Tensor& dx, const Tensor& dw_acc);
Status rope(const Tensor& x, const Tensor& pos, int64_t heads);
// B * T * H == 0 passes the shape checks: the op is then a no-op.
Status attention_cached(const Tensor& q, const Tensor& k, const Tensor& v, int64_t H, int64_t G,
                        int64_t dv, const Tensor& o);
Status attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, int64_t B, int64_t T,
                     int64_t H, const Tensor& o, const Tensor& lse);
Status attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& o, const Tensor& lse, int64_t B, int64_t T, int64_t H,
                     const Tensor& dq, const Tensor& dk, const Tensor& dv);
Status swiglu_fwd(const Tensor& g, const Tensor& u, const Tensor& h);
Status swiglu_bwd(const Tensor& dh, const Tensor& g, const Tensor& u, const Tensor& dg,
                  const Tensor& du);
Status cross_entropy_fwd(const Tensor& logits, const Tensor& targets, const Tensor& loss);
Status cross_entropy_bwd(const Tensor& logits, const Tensor& targets, const Tensor& dlogits);
Status router_topk(const Tensor& logits, const Tensor& bias, int64_t topk, int64_t n_groups,
                   int64_t max_groups, const Tensor& scores, const Tensor& idx,
                   const Tensor& gates);
Status gather_rows(const Tensor& in, const Tensor& rows, const Tensor& out);
Status gather_rows_scaled(const Tensor& in, const Tensor& rows, const Tensor& w, const Tensor& out);
Status balance_stats(const Tensor& scores, const Tensor& idx, int64_t B, int64_t T, const Tensor& f,
                     const Tensor& loss);
Status sort_assignments(const Tensor& idx, int64_t E, const Tensor& order, const Tensor& rows,
                        const Tensor& slot, const Tensor& counts);
Status router_grad(const Tensor& scores, const Tensor& idx, const Tensor& gates,
                   const Tensor& dgate, const Tensor& slot, const Tensor& f,
                   const kernels::RouterGradParams& p, const Tensor& dlogits);
Status scatter_add_rows(const Tensor& in, const Tensor& rows, const Tensor& w, const Tensor& out);
Status add(const Tensor& a, const Tensor& b, const Tensor& out);
Status axpy(const Tensor& x, const Tensor& y);
Status axpy_batch(const Tensor& x, std::span<Tensor* const> ys);
Status round_bf16(const Tensor& x, const Tensor& out);
Status row_dot(const Tensor& a, const Tensor& b, const Tensor& out);
// The optimizer ops: f64 sums, fp32 values and gradients, bf16 moments, equal element counts.
Status accumulate_grad(const Tensor& grad, const Tensor& acc);
Status round_f64(const Tensor& acc, const Tensor& out);
Status sum_squares(std::span<const Tensor* const> gs, const double* total);
Status adamw(const Tensor& p, const Tensor& g, const Tensor& m, const Tensor& v);
// One run of adamw_runs: p, g 1-D fp32 of one length, m, v 1-D bf16, the run inside both.
Status adamw_run(const Tensor& p, const Tensor& g, const Tensor& m, const Tensor& v,
                 const AdamWRun& r);

// ---- data-dependent errors: the backend finds the first bad id, these word the error
Status bad_token_id(int64_t position, int32_t id, int64_t vocab);  // embedding_fwd
// Row indices of a gather or scatter on host memory: every idx[i] in [lo, limit) (lo -1: a zero
// row allowed), else "op: name[i] = v is outside [lo, limit)". The CPU backend checks; a device
// does not read its indices back (ModelCtx-internal callers build them).
Status row_indices(const char* op, const char* name, const Tensor& idx, int64_t lo, int64_t limit);
Status bad_target(int64_t row, int32_t target, int64_t vocab);  // cross_entropy_fwd

}  // namespace fp8pipe::checks
