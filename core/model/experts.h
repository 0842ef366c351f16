// The routed experts of one MoE layer held by this rank, run as one unit over the expert-sorted
// (and zero-padded) row buffer: group e of RowGroups is local expert e's rows. Each expert is a
// SwiGLU FFN (w1 gate, w3 up, w2 down; parameters <prefix>.experts.<e>.w{1,3,2}.weight), and the
// results are bit for bit those of running each expert's SwiGLU (layers.h) on its own rows.
//
// Why one unit: per expert, the SwiGLU chain is about 35 small operations (quantize, GEMM,
// rounding, the SwiGLU product, re-quantization) in the forward and backward, so 64 experts made
// ~2,200 launches per layer and micro-batch on a GPU. Here everything that is row-wise runs once
// over the whole buffer (rounding, the SwiGLU product, casts) or as one grouped FP8 op per tensor
// (Backend::quantize_groups and friends keep each expert's scales in its own cuBLASLt layout),
// weights are quantized in one batched call per kind and weight gradients added in one; only the
// GEMMs remain per expert.
#pragma once

#include <memory>

#include "core/model/linear.h"

namespace fp8pipe::model {

class RoutedExperts {
 public:
  // Local experts first .. first + count - 1 of a layer, dim -> hidden -> dim.
  Status init(ModelCtx& c, const std::string& prefix, int64_t first, int64_t count, int64_t dim,
              int64_t hidden, uint64_t seed, float std);
  // x [groups.total_rows(), dim], group e holding local expert e's rows -> y of the same shape.
  Result<Tensor> forward(ModelCtx& c, int mb, const Tensor& x, const RowGroups& groups);
  // FP8 only: the same from the input already quantized as quantize_groups would (the MoE's
  // Backend::gather_fp8_groups of its tokens quantized once), so no fp32 copy is made.
  Result<Tensor> forward(ModelCtx& c, int mb, GroupedFp8 xq, const RowGroups& groups);
  Result<Tensor> backward_input(ModelCtx& c, int mb, const Tensor& dy);  // -> dx like x
  // FP8 only: the backward of the weighted output w_r * y_r (the MoE's gates; 0 on padding
  // rows) from the unweighted gradient dy quantized per row (quantize_groups of dy, as the MoE
  // gathers it: Backend::gather_fp8_groups). w2's dgrad reads those codes, and each row's
  // weight multiplies its fp32 result before the bf16 rounding: dh = bf16(w_r * (dy_q . W2)).
  // dy_deq [rows, dim] fp32 is dequantize_groups(dy_q) (the caller's, for the gates' gradients);
  // w2's wgrad reads w_r * dy_deq_r.
  Result<Tensor> backward_input(ModelCtx& c, int mb, GroupedFp8 dyq, const Tensor& w,
                                const Tensor& dy_deq);
  // Weight gradients of every expert with rows; frees mb's saved state (also when no backward
  // input ran, as for a micro-batch that routed no rows here).
  Status backward_weight(ModelCtx& c, int mb);
  std::vector<Param*> params();  // per expert: w1, w3, w2
  int64_t count() const { return static_cast<int64_t>(w1_.size()); }
  size_t saved_microbatches() const { return saved_.size(); }

 private:
  // A GEMM operand made of an activation: FP8 the grouped 1x128 quantization, otherwise the
  // whole tensor (bf16 on the bf16 path, fp32 in FP32) sliced per group.
  struct Operand {
    GroupedFp8 q;
    Tensor t;
  };
  struct Saved {
    RowGroups groups;
    Operand x, h;       // the inputs of w1/w3 and of w2
    Tensor g, u;        // the SwiGLU product's inputs (bf16, or FP8 with fp8_swiglu_cache)
    Tensor dy, dg, du;  // the output gradients of w2, w1, w3 (bf16 tensors on the bf16 path)
  };
  Result<Operand> operand(ModelCtx& c, const Tensor& x, const RowGroups& groups);
  bool swiglu_cached(const ModelCtx& c) const;  // precision.fp8_swiglu_cache in FP8
  Result<Operand> grad_operand(ModelCtx& c, const Tensor& d, const RowGroups& groups, Tensor& keep);
  Result<Tensor> forward_from(ModelCtx& c, Saved& s, int64_t rows);  // s.x set
  bool xq_shape_bad(const GroupedFp8& q, int64_t rows) const;  // not [rows of count() groups, dim]
  // out [rows, n] = per group: a_g . W^T (forward) or a_g . W (dgrad, dgrad = true) with W the
  // group's expert of weight `kind` (0 w1, 1 w3, 2 w2), then the output rounding of Linear; out
  // is allocated here.
  // row_w (optional, f32 [rows]): each output row times its weight before the rounding.
  Result<Tensor> gemm(ModelCtx& c, const Operand& a, const RowGroups& groups, int kind, bool dgrad,
                      int64_t n, const Tensor& row_w = Tensor());
  // Several such products (same n) in one grouped call, so a backend can run every expert's GEMM
  // of every kind concurrently (w1 and w3 forward, their dgrads); one output each.
  struct Product {
    const Operand* a;
    int kind;
  };
  Result<std::vector<Tensor>> gemms(ModelCtx& c, std::span<const Product> ps,
                                    const RowGroups& groups, bool dgrad, int64_t n,
                                    const Tensor& row_w = Tensor());
  Result<Tensor> scale_rows(ModelCtx& c, const Tensor& x, const Tensor& w);  // w[r] * x[r]
  // From w2's input gradient dh: the SwiGLU product's backward and the w1/w3 dgrads -> dx.
  Result<Tensor> backward_from(ModelCtx& c, Saved& s, const Tensor& dh);
  std::vector<Linear>& weights(int kind) { return kind == 0 ? w1_ : kind == 1 ? w3_ : w2_; }
  // FP8: every expert's weights of each kind quantized 128x128 in one call per kind
  // (Backend::quantize_blocks_batch) and transposed in one (transpose_fp8_batch), per weight
  // version; the same bits as each Linear's own cache, in 6 calls instead of 6 per expert.
  Status refresh_fp8_weights(ModelCtx& c);
  // W.grad += dY^T X per group with rows, for each kind (x_t: FP8's 128x1 X^T), every kind's
  // products in one grouped call.
  struct Wgrad {
    const Tensor* dy;
    const Operand* x;
    const GroupedFp8* x_t;
    std::vector<Linear>* w;
  };
  Status weight_grads(ModelCtx& c, const RowGroups& groups, std::span<const Wgrad> kinds);

  std::vector<Linear> w1_, w3_, w2_;
  GroupedFp8 wq_[3], wq_t_[3];
  uint64_t wq_version_ = ~0ull;
  Tensor iota_;  // i32 0, 1, 2, ...: scale_rows' identity rows (grown on demand)
  int64_t dim_ = 0, hidden_ = 0;
  PerMicrobatch<Saved> saved_;
};

}  // namespace fp8pipe::model
