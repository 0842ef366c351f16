// Backend / Stream / Event: the one interface the model and executor call (DESIGN.md §3). Two real
// implementations: CPU (core/cpu_backend.cc, kernels/cpu) and CUDA (kernels/cuda). Model code never
// branches on the device.
//
// Stream semantics, shared by both backends: `launch(fn)` runs `fn` in stream order. On the CPU the
// compute stream runs it inline on the calling thread and any other stream runs it on its own
// worker thread (so nonblocking MPI driven there truly overlaps compute); on CUDA `fn` is called at
// once on the host and enqueues device work on the stream. Events mark a point in a stream.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "kernels/cpu/adamw.h"
#include "kernels/cpu/fp8_gemm.h"
#include "kernels/cpu/moe_routing.h"
#include "kernels/cpu/rope.h"

namespace fp8pipe {

using kernels::GemmMode;

// The shape of Backend::gemm_batched.
struct GemmBatch {
  int64_t batch = 1, M = 0, N = 0, K = 0;
  bool trans_a = false, trans_b = false;
  int64_t lda = 0, ldb = 0, ldc = 0;
  int64_t stride_a = 0, stride_b = 0, stride_c = 0;
  int64_t offset_a = 0, offset_b = 0, offset_c = 0;
};
using kernels::QuantParams;

// One GEMM of Backend::gemm_fp8_grouped (out = a . b^T, as gemm_fp8) or Backend::gemm_grouped
// (c = alpha op(a) op(b) + beta c, as gemm). Tensors are handles: `out` / `c` are usually views
// (slice_rows) of one output buffer.
struct Fp8GemmArgs {
  Tensor a, b, out;
};
struct GemmArgs {
  Tensor a;
  bool trans_a = false;
  Tensor b;
  bool trans_b = false;
  Tensor c;
  float alpha = 1.0f, beta = 0.0f;
};

// One range of Backend::copy_ranges: elements [dst_off, dst_off + n) of dst (in row-major order)
// := elements [src_off, src_off + n) of src, the same dtype.
struct CopyRange {
  Tensor src;
  int64_t src_off = 0;
  Tensor dst;
  int64_t dst_off = 0;
  int64_t n = 0;
};

// One run of Backend::adamw_runs: elements [begin, end) of the flat weights and gradients, the
// moments from `moment` on, and which of the two scalar sets applies.
struct AdamWRun {
  int64_t begin = 0, end = 0, moment = 0;
  bool weight_decay = true;
};

// Contiguous row groups of one [M, K] activation: the MoE's local experts, each a run of rows of
// the expert-sorted (and padded) buffer. Group g is rows offsets[g] .. offsets[g+1]; tiles[g]
// counts the 128-row tiles of the groups before g (a group's 128x1 tiles start at its first row).
// `dev` holds offsets then tiles (i32 [2 (G + 1)]) where the backend's kernels read them.
// Build with make_row_groups.
struct RowGroups {
  std::vector<int64_t> offsets, tiles;
  Tensor dev;
  int64_t count() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t rows(int64_t g) const { return offsets[g + 1] - offsets[g]; }
  int64_t total_rows() const { return offsets.back(); }
};

// A grouped FP8 tensor: every group's codes and scales in two buffers, and each group as an FP8
// operand of its own (views of those buffers; undefined for an empty group), ready for gemm_fp8.
struct GroupedFp8 {
  Tensor codes, scales;
  std::vector<Tensor> group;
};

class Event {
 public:
  virtual ~Event() = default;
  virtual void synchronize() = 0;  // block the host until the marked work is done
  virtual bool query() = 0;        // done yet?
  // Milliseconds from `start` to this event, both done and made by Stream::record_timed() of the
  // same backend; nullopt otherwise.
  virtual std::optional<double> ms_since(Event& /*start*/) { return std::nullopt; }
};

class Stream {
 public:
  virtual ~Stream() = default;
  virtual const std::string& name() const = 0;
  virtual void launch(std::function<void()> fn) = 0;
  virtual std::shared_ptr<Event> record() = 0;
  // An event that can be timed against another (Event::ms_since; a CUDA timing event).
  virtual std::shared_ptr<Event> record_timed() { return record(); }
  virtual void wait(const std::shared_ptr<Event>& e) = 0;  // later work waits for e
  virtual void synchronize() = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;

