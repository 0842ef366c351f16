// Building blocks shared by every layer of the model: the precision mode, the per-call context,
// parameters (fp32 master value + fp32 gradient, named by global name), and the micro-batch
// keyed store of saved activations that lets F, B (dgrad) and W (wgrad) run at different times.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/model/expert_comm.h"

namespace fp8pipe::model {

// FP32: everything fp32. BF16: GEMM operands and outputs rounded to bf16 (fp32 accumulation), the
// twin baseline. FP8: the linear layers of attention and FFN/experts run FP8.md's recipe.
enum class Precision { kFP32, kBF16, kFP8 };
const char* precision_name(Precision p);

struct ModelCtx {
  Backend* be = nullptr;
  Precision precision = Precision::kFP32;
  GemmMode gemm = GemmMode::kFast;
  QuantParams qp;               // FP8 format and pow2 scales
  bool attention_gemm = false;  // the attention core as batched GEMMs (attention_core.h)
  bool attention_bf16 = false;  // ... with bf16 operands (tensor cores) and fp32 softmax
  // Each routed expert's batch of rows is padded with zero rows to a multiple of this (1: none).
  // cuBLASLt's FP8 GEMMs need a 1x128 operand's row count % 4 and K % 16 (FP8.md §3.3), and an
  // expert's token count is anything: 16 on a GPU in FP8. Zero rows add exact zeros, so the
  // results do not change (tests/model/moe_test.cc).
  int64_t expert_row_align = 1;
  uint64_t weight_version = 0;   // bumped by the optimizer: invalidates cached quantized weights
  int64_t nonfinite_groups = 0;  // FP8 groups with NaN/Inf amax seen since the last reset
  // Count them (nonfinite_groups) at every quantization: on a GPU that reads a device counter,
  // a synchronization per call. The trainer turns it off: a non-finite group also makes the loss
  // or the gradient norm non-finite, which every step checks.
  bool count_nonfinite = true;
  float loss_scale = 1.0f;  // d(objective)/d(micro-batch loss): set per backward
  // Expert parallelism: null keeps every routed expert on this rank. two_level: tokens cross
  // nodes once per node, then are forwarded inside the node (parallel.ep_dispatch).
  ExpertComm* ep = nullptr;
  bool ep_two_level = false;
  // With an ep group (precision.fp8_dispatch), in FP8: tokens, and in the backward their output
  // gradients, cross the all-to-all toward the experts as FP8 codes and 1x128 scales, quantized
  // once at their source; in BF16: tokens as bf16 rows. The same bits as fp32 rows either way.
  bool fp8_dispatch = false;
  // BF16 or FP8 with an ep group: the rows coming back from the experts (combine, the backward's
  // input gradient) and the backward's output gradient cross the all-to-all as bf16, rounded to
  // nearest even at each sender (precision.bf16_combine, as DeepSeek-V3 combines in BF16); a
  // relay sums what it receives in fp32 and rounds again. false: fp32 rows.
  bool bf16_combine = false;
  // train.recompute=mla_up_proj: MLA attention keeps only its projections' inputs and re-runs the
  // query and key/value up-projections in the backward (bitwise the same q, k, v).
  bool recompute_mla_up = false;
  // The forward serves inference (core/model/decode.h): the MoE drops no tokens (no capacity).
  bool inference = false;
  // train.recompute=rmsnorm: a block's two RMSNorm outputs are not held from F to B (the
  // attention's and FFN's Linears drop what they keep of them); the backward re-runs the norms
  // from their kept inputs and the Linears re-prepare them (bitwise the same).
  bool recompute_norm = false;
  // precision.fp8_swiglu_cache (FP8): the MoE's experts (routed and shared) hold g and u as FP8
  // 1x128 and recompute the SwiGLU output in the backward.
  bool fp8_swiglu_cache = false;
  // precision.bf16_norm_inputs (FP8, BF16): the blocks' RMSNorms read and hold their residual
  // input rounded to bf16.
  bool bf16_norm_inputs = false;
  // precision.attn_out_cache (FP8, BF16): how attention holds its output from the forward to
  // the backward, for the core's backward and W_o's weight gradient: bf16 values (2 bytes),
  // E5M6 1x128 codes with pow2 scales (1.5, DeepSeek-V3), or W_o's own FP8 input (1, FP8 only).
  enum class AttnOutCache { kBf16, kE5M6, kE4M3 };
  AttnOutCache attn_out_cache = AttnOutCache::kBf16;
  // Waits for an in-flight all-to-all. The executor's FB overlap sets it to hand the turn to the
  // other chunk of an FB pair (which runs up to its own next wait or its end) before waiting;
  // unset, it simply waits.
  std::function<Status(const ExpertComm::Done&)> await;
  Status wait(const ExpertComm::Done& d) const { return await ? await(d) : d(); }
};

struct Param {
  std::string name;  // global name, e.g. "layers.3.attn.wq_a.weight"
  Tensor value;      // fp32 master weight
  Tensor grad;       // fp32 gradient; the executor flushes it into grad_acc per instruction
  std::vector<double> grad_acc;  // host fp64 sum over micro-batches: order-independent in fp32
  // optim.placement=device: the same fp64 sum, kept on the backend (f64, value's shape) instead
  // of grad_acc; the executor accumulates into it when it is defined.
  Tensor grad_acc_dev;
  bool decay = true;    // AdamW weight decay applies (not to norms)
  bool expert = false;  // a routed expert's parameter (sharded over ep later)
  // Host fp32 copies for the host-side work of a step (the synced gradient rounded from grad_acc,
  // AdamW, the router-bias update, checkpoints). On the CPU backend they are `value` and `grad`
  // themselves (same storage, no copy); on a device host_value is the master, uploaded to `value`
  // after each update (the trainer's upload_params), unless the optimizer runs on the device
  // (optim.placement=device), where `value` is the master and host_value is refreshed for saves.
  Tensor host_value, host_grad;
};

// Allocates value (normal(0, std), or constant `fill` when std == 0), a zero grad and their host
// copies (host_value, host_grad: views of value and grad on the CPU backend). The random
// stream is a function of (seed, name) only, so a parameter gets the same values whichever rank
// or stage holds it: multi-rank runs start from the single-process model exactly.
Status init_param(Backend& be, Param& p, std::string name, Shape shape, uint64_t seed, float std,
                  float fill = 0.0f);

// The micro-batch key of inference (core/model/decode.h): no backward reads what a layer saves
// under it (or under key * kSlots + depth), so each call replaces the last one's.
constexpr int kInferenceMb = 1 << 26;

// Saved activations per micro-batch. `take` removes the entry (the last user frees it).
template <typename T>
class PerMicrobatch {
 public:
  T& put(int mb) {
    if (mb >= kInferenceMb) m_.erase(mb);  // inference keeps only its latest call's state
    return m_[mb];
  }
  Result<T*> get(int mb, const char* who) {
    auto it = m_.find(mb);
    if (it == m_.end()) {
      return FP8_ERROR(Code::kInternal, "{}: no saved activations for micro-batch {}", who, mb);
    }
    return &it->second;
  }
  void erase(int mb) { m_.erase(mb); }
  size_t size() const { return m_.size(); }

