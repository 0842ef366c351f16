// Linear layer y = x . W^T (W [out, in], no bias, as in DeepSeek-V3) in the three precisions, with
// the three GEMMs split so schedules can defer the weight gradient (DESIGN.md §4, FP8.md §1.4,
// §2.5):
//   forward         FP8: X 1x128 x W 128x128; X is cached in FP8 (1x128) for the backward.
//   backward_input  FP8: dY 1x128 x W^T (exact byte/scale transpose of W's 128x128 blocks).
//   backward_weight FP8: dY^T x X^T, both 128x1 (X re-quantized from its FP8 cache, DeepSeek).
// FP8 and BF16 round the GEMM output to bf16 (activations are bf16 in both); FP32 is plain fp32.
// `fp8` = false keeps a layer in BF16 under FP8 precision (router, head, as the recipe says).
#pragma once

#include "core/model/module.h"

namespace fp8pipe::model {

class Linear {
 public:
  Status init(ModelCtx& c, const std::string& name, int64_t in, int64_t out, uint64_t seed,
              float std, bool fp8 = true, bool expert = false);

  Result<Tensor> forward(ModelCtx& c, int mb, const Tensor& x);          // x [n, in] -> [n, out]
  Result<Tensor> backward_input(ModelCtx& c, int mb, const Tensor& dy);  // -> dx [n, in]
  Status backward_weight(ModelCtx& c, int mb);  // W.grad += dY^T X; frees mb's saved state

  // Layers reading the same input (SwiGLU's w1 and w3, same width and precision) share the work
  // on it: the forward GEMM operand made of x (FP8: its 1x128 quantization; the bf16 path: its
  // bf16 rounding; FP32: x), and the weight-gradient operand made of the saved input (FP8: the
  // 128x1 re-quantization, transposed). The results are those of forward / backward_weight.
  Result<Tensor> prepare_input(ModelCtx& c, const Tensor& x);
  Result<Tensor> forward_prepared(ModelCtx& c, int mb, const Tensor& x, const Tensor& prepared);
  Result<Tensor> weight_grad_input(ModelCtx& c, int mb);
  Status backward_weight(ModelCtx& c, int mb, const Tensor& x_operand);
  // Forward on an input whose gradient is never needed (no state kept).
  Result<Tensor> apply(ModelCtx& c, const Tensor& x);
  // The forward output of micro-batch mb again, from the input kept for its weight gradient
  // (activation recomputation): bitwise the forward's result while the weights are unchanged.
  Result<Tensor> recompute(ModelCtx& c, int mb);
  // Releases the input kept for micro-batch mb's weight gradient, for a caller that rebuilds it
  // in its backward instead of holding it (the FP8 SwiGLU cache); restore_input keeps from x
  // what forward keeps (FP8: its 1x128 quantization), before backward_weight needs it.
  Status drop_input(int mb);
  Status restore_input(ModelCtx& c, int mb, const Tensor& x);
  // restore_input with the operand prepare_input made (shared by layers reading the same x).
  Status restore_prepared(int mb, const Tensor& prepared);
  // FP8: the weight gradient's X operand made from x (fp32) directly, 128x1 quantized and
  // written transposed, in place of the 1x128 input's re-quantization (the attention output's
  // E5M6 cache: one rounding from the cached values, DeepSeek-V3 §3.3.3).
  Status restore_wgrad_operand(ModelCtx& c, int mb, const Tensor& x);
  // FP8: the 1x128 input kept for micro-batch mb (undefined if dropped).
  Result<Tensor> held_fp8_input(int mb);

  // The weight operand of this layer's GEMMs for the current weight version: FP8 W (128x128), or
  // its exact transpose for the input gradient (dgrad); the bf16 path's bf16 W; FP32 W itself.
  // Layers that run this weight's GEMMs themselves (RoutedExperts) take it from here.
  Result<Tensor> weight_operand(ModelCtx& c, bool dgrad);
  // The fp32 values [out, in] of the weight the forward GEMM reads (FP8: the dequantized 128x128
  // blocks; the bf16 path: the bf16 rounding; FP32: the master), for a caller computing with W's
  // slices itself (MLA's absorbed decoding).
  Result<Tensor> forward_weight_f32(ModelCtx& c);
  // The fp32 values of the input operand the forward GEMM reads for x (FP8: x's 1x128
  // quantization dequantized; the bf16 path: x rounded to bf16; FP32: x).
  Result<Tensor> input_values_f32(ModelCtx& c, const Tensor& x);

  Param& weight() { return w_; }
  int64_t in() const { return in_; }
  int64_t out() const { return out_; }
  size_t saved_microbatches() const { return saved_.size(); }

 private:
  bool use_fp8(const ModelCtx& c) const { return fp8_ && c.precision == Precision::kFP8; }
  // BF16 GEMMs: BF16 precision, and the non-FP8 layers (head) under FP8 precision.
  bool bf16_path(const ModelCtx& c) const { return !use_fp8(c) && c.precision != Precision::kFP32; }
  Status refresh_weight_cache(ModelCtx& c);
  Result<Tensor> gemm_out(ModelCtx& c, const Tensor& a, const Tensor& b, bool trans_b);
  struct Saved;
  Result<Tensor> output(ModelCtx& c, const Saved& s);  // the forward GEMM of s's input

  struct Saved {
    Tensor x;              // input: fp32 (FP32 mode) or a bf16 tensor (the bf16 path)
    Tensor xq;             // FP8 1x128 input, FP8 mode
    Tensor xt;             // FP8: a ready weight-gradient operand (restore_wgrad_operand)
    Tensor dy;             // output gradient, kept from backward_input to backward_weight
    uint64_t version = 0;  // ModelCtx::weight_version of the forward (recompute checks it)
  };
  Param w_;
  int64_t in_ = 0, out_ = 0;
  bool fp8_ = true;
  PerMicrobatch<Saved> saved_;
  // Quantized (FP8) or rounded (BF16) weight, rebuilt when ModelCtx::weight_version changes.
  Tensor wq_, wq_t_, wb_;
  uint64_t cached_version_ = ~0ull;
};

}  // namespace fp8pipe::model
