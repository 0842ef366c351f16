// Reading a Hugging Face DeepseekV3 folder (config.json plus safetensors shards, as DeepSeek ships
// its checkpoints and `fp8pipe ckpt export --format hf` writes them) by fp8pipe global tensor
// name: the inverse of hf::tensor_map (core/hf_export.h). Tensors may be F32 or BF16, or
// F8_E4M3 / F8_E5M2 with DeepSeek's block dequantization scales `<name>_scale_inv` (F32,
// [ceil(R/128), ceil(C/128)]: w = decode(code) x scale_inv of its 128x128 block), as DeepSeek-V3's
// released weights are. Used by checkpoint.init_from and `fp8pipe eval --checkpoint DIR`.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "configs/fp8pipe.pb.h"
#include "core/safetensors.h"
#include "core/status.h"

namespace fp8pipe::hf {

// True when `dir` looks like an HF model folder: config.json and model.safetensors or its index.
bool is_hf_folder(const std::string& dir);

class Folder {
 public:
  // Opens the shards and checks config.json against `m`: every field the name mapping or the
  // shapes depend on must agree (errors name the config.json key, both values and the fp8pipe
  // field).
  static Result<std::unique_ptr<Folder>> open(const std::string& dir, const config::Model& m);

  // fp8pipe tensor `ours` (e.g. "layers.3.attn.wq_a.weight", "mtp.0.eh_proj_h.weight") as fp32
  // into out[numel(shape)]; its shape must be `shape`.
  Status read(const std::string& ours, const std::vector<int64_t>& shape, float* out) const;

  const std::string& dir() const { return dir_; }
  // The dtypes of the tensors read so far, counted ("F8_E4M3": 120, "BF16": 14).
  const std::map<std::string, int64_t>& dtypes_read() const { return dtypes_; }

 private:
  struct Source {
    std::string hf;    // HF tensor name
    int64_t col0 = 0;  // columns [col0, col0 + cols) of it (eh_proj halves); cols 0 = all
    int64_t cols = 0;
  };
  Result<const safetensors::TensorView*> find(const std::string& hf) const;
  Status decode(const safetensors::TensorView& t, std::vector<float>& out) const;

  std::string dir_;
  std::vector<std::unique_ptr<safetensors::Reader>> files_;
  std::map<std::string, const safetensors::Reader*> where_;  // HF name -> its shard
  std::map<std::string, Source> sources_;                    // fp8pipe name -> HF tensor
  mutable std::map<std::string, int64_t> dtypes_;
};

}  // namespace fp8pipe::hf
