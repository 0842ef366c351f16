// Checkpoint -> Hugging Face DeepseekV3 folder: the fp8pipe-name -> DeepSeek-name mapping, the
// DeepseekV3 config.json, and the shard writer. RoPE needs no permutation: our interleaved-pair
// layout is DeepSeek's, which transformers reads with rope_interleave = true (docs/HF_EXPORT.md).
#include "core/hf_export.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "core/config.h"
#include "core/json.h"
#include "core/log.h"
#include "core/safetensors.h"
#include "kernels/cpu/fp8_codec.h"
#include "kernels/cpu/quantize.h"

namespace fp8pipe::hf {
namespace {

namespace fs = std::filesystem;
using Shape = std::vector<int64_t>;

struct Mapper {
  const config::Model& m;
  std::vector<Mapped> out;

  void add(std::string name, Shape shape, std::string src, bool f32 = false) {
    out.push_back({std::move(name), std::move(shape), {std::move(src)}, f32});
  }
  void linear(std::string name, Shape shape, std::string src) {
    add(std::move(name), std::move(shape), std::move(src));
    out.back().linear = true;
  }

  // SwiGLU: our w1 gate, w3 up, w2 down; [out, in] like torch.nn.Linear.
  void mlp(const std::string& ours, const std::string& hf, int64_t inter) {
    const int64_t d = m.hidden();
    linear(hf + ".gate_proj.weight", {inter, d}, ours + ".w1.weight");
    linear(hf + ".up_proj.weight", {inter, d}, ours + ".w3.weight");
    linear(hf + ".down_proj.weight", {d, inter}, ours + ".w2.weight");
  }

  void attention(const std::string& ours, const std::string& hf) {
    const config::Mla& a = m.mla();
    const int64_t d = m.hidden(), H = m.heads(), q = a.q_lora_rank(), kv = a.kv_lora_rank();
    const int64_t dk = a.qk_nope_head_dim() + a.qk_rope_head_dim();
    if (q > 0) {
      linear(hf + ".q_a_proj.weight", {q, d}, ours + ".wq_a.weight");
      add(hf + ".q_a_layernorm.weight", {q}, ours + ".q_norm.weight");
      linear(hf + ".q_b_proj.weight", {H * dk, q}, ours + ".wq_b.weight");
    } else {
      linear(hf + ".q_proj.weight", {H * dk, d}, ours + ".wq.weight");
    }
    linear(hf + ".kv_a_proj_with_mqa.weight", {kv + a.qk_rope_head_dim(), d},
           ours + ".wkv_a.weight");
    add(hf + ".kv_a_layernorm.weight", {kv}, ours + ".kv_norm.weight");
    linear(hf + ".kv_b_proj.weight", {H * (a.qk_nope_head_dim() + a.v_head_dim()), kv},
           ours + ".wkv_b.weight");
    linear(hf + ".o_proj.weight", {d, H * a.v_head_dim()}, ours + ".wo.weight");
  }

  void block(const std::string& ours, const std::string& hf, bool moe) {
    const int64_t d = m.hidden();
    add(hf + ".input_layernorm.weight", {d}, ours + ".attn_norm.weight");
    add(hf + ".post_attention_layernorm.weight", {d}, ours + ".ffn_norm.weight");
    attention(ours + ".attn", hf + ".self_attn");
    if (!moe) return mlp(ours + ".ffn", hf + ".mlp", m.ffn_hidden());
    const config::Moe& e = m.moe();
    add(hf + ".mlp.gate.weight", {e.routed_experts(), d}, ours + ".ffn.gate.weight");
    add(hf + ".mlp.gate.e_score_correction_bias", {e.routed_experts()},
        ours + ".ffn.gate.e_score_correction_bias", true);
    for (int j = 0; j < e.routed_experts(); ++j) {
      const std::string s = std::to_string(j);
      mlp(ours + ".ffn.experts." + s, hf + ".mlp.experts." + s, e.expert_hidden());
    }
    if (e.shared_experts() > 0) {
      mlp(ours + ".ffn.shared_experts", hf + ".mlp.shared_experts",
          int64_t{e.expert_hidden()} * e.shared_experts());
    }
  }

