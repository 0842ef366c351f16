#include "core/hf_import.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/hf_export.h"
#include "core/json.h"
#include "core/log.h"
#include "kernels/cpu/fp8_codec.h"

namespace fp8pipe::hf {
namespace {

namespace fs = std::filesystem;

Result<std::string> read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return FP8_ERROR(Code::kNotFound, "{}: cannot open", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// config.json key vs the fp8pipe field it must equal. A null key (q_lora_rank) reads as 0.
struct Expect {
  const char* key;
  int64_t want;
  const char* field;
};

bool has_moe(const config::Model& m) { return m.has_moe() && m.moe().routed_experts() > 0; }

Status check_config(const json::Value& c, const config::Model& m, const std::string& path) {
  std::vector<Expect> ints = {
      {"vocab_size", m.vocab_size(), "model.vocab_size"},
      {"hidden_size", m.hidden(), "model.hidden"},
      {"num_hidden_layers", m.layers(), "model.layers"},
      {"num_attention_heads", m.heads(), "model.heads"},
      {"q_lora_rank", m.mla().q_lora_rank(), "model.mla.q_lora_rank"},
      {"kv_lora_rank", m.mla().kv_lora_rank(), "model.mla.kv_lora_rank"},
      {"qk_nope_head_dim", m.mla().qk_nope_head_dim(), "model.mla.qk_nope_head_dim"},
      {"qk_rope_head_dim", m.mla().qk_rope_head_dim(), "model.mla.qk_rope_head_dim"},
      {"v_head_dim", m.mla().v_head_dim(), "model.mla.v_head_dim"},
  };
  if (has_moe(m)) {
    const config::Moe& e = m.moe();
    ints.push_back({"first_k_dense_replace", m.dense_layers(), "model.dense_layers"});
    ints.push_back({"n_routed_experts", e.routed_experts(), "model.moe.routed_experts"});
    ints.push_back({"n_shared_experts", e.shared_experts(), "model.moe.shared_experts"});
    ints.push_back({"moe_intermediate_size", e.expert_hidden(), "model.moe.expert_hidden"});
  }
  if (!has_moe(m) || m.dense_layers() > 0) {
    ints.push_back({"intermediate_size", m.ffn_hidden(), "model.ffn_hidden"});
  }
  std::vector<std::string> bad;
  for (const Expect& x : ints) {
    const json::Value* v = c.find(x.key);
    const int64_t got = v == nullptr || v->is_null() ? 0 : v->is_number() ? v->as_int() : -1;
    if (v == nullptr || (!v->is_null() && !v->is_int()) || got != x.want) {
      bad.push_back(
          fmt::format("{} is {}, {}={}", x.key, v ? json::write(*v) : "missing", x.field, x.want));
    }
  }
  // MTP modules: the folder may hold more than the model uses (they are not read), not fewer.
  const json::Value* mtp = c.find("num_nextn_predict_layers");
  const int64_t have_mtp = mtp && mtp->is_int() ? mtp->as_int() : 0;
  if (have_mtp < m.mtp_depth()) {
    bad.push_back(fmt::format("num_nextn_predict_layers is {}, model.mtp_depth={} needs as many",
                              have_mtp, m.mtp_depth()));
  }
  if (!bad.empty()) {
    return FP8_INVALID("{}: the folder's model is not this config's: {}", path,
                       fmt::join(bad, "; "));
  }
  // Values that change what the model computes but not what it loads: said, not refused.
  auto differs = [&](const char* key, double want, const char* field) {
    const json::Value* v = c.find(key);
    if (v && v->is_number() && std::abs(v->as_double() - want) > 1e-6 * std::abs(want)) {
      log::warn("{}: {} is {}, this run's {}={}", path, key, v->as_double(), field, want);
    }
  };
  differs("rope_theta", m.rope_theta(), "model.rope_theta");
  const json::Value* rs = c.find("rope_scaling");
  const json::Value* factor = rs && rs->is_object() ? rs->find("factor") : nullptr;
  const double theirs = factor && factor->is_number() ? factor->as_double() : 1.0;
  const double ours = std::max(1.0, double(m.rope_scaling().factor()));
  if (std::abs(theirs - ours) > 1e-6 * ours) {
    log::warn(
        "{}: rope_scaling factor is {} (YaRN when > 1), this run's model.rope_scaling.factor={}",
        path, theirs, ours);
  }
  differs("rms_norm_eps", m.norm_eps(), "model.norm_eps");
  if (has_moe(m)) {
    differs("num_experts_per_tok", m.moe().topk(), "model.moe.topk");
    differs("routed_scaling_factor", m.moe().route_scale(), "model.moe.route_scale");
  }
  return Status::Ok();
}

}  // namespace

bool is_hf_folder(const std::string& dir) {
  std::error_code ec;
  const fs::path d(dir);
  return fs::is_regular_file(d / "config.json", ec) &&
         (fs::is_regular_file(d / "model.safetensors", ec) ||
          fs::is_regular_file(d / "model.safetensors.index.json", ec));
}

Result<std::unique_ptr<Folder>> Folder::open(const std::string& dir, const config::Model& m) {
  auto f = std::make_unique<Folder>();
  f->dir_ = dir;
  const fs::path d(dir);
  FP8_ASSIGN_OR_RETURN(std::string text, read_text((d / "config.json").string()));
  FP8_ASSIGN_OR_RETURN(json::Value cfg, json::parse(text, (d / "config.json").string()));
  FP8_RETURN_IF_ERROR(check_config(cfg, m, (d / "config.json").string()));

  // Shards: the index's weight_map names each tensor's file; else the one model.safetensors.
  std::vector<std::string> files;
  std::error_code ec;
  if (fs::is_regular_file(d / "model.safetensors.index.json", ec)) {
    const std::string ip = (d / "model.safetensors.index.json").string();
    FP8_ASSIGN_OR_RETURN(std::string itext, read_text(ip));
    FP8_ASSIGN_OR_RETURN(json::Value index, json::parse(itext, ip));
    const json::Value* wm = index.find("weight_map");
    if (wm == nullptr || !wm->is_object()) return FP8_INVALID("{}: no weight_map object", ip);
    for (const auto& [key, file] : wm->members()) {
      if (!file.is_string()) return FP8_INVALID("{}: weight_map[{}] is not a file name", ip, key);
      if (std::find(files.begin(), files.end(), file.as_string()) == files.end())
        files.push_back(file.as_string());
    }
  } else {
    files.push_back("model.safetensors");
  }
  for (const std::string& name : files) {
    FP8_ASSIGN_OR_RETURN(auto r, safetensors::Reader::open((d / name).string()));
    f->files_.push_back(std::make_unique<safetensors::Reader>(std::move(r)));
    for (const safetensors::TensorView& t : f->files_.back()->tensors()) {
      f->where_.emplace(t.name, f->files_.back().get());
    }
  }

  // The inverse of the export's mapping: each fp8pipe tensor from the first HF tensor made of it
  // (the main embed/head/norm, not the MTP layers' copies); eh_proj's halves by columns.
  FP8_ASSIGN_OR_RETURN(std::vector<Mapped> map, tensor_map(m));
  for (const Mapped& mp : map) {
    const int64_t parts = static_cast<int64_t>(mp.sources.size());
    const int64_t cols = mp.shape.back() / parts;
    for (int64_t i = 0; i < parts; ++i) {
      f->sources_.emplace(mp.sources[i],
                          Source{mp.name, parts > 1 ? i * cols : 0, parts > 1 ? cols : 0});
    }
  }
  return f;
}

Result<const safetensors::TensorView*> Folder::find(const std::string& hf) const {
  auto it = where_.find(hf);
  if (it == where_.end()) return FP8_ERROR(Code::kNotFound, "{}: no tensor '{}'", dir_, hf);
  return it->second->get(hf);
}

// t as fp32 (row-major, its own shape), FP8 through its `_scale_inv` 128x128 block scales.
Status Folder::decode(const safetensors::TensorView& t, std::vector<float>& out) const {
  const int64_t n = t.numel();
  out.resize(static_cast<size_t>(n));
  if (t.dtype == "F32") {
    std::memcpy(out.data(), t.data, static_cast<size_t>(n) * 4);
  } else if (t.dtype == "BF16") {
    for (int64_t i = 0; i < n; ++i) {
      uint16_t b;
      std::memcpy(&b, t.data + 2 * i, 2);
      out[i] = kernels::bf16_to_float(b);
    }
  } else if (t.dtype == "F8_E4M3" || t.dtype == "F8_E5M2") {
    const auto fmt = t.dtype == "F8_E4M3" ? kernels::Fp8Format::kE4M3 : kernels::Fp8Format::kE5M2;
    if (t.shape.size() != 2) {
      return FP8_INVALID("{}: FP8 tensor '{}' {} is not a matrix", dir_, t.name, t.shape_str());
    }
    const int64_t R = t.shape[0], C = t.shape[1], RB = (R + 127) / 128, CB = (C + 127) / 128;
    FP8_ASSIGN_OR_RETURN(const safetensors::TensorView* s, find(t.name + "_scale_inv"));
    if (s->dtype != "F32" || s->shape != std::vector<int64_t>{RB, CB}) {
      return FP8_INVALID(
          "{}: '{}' is {} {}; DeepSeek's 128x128 block scales of '{}' {} are F32 "
          "[{}, {}]",
          dir_, s->name, s->dtype, s->shape_str(), t.name, t.shape_str(), RB, CB);
    }
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t c = 0; c < C; ++c) {
        float sc;
        std::memcpy(&sc, s->data + 4 * ((r / 128) * CB + c / 128), 4);
        out[r * C + c] = kernels::fp8_to_float(t.data[r * C + c], fmt) * sc;
      }
    }
  } else {
    return FP8_INVALID("{}: tensor '{}' is {} (readable: F32, BF16, F8_E4M3, F8_E5M2)", dir_,
                       t.name, t.dtype);
  }
  ++dtypes_[t.dtype];
  return Status::Ok();
}

