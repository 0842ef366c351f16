// Per-chunk costs for the simulator: a block is a list of GEMMs (FP8 or BF16) plus the attention
// core, memory-bound passes and EP all-to-all; F, B (input grad) and W each take their share.
// Sources of constants are in cost_model.h and inline (DSV3_FACTS.md sections, DEVICE.md).
#include "parallel/sim/cost_model.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "core/config.h"
#include "core/json.h"
#include "parallel/executor.h"

namespace fp8pipe::parallel::sim {
namespace {

// One GEMM per token: rows (token copies, e.g. topk for routed experts) x K -> N.
struct Gemm {
  double rows, k, n;
  bool fp8;
  bool recompute = false;  // forward recomputed in the backward (TR §3.2.3: MLA up-projections)
};

struct BlockShape {
  std::vector<Gemm> gemms;
  double attn_fwd = 0;     // attention core FLOPs per token, forward
  double elementwise = 0;  // forward bytes per token of norms, residuals, SwiGLU, permute
  double act = 0;          // bytes per token held for the backward
  double bw_hbm = 0;       // extra backward bytes per token (re-quantized recomputed inputs)
  double dense_params = 0, expert_params = 0;  // per GPU
  bool moe = false;
};

// What a block holds from F to B, from the config's memory options.
struct Holds {
  bool recompute = false;       // train.recompute has mla_up_proj (q, k, v rebuilt in the backward)
  bool swiglu_cache = false;    // precision.fp8_swiglu_cache in FP8 (experts hold g, u in FP8)
  bool recompute_norm = false;  // train.recompute has rmsnorm
  bool bf16_norm_inputs = false;  // precision.bf16_norm_inputs (the block norms hold bf16 inputs)
  double attn_out_bytes = 2;      // precision.attn_out_cache: bf16 2, e5m6 1.5, e4m3 1 (FP8)
};

void add_attention(const config::Model& m, int64_t seq, const Holds& h, BlockShape& b) {
  const bool recompute = h.recompute;
  const double d = m.hidden(), H = m.heads();
  double dqk = 0, dv = 0;
  if (m.attention() == config::Model::MLA) {
    const auto& a = m.mla();
    dqk = a.qk_nope_head_dim() + a.qk_rope_head_dim();
    dv = a.v_head_dim();
    const double ql = a.q_lora_rank(), kl = a.kv_lora_rank();
    if (ql > 0) {
      b.gemms.push_back({1, d, ql, true});
      b.gemms.push_back({1, ql, H * dqk, true, recompute});
    } else {
      b.gemms.push_back({1, d, H * dqk, true, recompute});
    }
    b.gemms.push_back({1, d, kl + a.qk_rope_head_dim(), true});
    b.gemms.push_back({1, kl, H * (a.qk_nope_head_dim() + dv), true, recompute});
    // Held (TR §3.2.3, §3.3.3): normed input FP8 (d), latents BF16 (q_lora + kv_lora + rope)
    // and the up-projections' FP8 copies of the normed latents (q_lora + kv_lora; dropped under
    // recompute_norm, block_shape), the attention output once for the core's backward and wo
    // (precision.attn_out_cache; as for every FP8 hold here, the scales' 4 bytes per 128 are
    // not counted); q/k/v recomputed from the latents, else held in BF16 (the framework's
    // layout: the RoPE key repeated per head).
    b.act += d + 2 * (ql + kl + a.qk_rope_head_dim()) + (ql + kl) + h.attn_out_bytes * H * dv;
    if (!recompute) b.act += 2 * (2 * H * dqk + H * dv);
  } else {
    dqk = dv = m.head_dim();
    for (int i = 0; i < 3; ++i) b.gemms.push_back({1, d, H * dqk, true});
    b.act += d + 2 * 3 * H * dqk + h.attn_out_bytes * H * dv;  // FP8 input, BF16 q/k/v, output
  }
  b.gemms.push_back({1, H * dv, d, true});
  b.attn_fwd = 2 * (seq / 2.0) * H * (dqk + dv);  // causal: T/2 keys per query (launch/flops.h)
  // The two RMSNorms' inputs (the block input and x + attention): the fp32 residual stream,
  // 2 x 4 bytes, or 2 x 2 with precision.bf16_norm_inputs; and the softmax statistics.
  b.act += (h.bf16_norm_inputs ? 4 : 8) * d + 4 * H;
  b.elementwise += 2 * 4 * d + 6 * d;  // 2 RMSNorms (read+write BF16), residual add
}

// swiglu_cache: precision.fp8_swiglu_cache (the experts hold g, u in FP8 and recompute h).
void add_ffn(const config::Model& m, bool moe, double imbalance, int ep, bool swiglu_cache,
             BlockShape& b) {
  const double d = m.hidden();
  b.moe = moe;
  b.elementwise += 4 * d + 6 * d;  // FFN RMSNorm, residual add
  if (!moe) {
    const double f = m.ffn_hidden();
    b.gemms.push_back({1, d, 2 * f, true});
    b.gemms.push_back({1, f, d, true});
    b.elementwise += 6 * f;  // SwiGLU: read 2f, write f (BF16)
    b.act += d + 2 * f;      // FP8 input; SwiGLU input cached in FP8 (TR §3.2.3)
    return;
  }
  const auto& e = m.moe();
  const double h = e.expert_hidden(), k = e.topk(), s = e.shared_experts();
  const double rows = k * imbalance + s;  // the hot GPU computes imbalance x the mean load
  b.gemms.push_back({1, d, double(e.routed_experts()), false});  // router (BF16/FP32, TR §3.3)
  b.gemms.push_back({rows, d, 2 * h, true});
  b.gemms.push_back({rows, h, d, true});
  // SwiGLU per expert copy; permute into expert order and the weighted combine (BF16 k x d).
  b.elementwise += 6 * h * rows + 2 * 2 * d * k * imbalance;
  // Held: FP8 input, the received FP8 token copies, SwiGLU inputs in FP8 (output recomputed);
  // without the cache bf16 g, u and the FP8 output (4 + 1 bytes).
  b.act += d + d * k * imbalance + (swiglu_cache ? 2 : 5) * h * rows;
  b.expert_params = double(e.routed_experts()) / ep * 3 * d * h;
  b.dense_params += s * 3 * d * h + d * e.routed_experts();
}

// recompute_norm: train.recompute has rmsnorm (TR §3.2.3): the two normed inputs (the attention's
// and the FFN's FP8 copies, d bytes each) and MLA's two normed latents (wq_b's and wkv_b's FP8
// copies) are not held; B re-runs the norms (its elementwise term already counts recomputed
// norms) and re-quantizes them (read BF16, write FP8).
BlockShape block_shape(const config::Model& m, bool moe, int64_t seq, const Calibration& c, int ep,
                       const Holds& h) {
  BlockShape b;
  add_attention(m, seq, h, b);
  add_ffn(m, moe, c.imbalance, ep, h.swiglu_cache, b);
  if (h.recompute_norm) {  // the block's two norms, and MLA's two latent norms
    const double lat = m.attention() == config::Model::MLA
                           ? double(m.mla().q_lora_rank()) + m.mla().kv_lora_rank()
                           : 0.0;
    b.act -= 2.0 * m.hidden() + lat;
    b.bw_hbm += 3 * (2.0 * m.hidden() + lat);
  }
  for (const Gemm& g : b.gemms) {
    if (!(moe && g.rows != 1)) b.dense_params += g.k * g.n;  // routed experts counted above
  }
  b.dense_params -= moe ? m.hidden() * double(m.moe().routed_experts()) : 0;  // router: above
  return b;
}

// F, B (input grad + recompute) and W work of one block for `t` tokens.
void block_work(const BlockShape& b, double t, Work& f, Work& bw, Work& w) {
  for (const Gemm& g : b.gemms) {
    const double fl = 2 * t * g.rows * g.k * g.n;
    (g.fp8 ? f.fp8 : f.bf16) += fl;
    (g.fp8 ? bw.fp8 : bw.bf16) += fl * (g.recompute ? 2 : 1);
    (g.fp8 ? w.fp8_wgrad : w.bf16) += fl;
    f.model += fl, bw.model += fl, w.model += fl;
    if (!g.fp8) continue;
    // FP8 quantization (DSV3_FACTS "FP8"): fprop quantizes its input (read BF16, write FP8:
    // 3 B/elem), dgrad its output gradient, wgrad both again along the other axis (128x1 tiles).
    f.hbm += 3 * t * g.rows * g.k;
    bw.hbm += 3 * t * g.rows * g.n + (g.recompute ? 3 * t * g.rows * g.k : 0);
    w.hbm += 3 * t * g.rows * (g.k + g.n);
  }
  f.attn += t * b.attn_fwd;
  bw.attn += 2 * t * b.attn_fwd;  // backward of QK^T and PV: twice the forward (launch/flops.h)
  f.model += t * b.attn_fwd, bw.model += 2 * t * b.attn_fwd;
  f.hbm += t * b.elementwise;
  bw.hbm += 3 * t * b.elementwise;  // gradient passes (2x) + recomputed norms/SwiGLU (1x)
  bw.hbm += t * b.bw_hbm;
}

}  // namespace

Work& Work::operator+=(const Work& o) {
  fp8 += o.fp8, fp8_wgrad += o.fp8_wgrad, bf16 += o.bf16, attn += o.attn, hbm += o.hbm;
  model += o.model;
  return *this;
}

Result<Calibration> load_calibration(const std::string& path) {
  std::ifstream in(path);
  if (!in) return FP8_INVALID("calibration file '{}' cannot be read", path);
  std::stringstream ss;
  ss << in.rdbuf();
  FP8_ASSIGN_OR_RETURN(json::Value v, json::parse(ss.str(), path));
  if (!v.is_object()) return FP8_INVALID("calibration '{}': expected a JSON object", path);
  Calibration c;
  const std::pair<const char*, double*> fields[] = {{"fp8_gemm_eff", &c.fp8_gemm_eff},
                                                    {"fp8_wgrad_eff", &c.fp8_wgrad_eff},
                                                    {"bf16_gemm_eff", &c.bf16_gemm_eff},
                                                    {"attn_eff", &c.attn_eff},
                                                    {"hbm_eff", &c.hbm_eff},
                                                    {"net_eff", &c.net_eff},
                                                    {"nvlink_eff", &c.nvlink_eff},
                                                    {"fb_exposed_frac", &c.fb_exposed_frac},
                                                    {"imbalance", &c.imbalance},
                                                    {"comm_buffer_gib", &c.comm_buffer_gib},
                                                    {"grad_comm_bytes", &c.grad_comm_bytes},
                                                    {"param_bytes", &c.param_bytes},
                                                    {"dp_overlap", &c.dp_overlap}};
  for (const auto& [key, val] : v.members()) {
    auto it = std::find_if(std::begin(fields), std::end(fields),
                           [&](const auto& f) { return key == f.first; });
    if (it == std::end(fields)) {
      return FP8_INVALID(
          "calibration '{}': unknown key '{}' (valid: fp8_gemm_eff, "
          "fp8_wgrad_eff, bf16_gemm_eff, attn_eff, hbm_eff, net_eff, nvlink_eff, "
          "fb_exposed_frac, imbalance, comm_buffer_gib, grad_comm_bytes, "
          "param_bytes, dp_overlap)",
          path, key);
    }
    if (!val.is_number() || (val.as_double() <= 0 && key != "dp_overlap")) {
      return FP8_INVALID("calibration '{}': '{}' must be a positive number", path, key);
    }
    *it->second = val.as_double();
  }
  return c;
}

// Expected distinct units (`units` equal, contiguous shares of the experts: ep ranks or EP
// nodes) that one token's top-k reaches under uniform node-limited routing: max_nodes of the
// n_groups groups chosen at random, then k distinct experts at random among theirs (DeepSeek-V3's
// device-limited top-k). A unit inside a group (units a multiple of n_groups) is hit unless all k
// experts miss its share; a unit spanning several groups takes a hypergeometric number of chosen
// groups first. Unaligned shapes use routing without the node limit.
double expected_units_hit(const config::Moe& moe, int64_t units) {
  const int64_t E = moe.routed_experts(), k = moe.topk();
  int64_t G = std::max(1, moe.n_groups());
  int64_t M = moe.max_nodes() > 0 ? std::min<int64_t>(moe.max_nodes(), G) : G;
  units = std::max<int64_t>(1, units);
  if (E % G != 0 || E % units != 0 || (units >= G ? units % G : G % units) != 0) G = M = 1;
  // P(k distinct draws from n items all avoid a given `a` of them) = C(n - a, k) / C(n, k)
  auto miss = [k](double n, double a) {
    double p = 1;
    for (int64_t i = 0; i < k; ++i) p *= std::max(0.0, (n - a - i) / (n - i));
    return p;
  };
  const double pool = double(M) * E / G;  // experts of the chosen groups
  if (units >= G) return double(units) * M / G * (1 - miss(pool, double(E) / units));
  const int64_t span = G / units;  // groups per unit; chosen ones ~ Hypergeometric(G, span, M)
  auto choose = [](int64_t n, int64_t r) {
    double c = 1;
    for (int64_t i = 0; i < r; ++i) c = c * double(n - i) / double(i + 1);
    return r < 0 || r > n ? 0.0 : c;
  };
  double hit = 0;
  for (int64_t c = 0; c <= std::min(span, M); ++c) {
    const double p = choose(span, c) * choose(G - span, M - c) / choose(G, M);
    hit += p * (1 - miss(pool, double(c) * E / G));
  }
  return double(units) * hit;
}

namespace {

// EP traffic of one MoE layer, one direction (dispatch or combine), bytes sent by one GPU; a row
// goes once to each rank (flat) or node (two-level's IB hop) its experts reach, as core/model/
// moe.cc and DeepEP send. Flat: the ranks reached, those on other nodes over IB and the rest of
// the node's over NVLink. Two-level (TR §3.2.2): one IB copy per remote node reached, then
// NVLink forwarding to every rank reached that is not its node's receiving rank.
void a2a_bytes(const config::Config& cfg, double tokens, double elem_bytes, const Calibration& c,
               double& ib, double& nvl) {
  const auto& m = cfg.model();
  const int P = std::max(1, cfg.parallel().ep());
  const int g = std::min(P, cfg.cluster().gpus_per_node());
  const int n = std::max(1, P / std::max(1, g));  // EP nodes
  const double row = m.hidden() * elem_bytes * tokens * c.imbalance;
  const double ranks = expected_units_hit(m.moe(), P);
  if (cfg.parallel().ep_dispatch() == "two_level") {
    ib = row * expected_units_hit(m.moe(), n) * (n - 1) / n;
    nvl = row * ranks * (P - n) / P;
  } else {
    ib = row * ranks * (P - g) / P;
    nvl = row * ranks * (g - 1) / P;
  }
}

// All-to-all of one MoE layer in one pass, in the wire formats of core/model/moe.cc: toward the
// experts (forward tokens, backward output gradient) FP8 with precision.fp8_dispatch, 1 B/elem +
// one fp32 scale per 128 (TR §3.3.3, 1x128 tiles); back from them (combine, the input gradient)
// bf16 with precision.bf16_combine, as DeepSeek-V3 (TR §3.3.3); otherwise fp32, but for BF16's
// forward dispatch with fp8_dispatch (bf16, the experts' operand format) and a backward output
// gradient that is not FP8, which travels like the combine. IB and NVLink overlap fully.
double moe_a2a(const config::Config& cfg, const CostModel& cm, double tokens, bool backward,
               double& ib, double& nvl) {
  const auto& cl = cfg.cluster();
  const auto mode = cfg.precision().mode();
  const bool fp8 = mode == config::Precision::FP8 && cfg.precision().fp8_dispatch();
  const double back = mode != config::Precision::FP32 && cfg.precision().bf16_combine() ? 2 : 4;
  const bool bf16 = mode == config::Precision::BF16 && cfg.precision().fp8_dispatch();
  const double to = fp8 ? 1 + 4.0 / 128 : backward ? back : bf16 ? 2 : 4;
  double t = 0;
  for (double eb : {to, back}) {
    double i = 0, v = 0;
    a2a_bytes(cfg, tokens, eb, cm.cal, i, v);
    ib += i, nvl += v;
    const double lat = (i > 0 ? cl.net_latency_us() : cl.nvlink_latency_us()) * 1e-6;
    t += std::max(i / (cm.net_bytes_per_s * cm.cal.net_eff),
                  v / (cl.nvlink_gbps() * 1e9 * cm.cal.nvlink_eff)) +
         lat;
  }
  return t;
}

double compute_time(const CostModel& m, const Work& w) {
  const Calibration& c = m.cal;
  const double s = m.sm_frac;
  return w.fp8 / (m.peak_fp8 * c.fp8_gemm_eff * s) +
         w.fp8_wgrad / (m.peak_fp8 * c.fp8_wgrad_eff * s) +
         w.bf16 / (m.peak_bf16 * c.bf16_gemm_eff * s) + w.attn / (m.peak_bf16 * c.attn_eff * s) +
         w.hbm / (m.hbm_bytes_per_s * c.hbm_eff);
}

// Embedding, output head (+ its cross-entropy) and MTP modules of a stage.
void add_ends(const config::Config& cfg, const BlockShape& moe_block, const model::ModelPart& p,
              double t, ChunkCost& c) {
  const auto& m = cfg.model();
  const double d = m.hidden(), V = m.vocab_size();
  const double heads = (p.head ? 1 + m.mtp_depth() : 0);
  // train.recompute=rmsnorm: the final and MTP norms re-run in B too (session 13), so the head's
  // and eh_proj's inputs are not held; B re-prepares them (as block_shape: read the norm input as
  // BF16, write the operand: 2 + 1 bytes an element for eh_proj's FP8, 2 + 2 for the head's BF16)
  const bool re_norm = recomputes(cfg.train(), "rmsnorm");
  // The final norm's and each MTP module's three norms' fp32 inputs (h; e, h^{k-1} and the MTP
  // block's output), held from F to B whatever is recomputed, and freed by B (the norms'
  // backward) also when W is deferred (counted since session 13).
  if (p.head) {
    const double norm_inputs = t * 4 * d * (1 + 3 * m.mtp_depth());
    c.act_bytes += norm_inputs;
    c.act_b_bytes += norm_inputs;
  }
  if (p.embed) c.f.work.hbm += t * 4 * d, c.b.work.hbm += t * 8 * d, c.dense_params += V * d;
  if (p.head) c.dense_params += V * d + (m.mtp_depth() > 0 && !p.embed ? V * d : 0);
  for (int i = 0; p.head && i < m.mtp_depth(); ++i) {  // eh_proj (2d -> d) + one block
    Work f, b, w;
    BlockShape mtp = moe_block;
    mtp.gemms.push_back({1, 2 * d, d, true});
    mtp.dense_params += 2 * d * d;
    block_work(mtp, t, f, b, w);
    c.f.work += f, c.b.work += b, c.w.work += w;
    c.dense_params += mtp.dense_params, c.expert_params += mtp.expert_params;
    c.act_bytes += t * (mtp.act + (re_norm ? 0 : 2 * d));
    c.b.work.hbm += re_norm ? t * 3 * 2 * d : 0;
  }
  const double fl = 2 * t * d * V * heads;  // BF16 head (TR §3.3)
  c.f.work.bf16 += fl, c.b.work.bf16 += fl, c.w.work.bf16 += fl;
  c.f.work.model += fl, c.b.work.model += fl, c.w.work.model += fl;
  c.f.work.hbm += t * heads * 3 * 4 * V;  // fp32 logits: write, softmax read+write
  // held per head: its BF16 input (for W; not with re_norm) and, since session 13, its logits as
  // bf16 (the framework's hold_bf16 of the bf16-rounded head output), which B frees after the
  // softmax
  c.act_bytes += t * heads * 2 * ((re_norm ? 0 : d) + V);
  c.act_b_bytes += t * heads * 2 * V;
  c.b.work.hbm += re_norm ? t * heads * 4 * d : 0;
}

}  // namespace

double fb_time(const CostModel& m, int f_stage, int b_stage) {
  const ChunkCost &f = m.chunks[f_stage], &b = m.chunks[b_stage];
  const double compute = f.f.compute_s + b.b.compute_s + b.w.compute_s;
  const double comm = f.f.a2a_s + b.b.a2a_s;
  return std::max(compute, comm) + m.cal.fb_exposed_frac * comm;
}

double op_time(const CostModel& m, const Instr& in) {
  switch (in.op) {
    case Op::kF:
      return m.chunks[in.stage].f.compute_s + m.chunks[in.stage].f.a2a_s;
    case Op::kB: {
      const ChunkCost& c = m.chunks[in.stage];
      return c.b.compute_s + c.b.a2a_s + (in.defer_w ? 0 : c.w.compute_s);
    }
    case Op::kW:
      return m.chunks[in.stage].w.compute_s;
    case Op::kFB:
      return fb_time(m, in.stage, in.stage_b);
    default:
      return 0;
  }
}

namespace {

Status check_cluster(const config::Config& cfg) {
  const auto& cl = cfg.cluster();
  if (cl.peak_fp8_tflops() <= 0 || cl.peak_bf16_tflops() <= 0 || cl.hbm_gbps() <= 0 ||
      cl.net_gbps_per_gpu() <= 0 || cl.nvlink_gbps() <= 0 || cl.total_sms() <= 0) {
    return FP8_INVALID(
        "simulate: the cluster section needs peak_fp8_tflops, peak_bf16_tflops, hbm_gbps, "
        "nvlink_gbps, net_gbps_per_gpu and total_sms > 0 (see configs/dsv3-671b-2048.textproto)");
  }
  const auto& p = cfg.parallel();
  const int64_t seqs = cfg.train().global_batch();
  if (seqs % (int64_t(p.dp()) * p.microbatches()) != 0) {
    return FP8_INVALID(
        "simulate: train.global_batch={} is not a multiple of parallel.dp={} x "
        "parallel.microbatches={}",
        seqs, p.dp(), p.microbatches());
  }
  return Status::Ok();
}

CostModel cluster_rates(const config::Config& cfg, const Calibration& cal) {
  const auto& cl = cfg.cluster();
  CostModel cm;
  cm.cal = cal;
  cm.peak_fp8 = cl.peak_fp8_tflops() * 1e12;
  cm.peak_bf16 = cl.peak_bf16_tflops() * 1e12;
  cm.hbm_bytes_per_s = cl.hbm_gbps() * 1e9;
  cm.net_bytes_per_s = cl.net_gbps_per_gpu() * 1e9;
  // Pipeline neighbours sit on different nodes (a stage spans dp GPUs = whole nodes): IB.
  cm.p2p_gbps = cl.net_gbps_per_gpu() * cal.net_eff;
  cm.p2p_latency_s = cl.net_latency_us() * 1e-6;
  // TR §3.2.2 / profile-data: 20 of 132 SMs run DeepEP; GEMMs launch on the other 112.
  const bool ep_comm = cfg.parallel().ep() > 1 && cfg.model().moe().routed_experts() > 0;
  if (ep_comm) cm.sm_frac = 1 - double(cl.comm_sms()) / cl.total_sms();
  return cm;
}

}  // namespace

Result<CostModel> build_cost_model(const config::Config& cfg, const Schedule& s,
                                   const Calibration& cal) {
  FP8_RETURN_IF_ERROR(check_cluster(cfg));
  const auto& m = cfg.model();
  FP8_ASSIGN_OR_RETURN(auto parts, partition_stages(m, s.stages()));
  CostModel cm = cluster_rates(cfg, cal);
  const int64_t seq = cfg.train().seq_len();
  const int64_t seqs = cfg.train().global_batch() / (int64_t(cfg.parallel().dp()) * s.microbatches);
  cm.tokens_per_mb = seqs * seq;
  const double t = double(cm.tokens_per_mb);
  const bool has_moe = m.moe().routed_experts() > 0;
  const int dense = has_moe ? m.dense_layers() : m.layers();
  const int ep = std::max(1, cfg.parallel().ep());
  const config::Precision& pr = cfg.precision();
  Holds holds;
  holds.recompute = recomputes(cfg.train(), "mla_up_proj");
  holds.swiglu_cache = pr.fp8_swiglu_cache() && pr.mode() == config::Precision::FP8;
  holds.recompute_norm = recomputes(cfg.train(), "rmsnorm");
  holds.bf16_norm_inputs = pr.bf16_norm_inputs() && pr.mode() != config::Precision::FP32;
  const std::string_view cache = fp8pipe::attn_out_cache(pr);
  if (cache == "e5m6") holds.attn_out_bytes = 1.5;
  if (cache == "e4m3") holds.attn_out_bytes = 1;
  const BlockShape dense_b = block_shape(m, false, seq, cal, ep, holds);
  const BlockShape moe_b = block_shape(m, has_moe, seq, cal, ep, holds);
  for (int st = 0; st < s.stages(); ++st) {
    const model::ModelPart& p = parts[st];
    ChunkCost c;
    c.stage = st, c.embed = p.embed, c.head = p.head, c.mtp = p.head ? m.mtp_depth() : 0;
    for (int i = p.block_begin; i < p.block_end; ++i) {
      const BlockShape& b = i < dense ? dense_b : moe_b;
      block_work(b, t, c.f.work, c.b.work, c.w.work);
      c.act_bytes += t * b.act;
      c.dense_params += b.dense_params, c.expert_params += b.expert_params;
      c.blocks++, c.moe_blocks += b.moe ? 1 : 0;
    }
    add_ends(cfg, moe_b, p, t, c);
    if (c.mtp > 0 && has_moe) c.moe_blocks += c.mtp;
    c.params = c.dense_params + c.expert_params;
    c.p2p_bytes = t * m.hidden() * 2;  // BF16 hidden state (or its gradient) per token
    for (int i = 0; ep > 1 && has_moe && i < c.moe_blocks; ++i) {
      c.f.a2a_s += moe_a2a(cfg, cm, t, false, c.f.ib_bytes, c.f.nvlink_bytes);
      c.b.a2a_s += moe_a2a(cfg, cm, t, true, c.b.ib_bytes, c.b.nvlink_bytes);
    }
    for (PassCost* pc : {&c.f, &c.b, &c.w}) pc->compute_s = compute_time(cm, pc->work);
    cm.chunks.push_back(c);
  }
  return cm;
}

}  // namespace fp8pipe::parallel::sim
