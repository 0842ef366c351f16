#include "core/model/decode.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>

namespace fp8pipe::model {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// The logits of rows [0, rows) on the host.
Result<std::vector<float>> host_logits(ModelCtx& c, const Tensor& logits) {
  FP8_ASSIGN_OR_RETURN(Tensor h, c.be->to_host(logits));
  const float* p = h.data_as<float>();
  return std::vector<float>(p, p + h.numel());
}

// A one-row view (row r) of h [n, hidden].
Tensor row_of(const Tensor& h, int64_t r) { return h.slice_rows(r, r + 1); }

}  // namespace

double TokenDist::prob(int32_t id) const {
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] == id) return p[i];
  return 0.0;
}

TokenDist token_dist(const float* logits, int64_t V, float temperature, int64_t top_k,
                     float top_p) {
  TokenDist d;
  if (temperature <= 0.0f) {
    d.ids = {static_cast<int32_t>(std::max_element(logits, logits + V) - logits)};
    d.p = {1.0};
    return d;
  }
  std::vector<int32_t> ids(V);
  std::iota(ids.begin(), ids.end(), 0);
  const int64_t k = top_k > 0 ? std::min(top_k, V) : V;
  std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  std::vector<double> w(k);
  const double top = logits[ids[0]];
  for (int64_t i = 0; i < k; ++i) w[i] = std::exp((logits[ids[i]] - top) / temperature);
  const double total = std::accumulate(w.begin(), w.end(), 0.0);
  int64_t kept = k;  // nucleus: the fewest leading ids reaching top_p of the mass
  if (top_p < 1.0f) {
    double mass = 0;
    for (kept = 0; kept < k && mass < top_p * total;) mass += w[kept++];
  }
  const double sum = std::accumulate(w.begin(), w.begin() + kept, 0.0);
  d.ids.assign(ids.begin(), ids.begin() + kept);
  for (int64_t i = 0; i < kept; ++i) d.p.push_back(w[i] / sum);
  return d;
}

int32_t sample(const TokenDist& d, double u) {
  for (size_t i = 0; i < d.ids.size(); ++i) {
    if ((u -= d.p[i]) < 0) return d.ids[i];
  }
  return d.ids.back();
}

int32_t pick_token(const float* logits, int64_t V, float temperature, int64_t top_k, float top_p,
                   double u) {
  return sample(token_dist(logits, V, temperature, top_k, top_p), u);
}

std::pair<int32_t, bool> verify_draft(const TokenDist& p, const TokenDist& q, int32_t draft,
                                      double u_accept, double u_resample) {
  const double pd = p.prob(draft), qd = q.prob(draft);
  if (qd > 0 && u_accept < std::min(1.0, pd / qd)) return {draft, true};
  TokenDist r;  // norm(max(0, p - q)), in p's order
  double sum = 0;
  for (size_t i = 0; i < p.ids.size(); ++i) {
    const double w = std::max(0.0, p.p[i] - q.prob(p.ids[i]));
    if (w > 0) {
      r.ids.push_back(p.ids[i]);
      r.p.push_back(w);
      sum += w;
    }
  }
  if (sum <= 0) return {sample(p, u_resample), false};  // p == q: rejection has probability 0
  for (double& w : r.p) w /= sum;
  return {sample(r, u_resample), false};
}