Status Folder::read(const std::string& ours, const std::vector<int64_t>& shape, float* out) const {
  auto it = sources_.find(ours);
  if (it == sources_.end()) {
    return FP8_INVALID("{}: fp8pipe tensor '{}' has no DeepseekV3 counterpart", dir_, ours);
  }
  const Source& src = it->second;
  FP8_ASSIGN_OR_RETURN(const safetensors::TensorView* t, find(src.hf));
  std::vector<int64_t> want = shape;
  if (src.cols > 0) want.back() = t->shape.empty() ? 0 : t->shape.back();  // the whole eh_proj
  if (src.cols > 0 && (t->shape.size() != 2 || src.cols != shape.back() ||
                       t->shape[0] != shape[0] || src.col0 + src.cols > t->shape[1])) {
    return FP8_INVALID("{}: '{}' {} does not hold '{}' {} as columns {}..{}", dir_, src.hf,
                       t->shape_str(), ours, fmt::format("[{}]", fmt::join(shape, ", ")), src.col0,
                       src.col0 + src.cols - 1);
  }
  if (t->shape != want) {
    return FP8_INVALID("{}: '{}' (fp8pipe '{}') has shape {}, this model needs [{}]", dir_, src.hf,
                       ours, t->shape_str(), fmt::join(want, ", "));
  }
  std::vector<float> all;
  FP8_RETURN_IF_ERROR(decode(*t, all));
  if (src.cols == 0) {
    std::memcpy(out, all.data(), all.size() * sizeof(float));
    return Status::Ok();
  }
  const int64_t R = t->shape[0], C = t->shape[1];
  for (int64_t r = 0; r < R; ++r) {
    std::memcpy(out + r * src.cols, all.data() + r * C + src.col0, src.cols * sizeof(float));
  }
  return Status::Ok();
}

}  // namespace fp8pipe::hf