  // MTP module k as DeepSeek ships it: layer L + k with copies of the shared embed and head and its
  // own final norm (shared_head.norm).
  void mtp(int k, bool moe) {
    const int64_t d = m.hidden(), V = m.vocab_size();
    const std::string ours = "mtp." + std::to_string(k);
    const std::string hf = "model.layers." + std::to_string(m.layers() + k);
    add(hf + ".embed_tokens.weight", {V, d}, "embed.weight");
    add(hf + ".enorm.weight", {d}, ours + ".enorm.weight");
    add(hf + ".hnorm.weight", {d}, ours + ".hnorm.weight");
    out.push_back({hf + ".eh_proj.weight",
                   {d, 2 * d},
                   {ours + ".eh_proj_e.weight", ours + ".eh_proj_h.weight"},
                   false});
    block(ours + ".block", hf, moe);
    add(hf + ".shared_head.norm.weight", {d}, ours + ".norm.weight");
    add(hf + ".shared_head.head.weight", {V, d}, "head.weight");
  }
};

bool has_moe(const config::Model& m) { return m.has_moe() && m.moe().routed_experts() > 0; }

int64_t kept_groups(const config::Moe& e) {
  return e.max_nodes() > 0 ? e.max_nodes() : e.n_groups();
}

// Experts summed into a group's score: ours the top max(1, topk / kept groups) (limit_groups in
// kernels/cpu/ops.cc); transformers' DeepseekV3TopkRouter the top 2. Both capped at the group size.
int64_t our_group_score_n(const config::Moe& e) {
  const int64_t gsize = e.routed_experts() / e.n_groups();
  return std::min(gsize, std::max<int64_t>(1, e.topk() / kept_groups(e)));
}
int64_t hf_group_score_n(const config::Moe& e) {
  return std::min<int64_t>(e.routed_experts() / e.n_groups(), 2);
}

// True when our group limit never changes which experts are chosen: every group is kept, or a
// group scores its best expert (1 summed) and topk <= kept groups. In the latter case the top-k
// experts lie in at most topk groups, each of whose maxima is one of the top k scores, so these
// groups rank first and are all kept (configs/tiny: 4 groups of 2, top-2, 2 kept). Such a model
// routes like plain top-k, which the export writes as n_group = topk_group = 1: transformers' top-2
// group score would otherwise drop experts ours keeps (and fails on groups of one expert).
bool group_limit_is_noop(const config::Moe& e) {
  const int64_t kept = kept_groups(e);
  return e.n_groups() <= 1 || kept >= e.n_groups() ||
         (our_group_score_n(e) == 1 && e.topk() <= kept);
}

// A float config value as the shortest decimal that reads back as the same float (1e-06, not
// 9.999999974752427e-07).
json::Value num(float f) { return json::Value(std::stod(fmt::format("{}", f))); }

void moe_fields(json::Value& c, const config::Model& m) {
  if (!has_moe(m)) {  // all blocks dense: the MoE layer index range is empty
    // 0, not null: transformers 5 validates these fields as int (null fails to load).
    for (const char* k :
         {"n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size"})
      c.set(k, 0);
    c.set("first_k_dense_replace", m.layers() + m.mtp_depth());
    c.set("n_group", 1);
    c.set("topk_group", 1);
    c.set("routed_scaling_factor", 1.0);
  } else {
    const config::Moe& e = m.moe();
    c.set("n_routed_experts", e.routed_experts());
    c.set("n_shared_experts", e.shared_experts());
    c.set("num_experts_per_tok", e.topk());
    c.set("moe_intermediate_size", e.expert_hidden());
    c.set("first_k_dense_replace", m.dense_layers());
    const bool plain_topk = group_limit_is_noop(e);  // routes as top-k over all experts
    c.set("n_group", plain_topk ? 1 : e.n_groups());
    c.set("topk_group", plain_topk ? 1 : kept_groups(e));
    c.set("routed_scaling_factor", num(e.route_scale()));
  }
  c.set("moe_layer_freq", 1);
  c.set("topk_method", "noaux_tc");
  c.set("scoring_func", "sigmoid");
  c.set("norm_topk_prob", true);
  c.set("ep_size", 1);
}

Status write_text(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << text;
    if (!f.flush()) return FP8_ERROR(Code::kInternal, "cannot write {}", tmp.string());
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return FP8_ERROR(Code::kInternal, "cannot rename {}: {}", tmp.string(), ec.message());
  return Status::Ok();
}

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t x : s) n *= x;
  return n;
}