 private:
  std::map<int, T> m_;
};

// A new fp32 tensor [rows, cols] on the context's backend.
Result<Tensor> new_f32(ModelCtx& c, int64_t rows, int64_t cols);
Result<Tensor> new_zeros(ModelCtx& c, int64_t rows, int64_t cols);

// An activation kept for the backward whose values are bf16 (a GEMM output rounded to bf16, as
// every one is outside FP32 precision), held as a bf16 tensor: half the bytes, the same values
// (the cast rounds exactly representable values to themselves). FP32 precision holds x itself.
Result<Tensor> hold_bf16(ModelCtx& c, const Tensor& x);
// The fp32 values of a held activation: a widened copy of a bf16 tensor, the dequantized values
// of an FP8 (hold_fp8) or E5M6 one, else h itself.
Result<Tensor> held_f32(ModelCtx& c, const Tensor& h);
// An activation held as FP8 1x128 codes and scales (precision.fp8_swiglu_cache): 1 byte an
// element plus a scale per 128, at FP8's rounding (FP8.md §1.4).
Result<Tensor> hold_fp8(ModelCtx& c, const Tensor& x);

// Host values (int32, float or double, as `dt`) in a tensor of `shape` on the context's backend:
// the host tensor itself on the CPU backend, else a copy.
template <typename T>
Result<Tensor> upload(ModelCtx& c, const std::vector<T>& v, Shape shape, DType dt) {
  auto cpu = make_cpu_backend();
  FP8_ASSIGN_OR_RETURN(Tensor h, cpu->empty(shape, dt));
  std::copy(v.begin(), v.end(), h.template data_as<T>());
  if (c.be->device() == Device::kCpu) return h;
  FP8_ASSIGN_OR_RETURN(Tensor d, c.be->empty(shape, dt));
  FP8_RETURN_IF_ERROR(c.be->copy(h, d));
  return d;
}
inline Result<Tensor> upload_i32(ModelCtx& c, const std::vector<int32_t>& v) {
  return upload(c, v, {static_cast<int64_t>(v.size())}, DType::kI32);
}

}  // namespace fp8pipe::model
