// Text generation from a trained model over a key/value cache (fp8pipe generate): a prefill of
// the prompt, then one position per step; or DeepSeek-V3's use of its MTP module for speculative
// decoding (TR §5.4.3): MTP depth 1 drafts the token after next from the main model's last hidden
// state, and the next main step verifies the draft and computes the token after it in the same
// call (two rows), so an accepted draft yields two tokens per main step. Greedy drafts are
// accepted when they equal the main model's choice, so the text is that of plain greedy decoding.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "core/model/transformer.h"

namespace fp8pipe::model {

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  float temperature = 0.0f;   // 0: greedy (argmax, the lowest id on ties)
  int64_t top_k = 0;          // sampling from the k most likely tokens (0: all)
  float top_p = 1.0f;         // ... then the fewest most likely whose probabilities sum to >= top_p
  uint64_t seed = 0;          // the sampler's random stream
  bool speculative = false;   // MTP depth 1 drafts (greedy only)
  bool latent_cache = true;   // MLA's latent cache (AttnCache)
  std::vector<int32_t> stop;  // generation ends after any of these tokens
  std::function<void(int32_t)> on_token;  // called with each token as it is decided (streaming)
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated after the prompt
  int64_t main_steps = 0;       // main-model forwards after the prefill
  int64_t drafted = 0, accepted = 0;
  int64_t cache_bytes_per_position = 0;
  double prefill_s = 0, decode_s = 0;  // wall time (the backend synchronized at each token)
};

// Picks the next token from one row of logits (fp32 [V] on the host): greedy, or sampled at
// `temperature` with the uniform draw u in [0, 1) from the top_k most likely (0: all), cut to the
// fewest most likely whose probabilities (among those) sum to at least top_p (nucleus sampling).
int32_t pick_token(const float* logits, int64_t V, float temperature, int64_t top_k, float top_p,
                   double u);

Result<GenerateResult> generate(ModelCtx& c, Model& m, const std::vector<int32_t>& prompt,
                                const GenerateOptions& o);

}  // namespace fp8pipe::model