// Checks that every source is a whole model tensor (of kind `weights`, or a router bias) whose
// shapes concatenate to `t.shape`, and records which manifest tensors were used.
Status check_sources(const ckpt::Manifest& man, const Mapped& t, ckpt::Kind weights,
                     std::set<std::string>& used) {
  int64_t cols = 0;
  for (const std::string& s : t.sources) {
    const ckpt::TensorRecord* r = man.find(s);
    if (!r || (r->kind != weights && r->kind != ckpt::Kind::kRouterBias))
      return FP8_ERROR(Code::kNotFound, "{} needs model tensor '{}', absent from the checkpoint",
                       t.name, s);
    if (r->dtype != "F32") return FP8_INVALID("tensor '{}' is {}, expected F32", s, r->dtype);
    Shape want = t.shape;
    want.back() = r->shape.empty() ? 0 : r->shape.back();
    if (r->shape != want || (t.sources.size() == 1 && r->shape != t.shape))
      return FP8_INVALID("{}: source '{}' has shape [{}], expected [{}] for a [{}] export", t.name,
                         s, fmt::join(r->shape, ", "), fmt::join(want, ", "),
                         fmt::join(t.shape, ", "));
    cols += r->shape.back();
    used.insert(s);
  }
  if (cols != t.shape.back())
    return FP8_INVALID("{}: sources have {} columns, expected {}", t.name, cols, t.shape.back());
  return Status::Ok();
}

// Reads the sources of `t`, concatenates them along the last dimension and encodes the result.
// How a tensor is stored: F32, BF16, or F8_E4M3 codes plus an F32 [RB, CB] `_scale_inv`.
enum class Store { kF32, kBF16, kFp8 };
Store store_of(const Mapped& t, const std::string& dtype) {
  if (t.keep_f32 || dtype == "fp32") return Store::kF32;
  return dtype == "fp8" && t.linear && t.shape.size() == 2 ? Store::kFp8 : Store::kBF16;
}
int64_t blocks(int64_t n) { return (n + 127) / 128; }
uint64_t stored_bytes(const Mapped& t, Store s) {
  const uint64_t n = uint64_t(numel(t.shape));
  if (s == Store::kFp8) return n + 4 * uint64_t(blocks(t.shape[0]) * blocks(t.shape[1]));
  return n * (s == Store::kBF16 ? 2 : 4);
}

Result<std::vector<uint8_t>> assemble(const ckpt::Loaded& l, const Mapped& t, bool bf16,
                                      std::vector<float>* values = nullptr) {
  const int64_t n = numel(t.shape), C = t.shape.back(), rows = C ? n / C : 0;
  std::vector<float> whole(size_t(n), 0.0f);
  int64_t off = 0;
  for (const std::string& s : t.sources) {
    const ckpt::TensorRecord* r = l.manifest().find(s);
    const int64_t c = r->shape.back();
    std::vector<float> part(size_t(rows * c));
    FP8_RETURN_IF_ERROR(l.read(s, "F32", 0, rows * c, part.data()));
    for (int64_t i = 0; i < rows; ++i)
      std::copy_n(part.data() + i * c, c, whole.data() + i * C + off);
    off += c;
  }
  if (values) {  // the caller encodes them
    *values = std::move(whole);
    return std::vector<uint8_t>();
  }
  if (!bf16 || t.keep_f32) {
    std::vector<uint8_t> b(whole.size() * 4);
    std::memcpy(b.data(), whole.data(), b.size());
    return b;
  }
  std::vector<uint8_t> b(whole.size() * 2);
  for (size_t i = 0; i < whole.size(); ++i) {
    const uint16_t h = kernels::float_to_bf16(whole[i]);
    std::memcpy(b.data() + 2 * i, &h, 2);
  }
  return b;
}