  // Memory. Tensors are contiguous; `copy` works between any two devices (same dtype and numel).
  virtual Result<Tensor> empty(const Shape& shape, DType dtype) = 0;
  Result<Tensor> zeros(const Shape& shape, DType dtype);
  virtual Status fill_zero(Tensor& t) = 0;
  virtual Status copy(const Tensor& src, Tensor& dst) = 0;
  // Many element ranges at once (ZeRO-1's packing of every name's shard, parallel/grad_sync.h),
  // each as copy() of those elements; no destination range overlaps another range. A device
  // copies the ranges between its own tensors in one launch; this default, one after another.
  virtual Status copy_ranges(std::span<const CopyRange> rs);
  // Bytes of this backend's live tensors (MemoryCounter): what activation recomputation and
  // placements are judged by; the trainer logs the peak of each step.
  virtual MemoryUse memory() const = 0;
  virtual void reset_peak_memory() = 0;

  virtual Stream& compute() = 0;
  virtual std::unique_ptr<Stream> create_stream(const std::string& name) = 0;

  // FP8 numerics (FP8.md). x is fp32 or bf16, viewed as [rows, cols]. The result is FP8 with
  // scales attached. `nonfinite` (optional) receives the number of groups with NaN/Inf amax.
  virtual Result<Tensor> quantize(const Tensor& x, Granularity g, QuantParams p,
                                  int64_t* nonfinite = nullptr) = 0;
  // 128x1 quantization written transposed: [cols, rows] FP8 with 1x128 scales (Wgrad operands).
  virtual Result<Tensor> quantize_transposed(const Tensor& x, QuantParams p,
                                             int64_t* nonfinite = nullptr) = 0;
  // Exact transpose of a 128x128-quantized tensor (bytes and block scales), for Dgrad.
  virtual Result<Tensor> transpose_fp8(const Tensor& q) = 0;
  // out fp32, same shape; q FP8, or E5M6 (quantize_e5m6).
  virtual Status dequantize(const Tensor& q, Tensor& out) = 0;
  // E5M6 1x128 with power-of-two scales (kernels/cpu/quantize.h quantize_e5m6): x fp32 or bf16,
  // the result kE5M6 (1.5 bytes an element) with its scales attached. DeepSeek-V3's cache of the
  // attention output (precision.attn_out_cache); dequantize reads it back.
  virtual Result<Tensor> quantize_e5m6(const Tensor& x, int64_t* nonfinite = nullptr) = 0;
  // quantize_transposed(dequantize(q)) for a 1x128-quantized q: a Wgrad operand made of the
  // cached FP8 input, bit for bit those two calls (this default); a device does it in one pass.
  virtual Result<Tensor> requantize_transposed(const Tensor& q, QuantParams p,
                                               int64_t* nonfinite = nullptr);
  // Grouped FP8 (the MoE experts' activations in one pass, not one launch per expert). x is fp32
  // [M, K] with M = groups.total_rows(); each group's result equals, bit for bit, the ungrouped op
  // on that group's rows alone:
  //  - quantize_groups: 1x128, group g as quantize(x rows of g): codes are x's rows in place,
  //    scales in the VEC128 layout of g's own rows at scales[offsets[g] * ceil(K / 128)];
  //  - quantize_transposed_groups: group g as quantize_transposed(x rows of g), [K, n_g] codes at
  //    codes[K * offsets[g]], scales at scales[K * tiles[g]] (the Wgrad operands);
  //  - dequantize_groups: the inverse of quantize_groups into out fp32 [M, K].
  virtual Result<GroupedFp8> quantize_groups(const Tensor& x, const RowGroups& groups,
                                             QuantParams p) = 0;
  virtual Result<GroupedFp8> quantize_transposed_groups(const Tensor& x, const RowGroups& groups,
                                                        QuantParams p) = 0;
  virtual Status dequantize_groups(const GroupedFp8& q, const RowGroups& groups, Tensor& out) = 0;
  // The MoE experts' FP8 input without an fp32 copy: codes [n, K] (FP8) and scales (f32) of
  // tokens quantized 1x128, the scales in the VEC128 layout of in_groups (one group {0, n}: a
  // plain quantize result; groups per source rank: rows received over the all-to-all). Row j of
  // the result (M = groups.total_rows() rows, groups' layout) is row rows[i], i = pad[j] (pad
  // defined, i32 [M]) or j (rows i32 [M]), and a zero row (codes 0, the scale of an all-zero
  // block) where i < 0. Since 1x128 scaling is per row, that is bit for bit quantize_groups of
  // the gathered fp32 rows (but for -0, which keeps its sign code here).
  virtual Result<GroupedFp8> gather_fp8_groups(const Tensor& codes, const Tensor& scales,
                                               const RowGroups& in_groups, bool pow2,
                                               const Tensor& rows, const Tensor& pad,
                                               const RowGroups& groups) = 0;
  // quantize_transposed_groups(dequantize_groups(q)) for a quantize_groups result q ([M, K]
  // codes): the wgrad operand made of a cached 1x128 activation, bit for bit those two calls
  // (this default); a device does it in one pass, the fp32 values never written to memory.
  virtual Result<GroupedFp8> requantize_transposed_groups(const GroupedFp8& q,
                                                          const RowGroups& groups, QuantParams p);
  // Same-shaped fp32 weights (a MoE layer's experts) quantized 128x128 in one pass: group z is
  // quantize(*ws[z], k128x128) bit for bit, codes stacked [count * R, C], scales stacked; and the
  // exact transposes (transpose_fp8) of every group of such a result, stacked [count * C, R].
  virtual Result<GroupedFp8> quantize_blocks_batch(std::span<const Tensor* const> ws, QuantParams p,
                                                   int64_t* nonfinite = nullptr) = 0;
  virtual Result<GroupedFp8> transpose_fp8_batch(const GroupedFp8& q) = 0;
  // out[M][N] (fp32 or bf16) = A[M][K] . B[N][K]^T, both FP8 with scales (kernels/cpu/fp8_gemm.h).
  virtual Status gemm_fp8(const Tensor& a, const Tensor& b, Tensor& out, GemmMode mode) = 0;
  // Independent GEMMs (the MoE's per-expert products): no output overlaps another GEMM's output
  // or inputs. Each result is bit for bit that of its single call; a backend may run them
  // concurrently (CUDA: across FP8PIPE_GEMM_STREAMS streams). These defaults run them in order.
  virtual Status gemm_fp8_grouped(std::span<const Fp8GemmArgs> gs, GemmMode mode);
  virtual Status gemm_grouped(std::span<const GemmArgs> gs);
  // C = alpha * op(A) . op(B) + beta * C, row-major, op = transpose when flagged; C fp32, A and B
  // both fp32 or both bf16 (the BF16 twin: bf16 operands, fp32 accumulation, on tensor cores on
  // a GPU; the CPU widens bf16 to fp32 exactly and calls BLAS).
  virtual Status gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c,
                      float alpha = 1.0f, float beta = 0.0f) = 0;
  // Batched GEMMs over views of a, b, c (C fp32; A and B both fp32 or both bf16, as gemm): for
  // i in [0, batch), C_i = alpha op(A_i) op(B_i)
  // + beta C_i, row-major, X_i starting at element offset_x + i * stride_x with row stride ld_x
  // (A_i stored [M, K], or [K, M] when trans_a; B_i [K, N], or [N, K] when trans_b; C_i [M, N]).
  virtual Status gemm_batched(const Tensor& a, const Tensor& b, Tensor& c, const GemmBatch& g,
                              float alpha = 1.0f, float beta = 0.0f) = 0;
  // dst = src converted: fp32 -> bf16 (round to nearest even, as round_bf16) or bf16 -> fp32
  // (exact); the same element count.
  virtual Status cast(const Tensor& src, Tensor& dst) = 0;

