// Attention of a block: DeepSeek-V3 MLA (low-rank Q and KV with RMSNormed latents, a decoupled RoPE
// key shared by all heads) or plain MHA. Projections are Linears (FP8 under FP8 precision); the
// norms, RoPE and the causal attention core stay fp32 (FP8.md §1.1).
#include "core/model/attention.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <numeric>
#include <tuple>
#include <vector>

#include "core/model/attention_core.h"

namespace fp8pipe::model {
namespace {

// ---- head-layout packing ----
// Backend row ops on the tensors viewed as rows of g floats (g divides every part width), on every
// backend: exact row gathers for split / merge / broadcast, and a scatter-add in row order for
// sum_heads (per token, heads summed in head order in fp32), with the row lists built on the host
// once per shape and kept on the backend (RowCache, one per attention layer: every micro-batch of
// a step has the same shapes).

// Device row lists by (what, n, H, a, b).
struct RowCache {
  std::map<std::tuple<int, int64_t, int64_t, int64_t, int64_t>, Tensor> lists;
};
enum RowListKind { kSplitA, kSplitB, kMerge, kBroadcast, kSum, kPositions };

// The i32 row list `key` on the context's backend: from the cache, or built by `build` on the
// host and copied there.
Result<Tensor> row_list(ModelCtx& c, RowCache* cache,
                        std::tuple<int, int64_t, int64_t, int64_t, int64_t> key,
                        const std::function<std::vector<int32_t>()>& build) {
  if (cache) {
    if (auto it = cache->lists.find(key); it != cache->lists.end()) return it->second;
  }
  FP8_ASSIGN_OR_RETURN(Tensor d, upload_i32(c, build()));
  if (cache) cache->lists.emplace(key, d);
  return d;
}

// out (any shape, numel = len(rows) * g) = rows `idx` of src viewed as [numel / g, g].
Status gather_pieces(ModelCtx& c, const Tensor& src, int64_t g, const Tensor& idx, Tensor& out) {
  FP8_ASSIGN_OR_RETURN(Tensor view, src.reshape({src.numel() / g, g}));
  return c.be->gather_rows(view, idx, out);
}

// x [n, H*(a+b)] (per head [a | b]) -> xa [n, H*a], xb [n, H*b].
Result<std::pair<Tensor, Tensor>> split_heads(ModelCtx& c, RowCache* rc, const Tensor& x, int64_t H,
                                              int64_t a, int64_t b) {
  if (x.cols() != H * (a + b)) {
    return FP8_INVALID("attention split_heads: {} columns, expected {}*({}+{})", x.cols(), H, a, b);
  }
  const int64_t n = x.rows();
  FP8_ASSIGN_OR_RETURN(Tensor xa, new_f32(c, n, H * a));
  FP8_ASSIGN_OR_RETURN(Tensor xb, new_f32(c, n, H * b));
  {
    const int64_t g = std::gcd(a, b), pa = a / g, pb = b / g;
    FP8_ASSIGN_OR_RETURN(Tensor ra, row_list(c, rc, {kSplitA, n, H, a, b}, [&] {
                           std::vector<int32_t> v;
                           v.reserve(n * H * pa);
                           for (int64_t r = 0; r < n * H; ++r)
                             for (int64_t j = 0; j < pa; ++j)
                               v.push_back(static_cast<int32_t>(r * (pa + pb) + j));
                           return v;
                         }));
    FP8_ASSIGN_OR_RETURN(Tensor rb, row_list(c, rc, {kSplitB, n, H, a, b}, [&] {
                           std::vector<int32_t> v;
                           v.reserve(n * H * pb);
                           for (int64_t r = 0; r < n * H; ++r)
                             for (int64_t j = 0; j < pb; ++j)
                               v.push_back(static_cast<int32_t>(r * (pa + pb) + pa + j));
                           return v;
                         }));
    FP8_RETURN_IF_ERROR(gather_pieces(c, x, g, ra, xa));
    FP8_RETURN_IF_ERROR(gather_pieces(c, x, g, rb, xb));
  }
  return std::make_pair(std::move(xa), std::move(xb));
}

// The inverse (and transpose) of split_heads: [n, H*a], [n, H*b] -> [n, H*(a+b)].
Result<Tensor> merge_heads(ModelCtx& c, RowCache* rc, const Tensor& xa, const Tensor& xb, int64_t H,
                           int64_t a, int64_t b) {
  const int64_t n = xa.rows();
  if (xa.cols() != H * a || xb.cols() != H * b || xb.rows() != n) {
    return FP8_INVALID("attention merge_heads: parts {} and {} do not match {} heads of {}+{}",
                       xa.describe(), xb.describe(), H, a, b);
  }
  FP8_ASSIGN_OR_RETURN(Tensor x, new_f32(c, n, H * (a + b)));
  {  // [xa; xb] in one buffer, then one gather
    const int64_t g = std::gcd(a, b), pa = a / g, pb = b / g, na = n * H * pa;
    FP8_ASSIGN_OR_RETURN(Tensor both, c.be->empty({na + n * H * pb, g}, DType::kF32));
    Tensor top = both.slice_rows(0, na), bottom = both.slice_rows(na, both.dim(0));
    FP8_RETURN_IF_ERROR(c.be->copy(xa, top));
    FP8_RETURN_IF_ERROR(c.be->copy(xb, bottom));
    FP8_ASSIGN_OR_RETURN(Tensor rows, row_list(c, rc, {kMerge, n, H, a, b}, [&] {
                           std::vector<int32_t> v;
                           v.reserve(both.dim(0));
                           for (int64_t r = 0; r < n * H; ++r) {
                             for (int64_t j = 0; j < pa; ++j)
                               v.push_back(static_cast<int32_t>(r * pa + j));
                             for (int64_t j = 0; j < pb; ++j)
                               v.push_back(static_cast<int32_t>(na + r * pb + j));
                           }
                           return v;
                         }));
    FP8_RETURN_IF_ERROR(gather_pieces(c, both, g, rows, x));
  }
  return x;
}

// x [n, d] -> [n, H*d], the same row for every head (the shared RoPE key).
Result<Tensor> broadcast_heads(ModelCtx& c, RowCache* rc, const Tensor& x, int64_t H) {
  const int64_t n = x.rows(), d = x.cols();
  FP8_ASSIGN_OR_RETURN(Tensor y, new_f32(c, n, H * d));
  FP8_ASSIGN_OR_RETURN(Tensor rows, row_list(c, rc, {kBroadcast, n, H, d, 0}, [&] {
                         std::vector<int32_t> v(n * H);
                         for (int64_t i = 0; i < n * H; ++i) v[i] = static_cast<int32_t>(i / H);
                         return v;
                       }));
  FP8_RETURN_IF_ERROR(gather_pieces(c, x, d, rows, y));
  return y;
}

// The transpose of broadcast_heads: [n, H*d] -> [n, d], summed over heads (fp32, head order).
Result<Tensor> sum_heads(ModelCtx& c, RowCache* rc, const Tensor& x, int64_t H) {
  const int64_t n = x.rows(), d = x.cols() / H;
  FP8_ASSIGN_OR_RETURN(Tensor y, new_zeros(c, n, d));
  // y[i / H] += x viewed as [n*H, d] row i, in row order (head order per token)
  FP8_ASSIGN_OR_RETURN(Tensor idx, row_list(c, rc, {kSum, n, H, d, 0}, [&] {
                         std::vector<int32_t> v(n * H);
                         for (int64_t i = 0; i < n * H; ++i) v[i] = static_cast<int32_t>(i / H);
                         return v;
                       }));
  FP8_ASSIGN_OR_RETURN(Tensor xv, x.reshape({n * H, d}));
  FP8_RETURN_IF_ERROR(c.be->scatter_add_rows(xv, idx, Tensor(), y));
  return y;
}

}  // namespace

kernels::RopeSpec rope_spec(const config::Model& m) {
  kernels::RopeSpec r;
  r.theta = m.rope_theta();
  const config::RopeScaling& y = m.rope_scaling();
  if (y.factor() > 1.0f) {
    r.factor = y.factor();
    r.original_max_position = y.original_max_position();
    r.beta_fast = y.beta_fast();
    r.beta_slow = y.beta_slow();
    r.mscale = y.mscale();
    r.mscale_all_dim = y.mscale_all_dim();
  }
  return r;
}

struct Attention::Impl {
  bool mla = true;
  int64_t H = 0, hidden = 0;
  int64_t q_lora = 0, kv_lora = 0, nope = 0, rope = 0, vdim = 0;  // MHA: nope 0, rope = head dim
  kernels::RopeSpec rope_spec;  // model.rope_theta and model.rope_scaling
  float scale = 1.0f;
  Linear wq_a, wq_b, wq, wkv_a, wkv_b, wk, wv, wo;
  RMSNorm q_norm, kv_norm;
  struct Saved {
    Tensor q, k, v, o, lse, pos;  // attention-core operands (fp32) and row positions
    // recompute_mla_up: q, k, v are dropped after the core's forward and rebuilt in the
    // backward from the projections' kept inputs and this: the rotated shared RoPE key [n, rope].
    Tensor k_rope;
    int64_t B = 0, T = 0;
  };
  PerMicrobatch<Saved> saved;
  // Decoding's latent form: wkv_b's forward weight values (fp32), per ModelCtx::weight_version.
  Tensor wkv_b_f32;
  uint64_t wkv_b_version = ~0ull;
  RowCache rows;  // device row lists of the head packing and positions, by shape
  bool q_lowrank() const { return mla && q_lora > 0; }
  int64_t dk() const { return nope + rope; }
  // The held output's form (ModelCtx::attn_out_cache); e4m3 needs W_o's FP8 input, FP32 holds
  // the fp32 output itself (kBf16 stands for "no cache" there).
  using Cache = ModelCtx::AttnOutCache;
  static Cache out_cache(const ModelCtx& c) {
    if (c.precision == Precision::kFP32) return Cache::kBf16;
    if (c.attn_out_cache == Cache::kE4M3 && c.precision != Precision::kFP8) return Cache::kBf16;
    return c.attn_out_cache;
  }