// Groups tensors into shards of at most max_bytes (a larger tensor gets a shard of its own).
std::vector<std::vector<size_t>> plan_shards(const std::vector<Mapped>& ts,
                                             const std::string& dtype, uint64_t max_bytes,
                                             uint64_t* total) {
  std::vector<std::vector<size_t>> shards(1);
  uint64_t cur = 0;
  *total = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    const uint64_t b = stored_bytes(ts[i], store_of(ts[i], dtype));
    if (cur > 0 && cur + b > max_bytes) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(i);
    cur += b;
    *total += b;
  }
  return shards;
}

// transformers' noaux_tc scores a group by the sum of its top 2 biased affinities; ours sums the
// top topk / max_nodes (2 for DeepSeek-V3). Routing differs when those counts differ and the
// group limit matters (group_limit_is_noop exports those as plain top-k).
void warn_group_score(const config::Model& m) {
  if (!has_moe(m) || group_limit_is_noop(m.moe())) return;
  const int64_t ours = our_group_score_n(m.moe());
  if (ours != hf_group_score_n(m.moe()))
    log::warn(
        "hf export: group score sums the top {} of each group here, transformers sums the "
        "top 2: node-limited routing will differ",
        ours);
}

// transformers builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps 1e-6, not
// config.rms_norm_eps (as DeepSeek's inference code); ours use model.norm_eps everywhere.
void warn_latent_norm_eps(const config::Model& m) {
  if (m.norm_eps() != 1e-6f)
    log::warn(
        "hf export: model.norm_eps is {}, but transformers' DeepseekV3 uses 1e-6 in the q/kv "
        "latent norms (rms_norm_eps applies to the others): outputs will differ slightly",
        m.norm_eps());
}

std::string shard_name(size_t i, size_t n) {
  if (n == 1) return "model.safetensors";
  return fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, n);
}

}  // namespace

Result<std::vector<Mapped>> tensor_map(const config::Model& m) {
  if (m.attention() != config::Model::MLA)
    return FP8_INVALID("hf export: DeepseekV3 has MLA attention only (model.attention is MHA)");
  Mapper mp{m, {}};
  const int64_t d = m.hidden(), V = m.vocab_size();
  mp.add("model.embed_tokens.weight", {V, d}, "embed.weight");
  for (int i = 0; i < m.layers(); ++i) {
    mp.block("layers." + std::to_string(i), "model.layers." + std::to_string(i),
             has_moe(m) && i >= m.dense_layers());
  }
  mp.add("model.norm.weight", {d}, "norm.weight");
  mp.add("lm_head.weight", {V, d}, "head.weight");
  for (int k = 0; k < m.mtp_depth(); ++k) mp.mtp(k, has_moe(m));
  return std::move(mp.out);
}

namespace {
// model.rope_scaling as DeepSeek-V3's config.json writes it (null for plain RoPE); both key
// spellings of the kind, "type" (DeepSeek's modeling code) and "rope_type" (transformers').
json::Value rope_scaling_json(const config::RopeScaling& y) {
  if (!(y.factor() > 1.0f)) return json::Value();
  json::Value r = json::Value::object();
  r.set("type", "yarn");
  r.set("rope_type", "yarn");
  r.set("factor", num(y.factor()));
  r.set("original_max_position_embeddings", y.original_max_position());
  r.set("beta_fast", num(y.beta_fast()));
  r.set("beta_slow", num(y.beta_slow()));
  r.set("mscale", num(y.mscale()));
  r.set("mscale_all_dim", num(y.mscale_all_dim()));
  return r;
}
}  // namespace