  // Model operators: fp32 tensors viewed as [rows, cols], i32 ids; the math (and what is written
  // vs accumulated) is documented in kernels/cpu/ops.h. Shapes are checked here.
  virtual Status embedding_fwd(const Tensor& table, const Tensor& ids, Tensor& out) = 0;
  virtual Status embedding_bwd_acc(const Tensor& dout, const Tensor& ids, Tensor& dtable) = 0;
  virtual Status rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, Tensor& y,
                             Tensor& rstd) = 0;
  virtual Status rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                             Tensor& dx, Tensor& dw_acc) = 0;
  // x [n, heads * d]; pos [n]; the pair frequencies and magnitude from `r` (kernels/cpu/rope.h).
  virtual Status rope(Tensor& x, const Tensor& pos, int64_t heads, const kernels::RopeSpec& r,
                      bool inverse) = 0;
  // q, k [B*T, H*dk], v [B*T, H*dv] -> o [B*T, H*dv], lse [B*H*T].
  virtual Status attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, int64_t B,
                               int64_t T, int64_t H, float scale, Tensor& o, Tensor& lse) = 0;
  virtual Status attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                               const Tensor& v, const Tensor& o, const Tensor& lse, int64_t B,
                               int64_t T, int64_t H, float scale, Tensor& dq, Tensor& dk,
                               Tensor& dv) = 0;
  // Attention over a key/value cache (inference decoding, core/model/decode.h): q [n, H*dk] holds
  // the last n of L positions, k [L, G*dk] and v [L, >= G*dv] all L (kv head g's values at
  // columns g*dv of v's rows: MLA's latent cache passes its keys as v); query i sees keys
  // 0..L-n+i, head h reads kv head h / (H / G); o [n, H*dv]. fp32, kernels/cpu/ops.h.
  virtual Status attention_cached(const Tensor& q, const Tensor& k, const Tensor& v, int64_t H,
                                  int64_t G, int64_t dv, float scale, Tensor& o) = 0;
  // Attention as GEMMs (precision.attention=gemm): the causal softmax of kernels/cpu/ops.h over
  // s [R, T] (p may alias s; with recompute lse [R] is read, else written) and its backward
  // (ds may alias dp).
  virtual Status causal_softmax(const Tensor& s, Tensor& p, Tensor& lse, bool recompute) = 0;
  virtual Status softmax_bwd(const Tensor& p, const Tensor& dp, Tensor& ds) = 0;
  virtual Status swiglu_fwd(const Tensor& g, const Tensor& u, Tensor& h) = 0;
  virtual Status swiglu_bwd(const Tensor& dh, const Tensor& g, const Tensor& u, Tensor& dg,
                            Tensor& du) = 0;
  virtual Status cross_entropy_fwd(const Tensor& logits, const Tensor& targets, Tensor& loss) = 0;
  virtual Status cross_entropy_bwd(const Tensor& logits, const Tensor& targets, float row_scale,
                                   Tensor& dlogits) = 0;
  virtual Status router_topk(const Tensor& logits, const Tensor& bias, int64_t topk,
                             int64_t n_groups, int64_t max_groups, float route_scale,
                             Tensor& scores, Tensor& idx, Tensor& gates) = 0;
  // The MoE's dispatch on a rank without expert parallelism (kernels/cpu/ops.h): idx [n, K]'s
  // assignments stably sorted by expert into order, rows, slot (i32 [n*K]) and counts (i32 [E]).
  virtual Status sort_assignments(const Tensor& idx, int64_t E, Tensor& order, Tensor& rows,
                                  Tensor& slot, Tensor& counts) = 0;
  // The router's backward (kernels/cpu/moe_routing.h): dlogits [n, E] from router_topk's scores,
  // idx and gates, the gate gradients dgate (f64: by assignment [n*K], or by place with slot
  // given: token t's k-th is dgate[slot[t*K + k]]) and the balance counts f (f64 [B, E];
  // undefined when p.alpha == 0).
  virtual Status router_grad(const Tensor& scores, const Tensor& idx, const Tensor& gates,
                             const Tensor& dgate, const Tensor& slot, const Tensor& f,
                             const kernels::RouterGradParams& p, Tensor& dlogits) = 0;
  // The sequence-wise balance loss of B sequences of T tokens (kernels/cpu/moe_routing.h) from
  // router_topk's scores [B*T, E] and idx [B*T, K]: f (f64 [B, E]) its counts, loss (f64 [1])
  // += its value (a running sum over micro-batches stays on the device).
  virtual Status balance_stats(const Tensor& scores, const Tensor& idx, int64_t B, int64_t T,
                               float alpha, Tensor& f, Tensor& loss) = 0;
  virtual Status gather_rows(const Tensor& in, const Tensor& rows, Tensor& out) = 0;
  // out[i] = 0 + w[i] * in[rows[i]] (w f32 [len(rows)] or undefined: weight 1), a zero row where
  // rows[i] < 0. The bits of scatter_add_rows(in rows, i -> i, w) into zeros (0 + makes -0 +0),
  // as one gather: the MoE's zero-padded expert layouts and gate scaling, without a sort.
  virtual Status gather_rows_scaled(const Tensor& in, const Tensor& rows, const Tensor& w,
                                    Tensor& out) = 0;
  // out[rows[i]] += w[i] * in[i]; w may be an undefined Tensor (weight 1).
  virtual Status scatter_add_rows(const Tensor& in, const Tensor& rows, const Tensor& w,
                                  Tensor& out) = 0;
  // out = a + b elementwise: all fp32, or all fp64 (the gradient sums across ranks).
  virtual Status add(const Tensor& a, const Tensor& b, Tensor& out) = 0;
  virtual Status axpy(float alpha, const Tensor& x, Tensor& y) = 0;
  // axpy into several same-sized tensors at once (the experts' weight gradients): *ys[z] +=
  // alpha * rows z*n .. (z+1)*n of x, n = ys[z]->numel(); bit-identical to one axpy each.
  virtual Status axpy_batch(float alpha, const Tensor& x, std::span<Tensor* const> ys) = 0;
  virtual Status round_bf16(const Tensor& x, Tensor& out) = 0;  // emulates bf16 storage
  // out (f64 [rows]) = per-row dot product of a and b (f32, the same [rows, cols]), each product
  // and the sum in fp64: the CPU sums a row in column order; a device in a fixed tree.
  virtual Status row_dot(const Tensor& a, const Tensor& b, Tensor& out) = 0;

  // The optimizer on the backend (optim.placement=device; launch/trainer.cc). Gradients of one
  // step are summed in fp64, rounded once to fp32, then AdamW runs next to the weights.
  // acc (f64) += grad (f32), then grad = 0: one micro-batch's gradient into the step's sum.
  virtual Status accumulate_grad(Tensor& grad, Tensor& acc) = 0;
  virtual Status round_f64(const Tensor& acc, Tensor& out) = 0;  // out (f32) = fp32(acc)
  // *total += sum of g[i]^2 over every tensor of gs (fp32), in fp64. The CPU adds tensor after
  // tensor in index order (bitwise the host optimizer's norm); a device reduces in a fixed tree
  // (deterministic, not the same bits) and synchronizes once.
  virtual Status sum_squares(std::span<const Tensor* const> gs, double* total) = 0;
  // One fused AdamW step (kernels/cpu/adamw.h, bit-identical on every backend): p, g fp32; m, v
  // bf16 moments; all with the same element count.
  virtual Status adamw(Tensor& p, const Tensor& g, Tensor& m, Tensor& v,
                       const kernels::AdamWScalars& s) = 0;
  // adamw over runs of flat buffers in one call (optim::DeviceAdamW's step: ZeRO-1 shards, runs
  // of whole tensors): run r is adamw(p[r.begin, r.end), g[same], m[r.moment, r.moment + len),
  // v[same], s[r.weight_decay ? 1 : 0]); runs do not overlap. A device runs them in one launch;
  // this default, one adamw per run.
  virtual Status adamw_runs(Tensor& p, const Tensor& g, Tensor& m, Tensor& v,
                            std::span<const AdamWRun> runs, const kernels::AdamWScalars s[2]);

  // Copies a device tensor to host memory (a plain copy on the CPU backend).
  Result<Tensor> to_host(const Tensor& t);
};

// Row groups from their offsets ([G + 1], non-decreasing from 0, below 2^31), `dev` on be.
Result<RowGroups> make_row_groups(Backend& be, std::vector<int64_t> offsets);
// The per-group views of GroupedFp8 over codes and scales laid out as documented above
// (transposed: the quantize_transposed_groups layout); K is the activation's width.
GroupedFp8 group_views(Tensor codes, Tensor scales, const RowGroups& groups, int64_t K,
                       bool transposed, bool pow2);
// The per-tensor views of `count` stacked 128x128-quantized [rows, cols] tensors.
GroupedFp8 stacked_block_views(Tensor codes, Tensor scales, int64_t count, int64_t rows,
                               int64_t cols, bool pow2);

std::unique_ptr<Backend> make_cpu_backend();
// The CUDA backend for local device `device_index`; an error when not built with CUDA or no GPU.
Result<std::unique_ptr<Backend>> make_cuda_backend(int device_index);
// CUDA devices this process sees (0 without CUDA or without a device).
int cuda_device_count();

}  // namespace fp8pipe