Result<GenerateResult> generate(ModelCtx& c, Model& m, const std::vector<int32_t>& prompt,
                                const GenerateOptions& o) {
  const int64_t P = static_cast<int64_t>(prompt.size()), V = m.config().vocab_size();
  if (P == 0) return FP8_INVALID("generate: the prompt is empty (at least one token)");
  if (o.max_new_tokens < 0) {
    return FP8_INVALID("generate: max_new_tokens {} must be >= 0", o.max_new_tokens);
  }
  for (int32_t t : prompt) {
    if (t < 0 || t >= V) return FP8_INVALID("generate: prompt token {} outside [0, {})", t, V);
  }
  if (!(o.top_p > 0.0f && o.top_p <= 1.0f)) {
    return FP8_INVALID("generate: top_p {} must be in (0, 1]", o.top_p);
  }
  if (o.speculative && m.config().mtp_depth() < 1) {
    return FP8_INVALID("generate: speculative decoding needs an MTP module (model.mtp_depth is 0)");
  }
  const bool inference = c.inference;
  c.inference = true;
  struct Restore {
    ModelCtx& c;
    bool v;
    ~Restore() { c.inference = v; }
  } restore{c, inference};

  GenerateResult r;
  // Positions: the prompt, the new tokens, and one draft row beyond them.
  FP8_ASSIGN_OR_RETURN(KvCache cache, m.new_cache(P + o.max_new_tokens + 2, o.latent_cache));
  std::mt19937_64 rng(o.seed);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  auto dist = [&](const std::vector<float>& lg, int64_t row) {
    return token_dist(lg.data() + row * V, V, o.temperature, o.top_k, o.top_p);
  };
  auto pick = [&](const std::vector<float>& lg, int64_t row) {
    return sample(dist(lg, row), unif(rng));
  };
  auto emit = [&](int32_t t) {  // true: generation ends here
    r.tokens.push_back(t);
    if (o.on_token) o.on_token(t);
    return std::find(o.stop.begin(), o.stop.end(), t) != o.stop.end() ||
           static_cast<int64_t>(r.tokens.size()) >= o.max_new_tokens;
  };

  auto t0 = Clock::now();
  // only last rows' logits are computed and read: a long prompt's [P, vocab] never exists
  FP8_ASSIGN_OR_RETURN(DecodeOut st, m.decode(c, prompt, 0, cache, 1));
  FP8_ASSIGN_OR_RETURN(auto lg, host_logits(c, st.logits));
  int64_t L = P;
  int32_t next = pick(lg, 0);
  int32_t draft = -1;
  TokenDist q;          // the distribution the draft was drawn from
  if (o.speculative) {  // MTP positions 0..P-1 read (h^0_j, t_{j+1}), the last one `next`
    std::vector<int32_t> shifted(prompt.begin() + 1, prompt.end());
    shifted.push_back(next);
    FP8_ASSIGN_OR_RETURN(DecodeOut ms, m.mtp_decode(c, 1, st.h, shifted, 0, cache, 1));
    FP8_ASSIGN_OR_RETURN(auto ml, host_logits(c, ms.logits));
    q = dist(ml, 0);
    draft = sample(q, unif(rng));
  }
  r.prefill_s = seconds_since(t0);
  r.cache_bytes_per_position = cache.bytes_per_position();
  t0 = Clock::now();
  if (o.max_new_tokens == 0) return r;
  while (!emit(next)) {
    if (!o.speculative) {
      FP8_ASSIGN_OR_RETURN(st, m.decode(c, {next}, L, cache));
      FP8_ASSIGN_OR_RETURN(lg, host_logits(c, st.logits));
      ++L;
      ++r.main_steps;
      next = pick(lg, 0);
      continue;
    }
    // Verify: rows (next, draft) at positions L, L+1. Both main and MTP caches hold L positions.
    FP8_ASSIGN_OR_RETURN(st, m.decode(c, {next, draft}, L, cache));
    FP8_ASSIGN_OR_RETURN(lg, host_logits(c, st.logits));
    ++r.main_steps;
    ++r.drafted;
    const double u_accept = unif(rng), u_resample = unif(rng);
    const auto [tok, kept] = verify_draft(dist(lg, 0), q, draft, u_accept, u_resample);
    DecodeOut ms;
    if (kept) {  // both rows stand: two tokens this step
      ++r.accepted;
      if (emit(draft)) break;
      next = pick(lg, 1);
      FP8_ASSIGN_OR_RETURN(ms, m.mtp_decode(c, 1, st.h, {draft, next}, L, cache, 1));
      L += 2;
    } else {  // the draft's row is dropped (its cache row is overwritten next step)
      next = tok;
      FP8_ASSIGN_OR_RETURN(ms, m.mtp_decode(c, 1, row_of(st.h, 0), {next}, L, cache));
      L += 1;
    }
    FP8_ASSIGN_OR_RETURN(auto ml, host_logits(c, ms.logits));
    q = dist(ml, 0);
    draft = sample(q, unif(rng));
  }
  r.decode_s = seconds_since(t0);
  return r;
}

}  // namespace fp8pipe::model