  Status init_mla(ModelCtx& c, const std::string& p, const config::Model& m, uint64_t seed);
  Status init_mha(ModelCtx& c, const std::string& p, const config::Model& m, uint64_t seed);
  Result<Tensor> positions(ModelCtx& c, int64_t n, int64_t T);
  // The projections reading the block's normed input x: MLA wq_a (or wq) and wkv_a, MHA wq, wk
  // and wv. They share x's prepared operand (FP8: one 1x128 quantization held once for their
  // weight gradients, and one 128x1 re-quantization in W), as SwiGLU's w1 and w3 do.
  std::vector<Linear*> input_group() {
    if (!mla) return {&wq, &wk, &wv};
    return {q_lowrank() ? &wq_a : &wq, &wkv_a};
  }
  Result<Tensor> query(ModelCtx& c, int mb, const Tensor& x, const Tensor& xp, const Tensor& pos);
  Result<Tensor> query_heads(ModelCtx& c, Tensor qf, const Tensor& pos);
  Status mla_kv(ModelCtx& c, int mb, const Tensor& x, const Tensor& xp, Saved& s);
  Status mla_kv_heads(ModelCtx& c, Tensor kvb, Saved& s);
  Status recompute_qkv(ModelCtx& c, int mb, Saved& s);
  // train.recompute=rmsnorm: the latent norms' outputs again from their kept inputs, as the
  // up-projections' inputs (dropped after the forward), before the backward needs them.
  Status restore_latents(ModelCtx& c, int mb);
  Status mha_kv(ModelCtx& c, int mb, const Tensor& x, const Tensor& xp, Saved& s);
  Result<Tensor> query_backward(ModelCtx& c, int mb, Tensor& dq, const Tensor& pos);
  Result<Tensor> mla_kv_backward(ModelCtx& c, int mb, const Tensor& dk, const Tensor& dv,
                                 const Tensor& pos);
  Result<Tensor> mha_kv_backward(ModelCtx& c, int mb, Tensor& dk, const Tensor& dv,
                                 const Tensor& pos);
};

Status Attention::Impl::init_mla(ModelCtx& c, const std::string& p, const config::Model& m,
                                 uint64_t seed) {
  const config::Mla& a = m.mla();
  q_lora = a.q_lora_rank();
  kv_lora = a.kv_lora_rank();
  nope = a.qk_nope_head_dim();
  rope = a.qk_rope_head_dim();
  vdim = a.v_head_dim();
  if (q_lora < 0 || kv_lora <= 0 || nope <= 0 || rope <= 0 || rope % 2 || vdim <= 0) {
    return FP8_INVALID("{}: bad MLA dims {}", p, a.ShortDebugString());
  }
  const float std = m.init_std();
  if (q_lowrank()) {
    FP8_RETURN_IF_ERROR(wq_a.init(c, p + ".wq_a.weight", hidden, q_lora, seed, std));
    // the latents are wq_a's and wkv_a's outputs: bf16-valued outside FP32, held as bf16
    FP8_RETURN_IF_ERROR(q_norm.init(c, p + ".q_norm.weight", q_lora, m.norm_eps(), seed, true));
    FP8_RETURN_IF_ERROR(wq_b.init(c, p + ".wq_b.weight", q_lora, H * dk(), seed, std));
  } else {
    FP8_RETURN_IF_ERROR(wq.init(c, p + ".wq.weight", hidden, H * dk(), seed, std));
  }
  FP8_RETURN_IF_ERROR(wkv_a.init(c, p + ".wkv_a.weight", hidden, kv_lora + rope, seed, std));
  FP8_RETURN_IF_ERROR(
      kv_norm.init(c, p + ".kv_norm.weight", kv_lora, m.norm_eps(), seed, /*bf16_input=*/true));
  FP8_RETURN_IF_ERROR(wkv_b.init(c, p + ".wkv_b.weight", kv_lora, H * (nope + vdim), seed, std));
  return wo.init(c, p + ".wo.weight", H * vdim, hidden, seed, std);
}

Status Attention::Impl::init_mha(ModelCtx& c, const std::string& p, const config::Model& m,
                                 uint64_t seed) {
  const int64_t hd = m.head_dim() > 0 ? m.head_dim() : hidden / H;
  if (hd <= 0 || hd % 2) return FP8_INVALID("{}: MHA head dim {} must be even and > 0", p, hd);
  nope = 0;
  rope = hd;  // RoPE on the full head dim
  vdim = hd;
  const float std = m.init_std();
  FP8_RETURN_IF_ERROR(wq.init(c, p + ".wq.weight", hidden, H * hd, seed, std));
  FP8_RETURN_IF_ERROR(wk.init(c, p + ".wk.weight", hidden, H * hd, seed, std));
  FP8_RETURN_IF_ERROR(wv.init(c, p + ".wv.weight", hidden, H * hd, seed, std));
  return wo.init(c, p + ".wo.weight", H * hd, hidden, seed, std);
}

Status Attention::init(ModelCtx& c, const std::string& prefix, const config::Model& m,
                       uint64_t seed) {
  impl_ = std::make_shared<Impl>();
  Impl& a = *impl_;
  a.mla = m.attention() == config::Model::MLA;
  a.H = m.heads();
  a.hidden = m.hidden();
  a.rope_spec = rope_spec(m);
  if (a.H <= 0 || a.hidden <= 0) {
    return FP8_INVALID("{}: heads {} and hidden {} must be > 0", prefix, a.H, a.hidden);
  }
  FP8_RETURN_IF_ERROR(a.mla ? a.init_mla(c, prefix, m, seed) : a.init_mha(c, prefix, m, seed));
  a.scale = 1.0f / std::sqrt(static_cast<float>(a.dk()));
  if (a.rope_spec.yarn()) {  // YaRN's temperature multiplies the softmax scale (kernels/cpu/rope.h)
    a.scale = static_cast<float>(kernels::rope_softmax_factor(a.rope_spec) /
                                 std::sqrt(static_cast<double>(a.dk())));
  }
  return Status::Ok();
}

// i32 [n], row r at position r % T, built on the host and copied to the backend.
Result<Tensor> Attention::Impl::positions(ModelCtx& c, int64_t n, int64_t T) {
  return row_list(c, &rows, {kPositions, n, T, 0, 0}, [&] {
    std::vector<int32_t> v(n);
    for (int64_t r = 0; r < n; ++r) v[r] = static_cast<int32_t>(r % T);
    return v;
  });
}

// q [n, H*dk] = per head [q_nope | RoPE(q_rope)] (MHA: RoPE over the whole head).
Result<Tensor> Attention::Impl::query(ModelCtx& c, int mb, const Tensor& x, const Tensor& xp,
                                      const Tensor& pos) {
  Tensor qf;
  if (q_lowrank()) {
    FP8_ASSIGN_OR_RETURN(Tensor cq, wq_a.forward_prepared(c, mb, x, xp));
    FP8_ASSIGN_OR_RETURN(Tensor cqn, q_norm.forward(c, mb, cq));
    FP8_ASSIGN_OR_RETURN(qf, wq_b.forward(c, mb, cqn));
    if (c.recompute_norm) FP8_RETURN_IF_ERROR(wq_b.drop_input(mb));  // restore_latents in B
  } else {
    FP8_ASSIGN_OR_RETURN(qf, wq.forward_prepared(c, mb, x, xp));
  }
  return query_heads(c, std::move(qf), pos);
}

// The query projection's output qf (a fresh tensor, rotated in place for MHA) -> q.
Result<Tensor> Attention::Impl::query_heads(ModelCtx& c, Tensor qf, const Tensor& pos) {
  if (nope == 0) {  // Linear outputs are fresh tensors: rotate in place
    FP8_RETURN_IF_ERROR(c.be->rope(qf, pos, H, rope_spec, false));
    return qf;
  }
  FP8_ASSIGN_OR_RETURN(auto parts, split_heads(c, &rows, qf, H, nope, rope));
  FP8_RETURN_IF_ERROR(c.be->rope(parts.second, pos, H, rope_spec, false));
  return merge_heads(c, &rows, parts.first, parts.second, H, nope, rope);
}

// MLA keys and values: [c_kv | k_rope] = x W_kva; [k_nope | v] per head = kv_norm(c_kv) W_kvb;
// k = [k_nope | RoPE(k_rope) broadcast to every head].
Status Attention::Impl::mla_kv(ModelCtx& c, int mb, const Tensor& x, const Tensor& xp, Saved& s) {
  FP8_ASSIGN_OR_RETURN(Tensor kv, wkv_a.forward_prepared(c, mb, x, xp));
  FP8_ASSIGN_OR_RETURN(auto lat, split_heads(c, &rows, kv, 1, kv_lora, rope));
  FP8_ASSIGN_OR_RETURN(Tensor ckv, kv_norm.forward(c, mb, lat.first));
  FP8_ASSIGN_OR_RETURN(Tensor kvb, wkv_b.forward(c, mb, ckv));
  if (c.recompute_norm) FP8_RETURN_IF_ERROR(wkv_b.drop_input(mb));  // restore_latents in B
  FP8_RETURN_IF_ERROR(c.be->rope(lat.second, s.pos, 1, rope_spec, false));
  s.k_rope = std::move(lat.second);
  return mla_kv_heads(c, std::move(kvb), s);
}

// The up-projection's output kvb ([k_nope | v] per head) and s.k_rope -> s.k, s.v.
Status Attention::Impl::mla_kv_heads(ModelCtx& c, Tensor kvb, Saved& s) {
  FP8_ASSIGN_OR_RETURN(auto kv_parts, split_heads(c, &rows, kvb, H, nope, vdim));
  kvb = Tensor();  // split into its parts: freed before k is assembled
  FP8_ASSIGN_OR_RETURN(Tensor k_rope, broadcast_heads(c, &rows, s.k_rope, H));
  FP8_ASSIGN_OR_RETURN(s.k, merge_heads(c, &rows, kv_parts.first, k_rope, H, nope, rope));
  s.v = std::move(kv_parts.second);
  return Status::Ok();
}

// recompute_mla_up: q, k and v of s's micro-batch again, from the Linears' kept inputs.
Status Attention::Impl::recompute_qkv(ModelCtx& c, int mb, Saved& s) {
  FP8_ASSIGN_OR_RETURN(Tensor qf, (q_lowrank() ? wq_b : wq).recompute(c, mb));
  FP8_ASSIGN_OR_RETURN(s.q, query_heads(c, std::move(qf), s.pos));
  FP8_ASSIGN_OR_RETURN(Tensor kvb, wkv_b.recompute(c, mb));
  FP8_RETURN_IF_ERROR(mla_kv_heads(c, std::move(kvb), s));
  s.k_rope = Tensor();  // now part of k
  return Status::Ok();
}

Status Attention::Impl::restore_latents(ModelCtx& c, int mb) {
  if (q_lowrank()) {
    FP8_ASSIGN_OR_RETURN(Tensor cqn, q_norm.recompute(c, mb));
    FP8_RETURN_IF_ERROR(wq_b.restore_input(c, mb, cqn));
  }
  FP8_ASSIGN_OR_RETURN(Tensor ckv, kv_norm.recompute(c, mb));
  return wkv_b.restore_input(c, mb, ckv);
}

Status Attention::Impl::mha_kv(ModelCtx& c, int mb, const Tensor& x, const Tensor& xp, Saved& s) {
  FP8_ASSIGN_OR_RETURN(s.k, wk.forward_prepared(c, mb, x, xp));
  FP8_RETURN_IF_ERROR(c.be->rope(s.k, s.pos, H, rope_spec, false));
  FP8_ASSIGN_OR_RETURN(s.v, wv.forward_prepared(c, mb, x, xp));
  return Status::Ok();
}

Result<Tensor> Attention::forward(ModelCtx& c, int mb, const Tensor& x, int64_t B, int64_t T) {
  Impl& a = *impl_;
  if (x.cols() != a.hidden || x.rows() != B * T) {
    return FP8_INVALID("attention: input {} is not [{}*{}, {}]", x.describe(), B, T, a.hidden);
  }
  Impl::Saved& s = a.saved.put(mb);
  s.B = B;
  s.T = T;
  FP8_ASSIGN_OR_RETURN(s.pos, a.positions(c, x.rows(), T));
  FP8_ASSIGN_OR_RETURN(Tensor xp, a.input_group().front()->prepare_input(c, x));
  FP8_ASSIGN_OR_RETURN(s.q, a.query(c, mb, x, xp, s.pos));
  FP8_RETURN_IF_ERROR(a.mla ? a.mla_kv(c, mb, x, xp, s) : a.mha_kv(c, mb, x, xp, s));
  FP8_ASSIGN_OR_RETURN(s.o, new_f32(c, x.rows(), a.H * a.vdim));
  FP8_ASSIGN_OR_RETURN(s.lse, c.be->empty({B * a.H * T}, DType::kF32));
  FP8_RETURN_IF_ERROR(attention_core_fwd(c, s.q, s.k, s.v, {B, T, a.H, a.scale}, s.o, s.lse));
  if (a.mla && c.recompute_mla_up) {
    s.q = s.k = s.v = Tensor();  // rebuilt by the backward (recompute_qkv)
  } else {
    s.k_rope = Tensor();
  }
  if (c.precision == Precision::kFP32) return a.wo.forward(c, mb, s.o);
  // W_o reads bf16 activations. One copy of the output is held for the backward, where the core
  // reads it (D = rowsum(dO o), as FlashAttention does from its bf16 output) and W_o's weight
  // gradient is made from it (precision.attn_out_cache):
  //  - bf16: those bf16 values; W_o's input is re-prepared from them (the same bits);
  //  - e5m6: the fp32 core output as E5M6 1x128 codes and pow2 scales (DeepSeek-V3, TR §3.3.3);
  //    W_o's wgrad operand is quantized 128x1 from the cached values;
  //  - e4m3 (FP8): W_o's own FP8 1x128 input, kept as any Linear keeps it; the core reads its
  //    dequantized values.
  FP8_ASSIGN_OR_RETURN(Tensor o, new_f32(c, s.o.rows(), s.o.cols()));
  FP8_RETURN_IF_ERROR(c.be->round_bf16(s.o, o));
  const Impl::Cache cache = a.out_cache(c);
  if (cache == Impl::Cache::kE5M6) {  // (non-finite groups are counted by W_o's quantization)
    FP8_ASSIGN_OR_RETURN(s.o, c.be->quantize_e5m6(s.o));
  } else if (cache == Impl::Cache::kBf16) {
    FP8_ASSIGN_OR_RETURN(s.o, hold_bf16(c, o));
  } else {
    s.o = Tensor();
  }
  FP8_ASSIGN_OR_RETURN(Tensor y, a.wo.forward(c, mb, o));
  if (cache != Impl::Cache::kE4M3) FP8_RETURN_IF_ERROR(a.wo.drop_input(mb));
  return y;
}

// dq -> dx through the query path (inverse RoPE is the transpose of RoPE).
Result<Tensor> Attention::Impl::query_backward(ModelCtx& c, int mb, Tensor& dq, const Tensor& pos) {
  Tensor dqf = dq;
  if (nope == 0) {  // dq is a fresh tensor owned by this backward: rotate in place
    FP8_RETURN_IF_ERROR(c.be->rope(dqf, pos, H, rope_spec, true));
  } else {
    FP8_ASSIGN_OR_RETURN(auto parts, split_heads(c, &rows, dq, H, nope, rope));
    FP8_RETURN_IF_ERROR(c.be->rope(parts.second, pos, H, rope_spec, true));
    FP8_ASSIGN_OR_RETURN(dqf, merge_heads(c, &rows, parts.first, parts.second, H, nope, rope));
  }
  if (!q_lowrank()) return wq.backward_input(c, mb, dqf);
  FP8_ASSIGN_OR_RETURN(Tensor dcqn, wq_b.backward_input(c, mb, dqf));
  FP8_ASSIGN_OR_RETURN(Tensor dcq, q_norm.backward(c, mb, dcqn));
  return wq_a.backward_input(c, mb, dcq);
}

// dk, dv -> dx through the MLA KV path; the shared key's gradient sums over heads.
Result<Tensor> Attention::Impl::mla_kv_backward(ModelCtx& c, int mb, const Tensor& dk,
                                                const Tensor& dv, const Tensor& pos) {
  FP8_ASSIGN_OR_RETURN(auto dk_parts, split_heads(c, &rows, dk, H, nope, rope));
  FP8_ASSIGN_OR_RETURN(Tensor dk_rope, sum_heads(c, &rows, dk_parts.second, H));
  FP8_RETURN_IF_ERROR(c.be->rope(dk_rope, pos, 1, rope_spec, true));
  FP8_ASSIGN_OR_RETURN(Tensor dkvb, merge_heads(c, &rows, dk_parts.first, dv, H, nope, vdim));
  FP8_ASSIGN_OR_RETURN(Tensor dckv, wkv_b.backward_input(c, mb, dkvb));
  FP8_ASSIGN_OR_RETURN(Tensor dckv_in, kv_norm.backward(c, mb, dckv));
  FP8_ASSIGN_OR_RETURN(Tensor dkv, merge_heads(c, &rows, dckv_in, dk_rope, 1, kv_lora, rope));
  return wkv_a.backward_input(c, mb, dkv);
}

Result<Tensor> Attention::Impl::mha_kv_backward(ModelCtx& c, int mb, Tensor& dk, const Tensor& dv,
                                                const Tensor& pos) {
  FP8_RETURN_IF_ERROR(c.be->rope(dk, pos, H, rope_spec, true));
  FP8_ASSIGN_OR_RETURN(Tensor dx, wk.backward_input(c, mb, dk));
  FP8_ASSIGN_OR_RETURN(Tensor dxv, wv.backward_input(c, mb, dv));
  FP8_RETURN_IF_ERROR(c.be->axpy(1.0f, dxv, dx));
  return dx;
}

Result<Tensor> Attention::backward_input(ModelCtx& c, int mb, const Tensor& dy) {
  Impl& a = *impl_;
  FP8_ASSIGN_OR_RETURN(Impl::Saved * s, a.saved.get(mb, "attention"));
  FP8_ASSIGN_OR_RETURN(Tensor dout, a.wo.backward_input(c, mb, dy));
  // the held output's fp32 values for the core (in place of it, so no more bytes than the fp32
  // output the core's backward always read)
  const Impl::Cache cache = a.out_cache(c);
  if (cache == Impl::Cache::kE4M3) {
    FP8_ASSIGN_OR_RETURN(Tensor xq, a.wo.held_fp8_input(mb));
    FP8_ASSIGN_OR_RETURN(s->o, held_f32(c, xq));
  } else if (c.precision != Precision::kFP32) {
    FP8_ASSIGN_OR_RETURN(s->o, held_f32(c, s->o));
  }
  if (a.mla && c.recompute_norm) FP8_RETURN_IF_ERROR(a.restore_latents(c, mb));
  if (!s->q.defined()) FP8_RETURN_IF_ERROR(a.recompute_qkv(c, mb, *s));
  FP8_ASSIGN_OR_RETURN(Tensor dq, new_f32(c, s->q.rows(), s->q.cols()));
  FP8_ASSIGN_OR_RETURN(Tensor dk, new_f32(c, s->k.rows(), s->k.cols()));
  FP8_ASSIGN_OR_RETURN(Tensor dv, new_f32(c, s->v.rows(), s->v.cols()));
  FP8_RETURN_IF_ERROR(attention_core_bwd(c, dout, s->q, s->k, s->v, s->o, s->lse,
                                         {s->B, s->T, a.H, a.scale}, dq, dk, dv));
  s->q = s->k = s->v = s->lse = Tensor();  // the core's operands are not needed again
  // W_o's input (or its wgrad operand) again from the output, once q, k and v are gone (it is
  // held until W); an e4m3 cache is W_o's own input
  if (cache == Impl::Cache::kE5M6) {
    FP8_RETURN_IF_ERROR(a.wo.restore_wgrad_operand(c, mb, s->o));
  } else if (cache == Impl::Cache::kBf16 && c.precision != Precision::kFP32) {
    FP8_RETURN_IF_ERROR(a.wo.restore_input(c, mb, s->o));
  }
  s->o = Tensor();
  FP8_ASSIGN_OR_RETURN(Tensor dx, a.query_backward(c, mb, dq, s->pos));
  Tensor dx_kv;
  if (a.mla) {
    FP8_ASSIGN_OR_RETURN(dx_kv, a.mla_kv_backward(c, mb, dk, dv, s->pos));
  } else {
    FP8_ASSIGN_OR_RETURN(dx_kv, a.mha_kv_backward(c, mb, dk, dv, s->pos));
  }
  FP8_RETURN_IF_ERROR(c.be->axpy(1.0f, dx_kv, dx));
  a.saved.erase(mb);
  return dx;
}

Status Attention::drop_input(int mb) {
  for (Linear* l : impl_->input_group()) FP8_RETURN_IF_ERROR(l->drop_input(mb));
  return Status::Ok();
}

Status Attention::restore_input(ModelCtx& c, int mb, const Tensor& x) {
  const std::vector<Linear*> group = impl_->input_group();
  FP8_ASSIGN_OR_RETURN(Tensor xp, group.front()->prepare_input(c, x));
  for (Linear* l : group) FP8_RETURN_IF_ERROR(l->restore_prepared(mb, xp));
  return Status::Ok();
}

Status Attention::backward_weight(ModelCtx& c, int mb) {
  Impl& a = *impl_;
  const std::vector<Linear*> group = a.input_group();
  FP8_ASSIGN_OR_RETURN(Tensor xo, group.front()->weight_grad_input(c, mb));
  for (Linear* l : group) FP8_RETURN_IF_ERROR(l->backward_weight(c, mb, xo));
  xo = Tensor();
  for (Linear* l : {&a.wq_b, &a.wkv_b, &a.wo}) {
    if (l->weight().value.defined()) FP8_RETURN_IF_ERROR(l->backward_weight(c, mb));
  }
  return Status::Ok();
}

// ---- inference over a key/value cache -------------------------------------------------------

int64_t AttnCache::bytes_per_position() const {
  const int64_t w = (k.defined() ? k.cols() : 0) + (v.defined() ? v.cols() : 0);
  return w * dtype_size(dtype);
}

namespace {

// Rows [past, past + rows(src)) of the cache tensor t (allocated [capacity, cols(src)] of the
// cache's dtype at first use) = src (fp32; rounded to bf16 for a bf16 cache).
Status append_rows(ModelCtx& c, Tensor& t, const AttnCache& cache, int64_t past,
                   const Tensor& src) {
  if (!t.defined()) {
    FP8_ASSIGN_OR_RETURN(t, c.be->empty({cache.capacity, src.cols()}, cache.dtype));
  }
  Tensor dst = t.slice_rows(past, past + src.rows());
  return cache.dtype == DType::kF32 ? c.be->copy(src, dst) : c.be->cast(src, dst);
}

}  // namespace

Result<Tensor> Attention::forward_cached(ModelCtx& c, int mb, const Tensor& x,
                                         std::span<const CachedSeq> seqs) {
  Impl& a = *impl_;
  const int64_t n = x.rows();
  if (x.cols() != a.hidden || seqs.empty()) {
    return FP8_INVALID("attention: input {} is not [n, {}] over one or more sequences",
                       x.describe(), a.hidden);
  }
  std::vector<int32_t> p;  // each row's position
  for (const CachedSeq& q : seqs) {
    if (q.past < 0 || q.rows < 0 || q.past + q.rows > q.cache->capacity) {
      return FP8_INVALID("attention: positions {}..{} exceed the cache of {} positions", q.past,
                         q.past + q.rows - 1, q.cache->capacity);
    }
    if (q.cache->latent != seqs[0].cache->latent || q.cache->dtype != seqs[0].cache->dtype) {
      return FP8_INVALID("attention: one decoding call mixes cache forms or dtypes");
    }
    for (int64_t r = 0; r < q.rows; ++r) p.push_back(static_cast<int32_t>(q.past + r));
  }
  if (static_cast<int64_t>(p.size()) != n) {
    return FP8_INVALID("attention: the sequences hold {} rows of the input's {}", p.size(), n);
  }
  FP8_ASSIGN_OR_RETURN(Tensor pos, upload_i32(c, p));
  FP8_ASSIGN_OR_RETURN(Tensor xp, a.input_group().front()->prepare_input(c, x));
  FP8_ASSIGN_OR_RETURN(Tensor q, a.query(c, mb, x, xp, pos));
  FP8_ASSIGN_OR_RETURN(Tensor o, new_f32(c, n, a.H * a.vdim));
  const bool latent = a.mla && seqs[0].cache->latent;
  // fn(sequence, its first row) over the sequences in order (their rows are consecutive in x)
  auto each = [&](auto&& fn) -> Status {
    int64_t r0 = 0;
    for (const CachedSeq& sq : seqs) {
      FP8_RETURN_IF_ERROR(fn(sq, r0));
      r0 += sq.rows;
    }
    return Status::Ok();
  };
  if (a.mla) {
    FP8_ASSIGN_OR_RETURN(Tensor kv, a.wkv_a.forward_prepared(c, mb, x, xp));
    FP8_ASSIGN_OR_RETURN(auto lat, split_heads(c, &a.rows, kv, 1, a.kv_lora, a.rope));
    FP8_ASSIGN_OR_RETURN(Tensor ckv, a.kv_norm.forward(c, mb, lat.first));
    FP8_RETURN_IF_ERROR(c.be->rope(lat.second, pos, 1, a.rope_spec, false));
    if (latent) {
      // c_kv as wkv_b's GEMM reads it (FP8: its 1x128 quantization; BF16: rounded), so the
      // absorbed products use the values the training forward's keys and values are made of
      FP8_ASSIGN_OR_RETURN(ckv, a.wkv_b.input_values_f32(c, ckv));
      FP8_ASSIGN_OR_RETURN(Tensor row,
                           merge_heads(c, &a.rows, ckv, lat.second, 1, a.kv_lora, a.rope));
      FP8_RETURN_IF_ERROR(each([&](const CachedSeq& sq, int64_t r0) {
        return append_rows(c, sq.cache->k, *sq.cache, sq.past, row.slice_rows(r0, r0 + sq.rows));
      }));
    } else {
      FP8_ASSIGN_OR_RETURN(Tensor kvb, a.wkv_b.forward(c, mb, ckv));
      Impl::Saved kv_heads;
      kv_heads.k_rope = std::move(lat.second);
      FP8_RETURN_IF_ERROR(a.mla_kv_heads(c, std::move(kvb), kv_heads));
      FP8_RETURN_IF_ERROR(each([&](const CachedSeq& sq, int64_t r0) -> Status {
        FP8_RETURN_IF_ERROR(append_rows(c, sq.cache->k, *sq.cache, sq.past,
                                        kv_heads.k.slice_rows(r0, r0 + sq.rows)));
        return append_rows(c, sq.cache->v, *sq.cache, sq.past,
                           kv_heads.v.slice_rows(r0, r0 + sq.rows));
      }));
    }
  } else {
    FP8_ASSIGN_OR_RETURN(Tensor k, a.wk.forward_prepared(c, mb, x, xp));
    FP8_RETURN_IF_ERROR(c.be->rope(k, pos, a.H, a.rope_spec, false));
    FP8_ASSIGN_OR_RETURN(Tensor v, a.wv.forward_prepared(c, mb, x, xp));
    FP8_RETURN_IF_ERROR(each([&](const CachedSeq& sq, int64_t r0) -> Status {
      FP8_RETURN_IF_ERROR(
          append_rows(c, sq.cache->k, *sq.cache, sq.past, k.slice_rows(r0, r0 + sq.rows)));
      return append_rows(c, sq.cache->v, *sq.cache, sq.past, v.slice_rows(r0, r0 + sq.rows));
    }));
  }
  if (!latent) {
    FP8_RETURN_IF_ERROR(each([&](const CachedSeq& sq, int64_t r0) {
      const int64_t L = sq.past + sq.rows;
      const Tensor k = sq.cache->k.slice_rows(0, L), v = sq.cache->v.slice_rows(0, L);
      Tensor os = o.slice_rows(r0, r0 + sq.rows);
      return c.be->attention_cached(q.slice_rows(r0, r0 + sq.rows), k, v, a.H, a.H, a.vdim, a.scale,
                                    os);
    }));
  } else {
    // Absorbed: q_nope . k_nope = (q_nope W_uk) . kv_norm(c_kv) per head, with W_uk / W_uv the
    // key / value rows of wkv_b's head h ([nope + vdim, kv_lora] blocks of its weight); the
    // output o_h = (softmax . c_kv) W_uv^T. One latent key/value head shared by all H heads.
    const int64_t r = a.kv_lora, hs = (a.nope + a.vdim) * r;
    if (a.wkv_b_version != c.weight_version || !a.wkv_b_f32.defined()) {
      FP8_ASSIGN_OR_RETURN(a.wkv_b_f32, a.wkv_b.forward_weight_f32(c));
      a.wkv_b_version = c.weight_version;
    }
    const Tensor& w = a.wkv_b_f32;
    FP8_ASSIGN_OR_RETURN(auto qp, split_heads(c, &a.rows, q, a.H, a.nope, a.rope));
    FP8_ASSIGN_OR_RETURN(Tensor q_abs, new_f32(c, n, a.H * r));
    GemmBatch g;
    g.batch = a.H, g.M = n, g.N = r, g.K = a.nope;
    g.lda = a.H * a.nope, g.stride_a = a.nope;
    g.ldb = r, g.stride_b = hs;
    g.ldc = a.H * r, g.stride_c = r;
    FP8_RETURN_IF_ERROR(c.be->gemm_batched(qp.first, w, q_abs, g));
    FP8_ASSIGN_OR_RETURN(Tensor qc, merge_heads(c, &a.rows, q_abs, qp.second, a.H, r, a.rope));
    FP8_ASSIGN_OR_RETURN(Tensor o_lat, new_f32(c, n, a.H * r));
    FP8_RETURN_IF_ERROR(each([&](const CachedSeq& sq, int64_t r0) {
      const Tensor k = sq.cache->k.slice_rows(0, sq.past + sq.rows);
      Tensor os = o_lat.slice_rows(r0, r0 + sq.rows);
      return c.be->attention_cached(qc.slice_rows(r0, r0 + sq.rows), k, k, a.H, 1, r, a.scale, os);
    }));
    GemmBatch u;
    u.batch = a.H, u.M = n, u.N = a.vdim, u.K = r, u.trans_b = true;
    u.lda = a.H * r, u.stride_a = r;
    u.ldb = r, u.offset_b = a.nope * r, u.stride_b = hs;
    u.ldc = a.H * a.vdim, u.stride_c = a.vdim;
    FP8_RETURN_IF_ERROR(c.be->gemm_batched(o_lat, w, o, u));
  }
  // W_o reads the output rounded to bf16 outside FP32, as in the training forward.
  if (c.precision != Precision::kFP32) FP8_RETURN_IF_ERROR(c.be->round_bf16(o, o));
  return a.wo.forward(c, mb, o);
}

std::vector<Param*> Attention::params() {
  Impl& a = *impl_;
  if (!a.mla) return {&a.wq.weight(), &a.wk.weight(), &a.wv.weight(), &a.wo.weight()};
  std::vector<Param*> ps;
  if (a.q_lowrank()) {
    ps = {&a.wq_a.weight(), &a.q_norm.weight(), &a.wq_b.weight()};
  } else {
    ps = {&a.wq.weight()};
  }
  for (Param* p : {&a.wkv_a.weight(), &a.kv_norm.weight(), &a.wkv_b.weight(), &a.wo.weight()}) {
    ps.push_back(p);
  }
  return ps;
}

}  // namespace fp8pipe::model