Result<std::string> config_json(const config::Model& m, int64_t max_positions,
                                const std::string& torch_dtype) {
  if (m.attention() != config::Model::MLA)
    return FP8_INVALID("hf export: DeepseekV3 has MLA attention only (model.attention is MHA)");
  const config::Mla& a = m.mla();
  json::Value c = json::Value::object();
  c.set("architectures", json::Value::array()).push_back("DeepseekV3ForCausalLM");
  c.set("model_type", "deepseek_v3");
  c.set("vocab_size", m.vocab_size());
  c.set("hidden_size", m.hidden());
  c.set("intermediate_size", m.ffn_hidden());
  c.set("num_hidden_layers", m.layers());
  c.set("num_attention_heads", m.heads());
  c.set("num_key_value_heads", m.heads());
  c.set("q_lora_rank", a.q_lora_rank() > 0 ? json::Value(a.q_lora_rank()) : json::Value());
  c.set("kv_lora_rank", a.kv_lora_rank());
  c.set("qk_nope_head_dim", a.qk_nope_head_dim());
  c.set("qk_rope_head_dim", a.qk_rope_head_dim());
  c.set("v_head_dim", a.v_head_dim());
  c.set("head_dim", a.qk_rope_head_dim());  // what transformers derives (the RoPE width)
  moe_fields(c, m);
  c.set("num_nextn_predict_layers", m.mtp_depth());
  c.set("hidden_act", "silu");
  c.set("max_position_embeddings", max_positions);
  c.set("rope_theta", num(m.rope_theta()));
  c.set("rope_scaling", rope_scaling_json(m.rope_scaling()));
  c.set("rope_interleave", true);  // our q/k RoPE dims are interleaved pairs, as DeepSeek's
  c.set("rms_norm_eps", num(m.norm_eps()));
  c.set("initializer_range", num(m.init_std()));
  c.set("attention_bias", false);
  c.set("attention_dropout", 0.0);
  c.set("tie_word_embeddings", false);
  c.set("use_cache", true);
  c.set("torch_dtype", torch_dtype);
  return json::write(c, 2) + "\n";
}

