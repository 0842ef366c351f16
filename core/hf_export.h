// Export of a training checkpoint as a Hugging Face DeepseekV3 folder (config.json plus
// safetensors shards named as DeepSeek-V3 ships them), so trained models load with transformers,
// vLLM or SGLang. The name mapping is a pure function of the model config (docs/HF_EXPORT.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "configs/fp8pipe.pb.h"
#include "core/checkpoint.h"
#include "core/status.h"

namespace fp8pipe::hf {

// One tensor of the exported folder: its HF name and shape, and the fp8pipe global tensors it is
// made of, concatenated along the last dimension in order (one source except MTP's eh_proj =
// [eh_proj_e | eh_proj_h]; several HF tensors may share a source: MTP's copies of embed/norm/head).
struct Mapped {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<std::string> sources;
  bool keep_f32 = false;  // e_score_correction_bias stays F32 as DeepSeek ships it
  bool linear = false;    // a Linear layer's weight: F8_E4M3 + `<name>_scale_inv` in an fp8 export
};

// Every tensor of the DeepseekV3 checkpoint for model config `m` (MLA only; MHA is an error).
// MTP module k (0-based) is layer num_hidden_layers + k.
Result<std::vector<Mapped>> tensor_map(const config::Model& m);

// config.json (DeepseekV3 schema) for `m`; torch_dtype "bfloat16" or "float32".
// max_positions fills max_position_embeddings (the training sequence length).
Result<std::string> config_json(const config::Model& m, int64_t max_positions,
                                const std::string& torch_dtype);

struct Options {
  // Tensor dtype: "bf16", "fp32", or "fp8": DeepSeek-V3's release format, the Linear weights as
  // F8_E4M3 with 128x128 block dequantization scales `<name>_scale_inv` (F32 [ceil(R/128),
  // ceil(C/128)]) quantized as the run's FP8 forward quantizes them (precision.pow2_scales), the
  // rest BF16, and config.json's quantization_config.
  std::string dtype = "bf16";
  uint64_t max_shard_bytes = 5ull << 30;  // split into model-0000i-of-0000N files above this
  bool ema = false;  // the weights' moving average ("<name>.ema", optim.ema_decay) instead
};

// Writes config.json, model.safetensors (or shards plus model.safetensors.index.json) into
// `out_dir` (created if needed) from a verified, opened checkpoint. Shapes are checked against
// the manifest; every kParam/kRouterBias tensor must be used.
Status export_folder(const ckpt::Loaded& l, const std::string& out_dir, const Options& opt);

}  // namespace fp8pipe::hf
