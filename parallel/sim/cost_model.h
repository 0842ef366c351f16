// Analytic costs of one pipeline chunk for one micro-batch (F, B input-grad, W, and the F&B pair),
// built from the model config, the cluster description and a few efficiencies, for the discrete-
// event simulator (simulator.h). Every constant names its source (DSV3_FACTS.md, DEVICE.md).
#pragma once

#include <string>
#include <vector>

#include "configs/fp8pipe.pb.h"
#include "core/status.h"
#include "parallel/schedule.h"

namespace fp8pipe::parallel::sim {

// Efficiencies (fraction of peak) and modelling knobs; `fp8pipe bench` can write them as JSON
// ({"fp8_gemm_eff": 0.6, ...}, keys = the field names). Defaults and their sources:
struct Calibration {
  // DEVICE.md ceilings, H100 (= H800 compute): 1x128 x 128x128 block-scaled FP8 GEMMs reach
  // 1111-1249 TFLOP/s of 1979 (~0.58); 1x128 x 1x128 (wgrad: both operands scaled along K)
  // 818-1010 (~0.45); BF16 674-784 of 989 (~0.74). DeepGEMM's best, 1550 (0.78), is a ceiling.
  double fp8_gemm_eff = 0.58;
  double fp8_wgrad_eff = 0.45;
  double bf16_gemm_eff = 0.74;
  // Attention core (BF16 FlashAttention-style, causal). Not measured here; assumption: half of
  // BF16 peak, between FlashAttention-3's published forward and backward rates on H100.
  double attn_eff = 0.5;
  // DEVICE.md: copy 3029 GB/s of 3350 peak; a 1x128 quantize kernel 2521 GB/s (~0.75).
  double hbm_eff = 0.75;
  // The cluster's nvlink_gbps / net_gbps_per_gpu are already the achievable rates (TR §3.2.2
  // 160 GB/s NVLink; ISCA ~40 GB/s IB per GPU; DeepEP EP64 measured 46-51 GB/s).
  double net_eff = 1.0, nvlink_eff = 1.0;
  // DualPipe F&B: part of the pair's all-to-all that no computation hides (the pair's first
  // dispatch and last combine). Assumption, not measured: 10% of the pair's all-to-all time.
  double fb_exposed_frac = 0.1;
  // Max/mean tokens per expert GPU; 1 = perfectly balanced (as profile-data simulates it).
  double imbalance = 1.0;
  // DeepEP send/receive buffers per GPU (assumption: ~2 GiB for normal kernels at 4K tokens).
  double comm_buffer_gib = 2.0;
  // Bytes per element: gradients reduce-scattered in FP32 (TR §3.3: FP32 weight gradients),
  // parameters all-gathered and held for compute in BF16 (assumption; FP8 copies are made per
  // step).
  double grad_comm_bytes = 4, param_bytes = 2;
  // Fraction of the DP gradient sync hidden under the pipeline's cool-down (0 = fully exposed).
  double dp_overlap = 0;
};

// Reads a calibration JSON object; unknown keys and non-numbers are errors.
Result<Calibration> load_calibration(const std::string& path);

// FLOPs and HBM bytes of one pass of one chunk for one micro-batch on one GPU.
struct Work {
  double fp8 = 0;        // FP8 GEMM FLOPs (fprop, dgrad)
  double fp8_wgrad = 0;  // FP8 wgrad GEMM FLOPs (1x128 x 1x128 scaling: slower)
  double bf16 = 0;       // BF16 GEMMs: output head, MoE router (TR §3.3 keeps them high precision)
  double attn = 0;       // attention core QK^T, PV (BF16)
  double hbm = 0;        // bytes of memory-bound work: quantize/transpose, norms, SwiGLU, permute
  double model = 0;      // FLOPs that count for MFU (recomputation excluded)
  Work& operator+=(const Work& o);
};

struct PassCost {
  Work work;
  double compute_s = 0;  // on the compute stream, SM share for communication deducted
  double a2a_s = 0;      // EP dispatch+combine of all MoE layers of the chunk (exposed unless FB)
  double ib_bytes = 0, nvlink_bytes = 0;  // EP traffic sent by this GPU
};

// One pipeline stage (a chunk of blocks, maybe embedding, head, MTP) for one micro-batch.
struct ChunkCost {
  int stage = 0, blocks = 0, moe_blocks = 0;
  bool embed = false, head = false;
  int mtp = 0;               // MTP modules on this stage (the last one)
  PassCost f, b, w;          // b = input gradient only (+ recompute); full backward = b + w
  double act_bytes = 0;      // activations held from F until W (or full B)
  double act_b_bytes = 0;    // the part of act_bytes a deferred-W B already frees (the head
                             // chunk's logits and norm inputs)
  double p2p_bytes = 0;      // activation (and gradient) message to the neighbour stage
  double params = 0;         // parameters held per GPU (routed experts / ep)
  double dense_params = 0;   // the part replicated over all dp (sharded by ZeRO-1 over dp)
  double expert_params = 0;  // routed experts: replicated over dp/ep
};

struct CostModel {
  Calibration cal;
  std::vector<ChunkCost> chunks;           // [stage], Schedule::stages() of them
  int64_t tokens_per_mb = 0;               // tokens of one micro-batch on one GPU
  double p2p_latency_s = 0, p2p_gbps = 0;  // pipeline neighbours: different nodes (IB)
  double peak_bf16 = 0, peak_fp8 = 0;      // FLOP/s per GPU
  double hbm_bytes_per_s = 0, net_bytes_per_s = 0;
  double sm_frac = 1;  // share of SMs left for computation
};

// Expected distinct ranks (units = ep) or EP nodes (units = ep / GPUs per node) one token's
// routed experts reach under uniform node-limited routing (model.moe's experts, topk, n_groups,
// max_nodes): what one token costs the all-to-all in rows.
double expected_units_hit(const config::Moe& moe, int64_t units);

// Overlapped pair (DualPipe F&B): max(compute of F + full B, their all-to-all) + the exposed part.
double fb_time(const CostModel& m, int f_stage, int b_stage);
// Time of one compute instruction (an F or B includes its exposed all-to-all).
double op_time(const CostModel& m, const Instr& in);

// Costs for every stage of `s` for this config (model, parallel, train, cluster sections).
Result<CostModel> build_cost_model(const config::Config& cfg, const Schedule& s,
                                   const Calibration& cal);

}  // namespace fp8pipe::parallel::sim
