// Text generation from a trained model over a key/value cache (fp8pipe generate): a prefill of
// the prompt, then one position per step; or DeepSeek-V3's use of its MTP module for speculative
// decoding (TR §5.4.3): MTP depth 1 drafts the token after next from the main model's last hidden
// state, and the next main step verifies the draft and computes the token after it in the same
// call (two rows), so an accepted draft yields two tokens per main step. Greedy drafts are
// accepted when they equal the main model's choice, so the text is that of plain greedy decoding;
// sampled drafts by speculative sampling's rule (verify_draft), so the text is distributed as
// plain sampling's. Several prompts decode as one batch (generate_batch).
#pragma once

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "core/model/transformer.h"

namespace fp8pipe::model {

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  float temperature = 0.0f;  // 0: greedy (argmax, the lowest id on ties)
  int64_t top_k = 0;         // sampling from the k most likely tokens (0: all)
  float top_p = 1.0f;        // ... then the fewest most likely whose probabilities sum to >= top_p
  uint64_t seed = 0;         // the sampler's random stream
  bool speculative = false;  // MTP depth 1 drafts
  bool latent_cache = true;  // MLA's latent cache (AttnCache)
  DType cache_dtype = DType::kF32;  // fp32 or bf16 (AttnCache)
  std::vector<int32_t> stop;        // generation ends after any of these tokens
  // called with (sequence, token) as each token is decided (streaming)
  std::function<void(size_t, int32_t)> on_token;
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated after the prompt
  int64_t main_steps = 0;       // main-model forwards after the prefill
  int64_t drafted = 0, accepted = 0;
  int64_t cache_bytes_per_position = 0;
  double prefill_s = 0, decode_s = 0;  // wall time (the backend synchronized at each token)
};

// The sampling distribution of one row of logits (fp32 [V] on the host): greedy, the argmax alone
// (the lowest id on ties); else softmax at `temperature` over the top_k most likely (0: all), cut
// to the fewest most likely whose probabilities (among those) sum to at least top_p (nucleus
// sampling). Candidates most likely first, probabilities summing to 1.
struct TokenDist {
  std::vector<int32_t> ids;
  std::vector<double> p;
  double prob(int32_t id) const;  // 0 outside the candidates
};
TokenDist token_dist(const float* logits, int64_t V, float temperature, int64_t top_k, float top_p);
// A token drawn with the uniform u in [0, 1) (candidates in order).
int32_t sample(const TokenDist& d, double u);
int32_t pick_token(const float* logits, int64_t V, float temperature, int64_t top_k, float top_p,
                   double u);
// Speculative sampling's verification (Leviathan et al. 2023, Chen et al. 2023): a draft drawn
// from q is kept with probability min(1, p(draft) / q(draft)) (u_accept), else a token is drawn
// from norm(max(0, p - q)) (u_resample); either way the result is distributed as p. Greedy is the
// case of one-candidate p and q: the draft is kept iff it is p's argmax, else that argmax.
// Returns the token and whether it is the draft.
std::pair<int32_t, bool> verify_draft(const TokenDist& p, const TokenDist& q, int32_t draft,
                                      double u_accept, double u_resample);

Result<GenerateResult> generate(ModelCtx& c, Model& m, const std::vector<int32_t>& prompt,
                                const GenerateOptions& o);
// Several prompts decoded together: each step is one forward over every unfinished sequence's
// rows (the projections, MoE and head batched; attention per sequence over its own cache).
// Sequence s draws from the random stream seed + s, so its tokens are those it gets alone with
// that seed. Timings are the batch's.
Result<std::vector<GenerateResult>> generate_batch(ModelCtx& c, Model& m,
                                                   const std::vector<std::vector<int32_t>>& prompts,
                                                   const GenerateOptions& o);

}  // namespace fp8pipe::model