Status export_folder(const ckpt::Loaded& l, const std::string& out_dir, const Options& opt) {
  if (opt.dtype != "bf16" && opt.dtype != "fp32" && opt.dtype != "fp8")
    return FP8_INVALID("--dtype={}: expected bf16, fp32 or fp8", opt.dtype);
  const bool bf16 = opt.dtype != "fp32";
  const ckpt::Manifest& man = l.manifest();
  FP8_ASSIGN_OR_RETURN(config::Config cfg, parse_config_text(man.config, "manifest config"));
  apply_defaults(cfg);
  const config::Model& m = cfg.model();
  warn_group_score(m);
  warn_latent_norm_eps(m);
  FP8_ASSIGN_OR_RETURN(std::vector<Mapped> ts, tensor_map(m));
  if (opt.ema) {  // each weight's moving average in its place (router biases are not averaged)
    for (Mapped& t : ts) {
      for (std::string& src : t.sources) {
        const ckpt::TensorRecord* r = man.find(src);
        if (r && r->kind == ckpt::Kind::kParam) src += ".ema";
      }
    }
  }
  std::set<std::string> used;
  const ckpt::Kind weights = opt.ema ? ckpt::Kind::kEma : ckpt::Kind::kParam;
  for (const Mapped& t : ts) FP8_RETURN_IF_ERROR(check_sources(man, t, weights, used));
  for (const ckpt::TensorRecord& r : man.tensors) {
    const bool model = r.kind == weights || r.kind == ckpt::Kind::kRouterBias;
    if (model && !used.count(r.name))
      return FP8_INVALID("hf export: checkpoint tensor '{}' has no DeepseekV3 name", r.name);
  }
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) return FP8_ERROR(Code::kInternal, "cannot create {}: {}", out_dir, ec.message());
  uint64_t total = 0;
  const auto shards =
      plan_shards(ts, opt.dtype, std::max<uint64_t>(opt.max_shard_bytes, 1), &total);
  // fp8: the weights as the run's FP8 forward quantizes them (128x128 blocks, its scale rule)
  const kernels::QuantParams qp{kernels::Fp8Format::kE4M3, cfg.precision().pow2_scales()};
  json::Value weight_map = json::Value::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    safetensors::Writer w;
    const std::string file = shard_name(s, shards.size());
    for (size_t i : shards[s]) {
      const Mapped& t = ts[i];
      const Store st = store_of(t, opt.dtype);
      if (st == Store::kFp8) {
        std::vector<float> v;
        FP8_RETURN_IF_ERROR(assemble(l, t, bf16, &v).status());
        const int64_t R = t.shape[0], C = t.shape[1], RB = blocks(R), CB = blocks(C);
        std::vector<uint8_t> codes(size_t(R * C));
        std::vector<float> scales(
            size_t(kernels::scale_count(kernels::Granularity::k128x128, R, C)));
        if (kernels::quantize(v.data(), R, C, kernels::Granularity::k128x128, qp, codes.data(),
                              scales.data()) != 0) {
          return FP8_INVALID("hf export: '{}' has non-finite values; FP8 cannot hold them", t.name);
        }
        std::vector<uint8_t> sb(size_t(RB * CB) * 4);  // [RB][CB]: the padded rows dropped
        for (int64_t rb = 0; rb < RB; ++rb)
          std::memcpy(sb.data() + rb * CB * 4, scales.data() + rb * kernels::pad4(CB), CB * 4);
        FP8_RETURN_IF_ERROR(w.add(t.name, "F8_E4M3", t.shape, std::move(codes)));
        FP8_RETURN_IF_ERROR(w.add(t.name + "_scale_inv", "F32", {RB, CB}, std::move(sb)));
        weight_map.set(t.name, file);
        weight_map.set(t.name + "_scale_inv", file);
        continue;
      }
      FP8_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, assemble(l, t, bf16));
      FP8_RETURN_IF_ERROR(
          w.add(t.name, st == Store::kBF16 ? "BF16" : "F32", t.shape, std::move(bytes)));
      weight_map.set(t.name, file);
    }
    w.set_metadata("format", "pt");  // transformers refuses safetensors metadata without it
    FP8_RETURN_IF_ERROR(w.write((fs::path(out_dir) / file).string()));
  }
  if (shards.size() > 1) {
    json::Value idx = json::Value::object();
    idx.set("metadata", json::Value::object()).set("total_size", total);
    idx.set("weight_map", std::move(weight_map));
    FP8_RETURN_IF_ERROR(
        write_text(fs::path(out_dir) / "model.safetensors.index.json", json::write(idx, 2) + "\n"));
  }
  FP8_ASSIGN_OR_RETURN(std::string cj,
                       config_json(m, cfg.train().seq_len(), bf16 ? "bfloat16" : "float32"));
  if (opt.dtype == "fp8") {  // DeepSeek-V3's release config.json says how its weights are stored
    FP8_ASSIGN_OR_RETURN(json::Value j, json::parse(cj, "config.json"));
    json::Value q = json::Value::object();
    q.set("activation_scheme", "dynamic");
    q.set("fmt", "e4m3");
    q.set("quant_method", "fp8");
    json::Value& bs = q.set("weight_block_size", json::Value::array());
    bs.push_back(128);
    bs.push_back(128);
    j.set("quantization_config", std::move(q));
    cj = json::write(j, 2) + "\n";
  }
  return write_text(fs::path(out_dir) / "config.json", cj);
}

}  // namespace fp8pipe::hf
