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

// The values of an fp32 tensor (logits) on the host.
Result<std::vector<float>> host_logits(ModelCtx& c, const Tensor& logits) {
  FP8_ASSIGN_OR_RETURN(Tensor h, c.be->to_host(logits));
  const float* p = h.data_as<float>();
  return std::vector<float>(p, p + h.numel());
}

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

Result<std::vector<GenerateResult>> generate_batch(ModelCtx& c, Model& m,
                                                   const std::vector<std::vector<int32_t>>& prompts,
                                                   const GenerateOptions& o) {
  const int64_t V = m.config().vocab_size();
  if (prompts.empty()) return FP8_INVALID("generate: no prompt");
  for (const auto& prompt : prompts) {
    if (prompt.empty()) return FP8_INVALID("generate: a prompt is empty (at least one token)");
    for (int32_t t : prompt) {
      if (t < 0 || t >= V) {
        return FP8_INVALID(
            "generate: prompt token {} is outside the model's vocabulary [0, {}) "
            "(model.vocab_size; "
            "fp8pipe generate reads a prompt's bytes as byte-level tokens 0..255)",
            t, V);
      }
    }
  }
  if (o.max_new_tokens < 0) {
    return FP8_INVALID("generate: max_new_tokens {} must be >= 0", o.max_new_tokens);
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

  // One sequence's state. Its random stream is seed + its index, so a sequence draws the same
  // tokens in any batch.
  struct Seq {
    KvCache cache;
    int64_t L = 0;  // positions in the main (and MTP) caches
    int32_t next = -1, draft = -1;
    TokenDist q;  // the distribution the draft was drawn from
    std::mt19937_64 rng;
    bool done = false;
    GenerateResult r;
  };
  const size_t S = prompts.size();
  std::vector<Seq> seq(S);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  for (size_t s = 0; s < S; ++s) {
    const int64_t P = static_cast<int64_t>(prompts[s].size());
    // Positions: the prompt, the new tokens, and one draft row beyond them.
    FP8_ASSIGN_OR_RETURN(seq[s].cache,
                         m.new_cache(P + o.max_new_tokens + 2, o.latent_cache, o.cache_dtype));
    seq[s].rng.seed(o.seed + s);
    seq[s].L = P;
  }
  auto dist = [&](const std::vector<float>& lg, int64_t row) {
    return token_dist(lg.data() + row * V, V, o.temperature, o.top_k, o.top_p);
  };
  auto emit = [&](size_t s, int32_t t) {  // true: sequence s ends here
    GenerateResult& r = seq[s].r;
    r.tokens.push_back(t);
    if (o.on_token) o.on_token(s, t);
    seq[s].done = std::find(o.stop.begin(), o.stop.end(), t) != o.stop.end() ||
                  static_cast<int64_t>(r.tokens.size()) >= o.max_new_tokens;
    return seq[s].done;
  };
  // The MTP step of `rows` (sequence, rows of h in order, tokens): its drafts and their q.
  struct MtpRows {
    std::vector<DecodeSeq> seqs;
    std::vector<size_t> owner;
    std::vector<int32_t> h_rows;
  };
  auto mtp_step = [&](const Tensor& h, MtpRows& mr) -> Status {
    if (mr.seqs.empty()) return Status::Ok();
    FP8_ASSIGN_OR_RETURN(Tensor idx, upload_i32(c, mr.h_rows));
    FP8_ASSIGN_OR_RETURN(Tensor hp, new_f32(c, static_cast<int64_t>(mr.h_rows.size()), h.cols()));
    FP8_RETURN_IF_ERROR(c.be->gather_rows(h, idx, hp));
    FP8_ASSIGN_OR_RETURN(DecodeOut ms, m.mtp_decode(c, 1, hp, mr.seqs));
    FP8_ASSIGN_OR_RETURN(auto ml, host_logits(c, ms.logits));
    for (size_t j = 0; j < mr.owner.size(); ++j) {
      Seq& q = seq[mr.owner[j]];
      q.q = dist(ml, static_cast<int64_t>(j));
      q.draft = sample(q.q, unif(q.rng));
    }
    return Status::Ok();
  };

  auto t0 = Clock::now();
  {  // the prefill: every prompt in one forward, only each one's last row through the head
    std::vector<DecodeSeq> ds;
    for (size_t s = 0; s < S; ++s) ds.push_back({prompts[s], 0, &seq[s].cache, 1});
    FP8_ASSIGN_OR_RETURN(DecodeOut st, m.decode(c, ds));
    FP8_ASSIGN_OR_RETURN(auto lg, host_logits(c, st.logits));
    for (size_t s = 0; s < S; ++s) seq[s].next = sample(dist(lg, s), unif(seq[s].rng));
    if (o.speculative) {  // MTP positions 0..P-1 read (h^0_j, t_{j+1}), the last one `next`
      MtpRows mr;
      int32_t r0 = 0;
      for (size_t s = 0; s < S; ++s) {
        std::vector<int32_t> shifted(prompts[s].begin() + 1, prompts[s].end());
        shifted.push_back(seq[s].next);
        mr.seqs.push_back({std::move(shifted), 0, &seq[s].cache, 1});
        mr.owner.push_back(s);
        for (size_t j = 0; j < prompts[s].size(); ++j) mr.h_rows.push_back(r0++);
      }
      FP8_RETURN_IF_ERROR(mtp_step(st.h, mr));
    }
  }
  const double prefill_s = seconds_since(t0);
  t0 = Clock::now();
  std::vector<size_t> active;
  for (size_t s = 0; s < S; ++s) {
    if (o.max_new_tokens > 0 && !emit(s, seq[s].next)) active.push_back(s);
  }
  while (!active.empty()) {
    std::vector<DecodeSeq> ds;
    for (size_t s : active) {
      std::vector<int32_t> rows = {seq[s].next};
      if (o.speculative) rows.push_back(seq[s].draft);  // verify at positions L, L+1
      ds.push_back({std::move(rows), seq[s].L, &seq[s].cache, -1});
    }
    FP8_ASSIGN_OR_RETURN(DecodeOut st, m.decode(c, ds));
    FP8_ASSIGN_OR_RETURN(auto lg, host_logits(c, st.logits));
    MtpRows mr;
    const int64_t per = o.speculative ? 2 : 1;  // rows a sequence this step
    for (size_t j = 0; j < active.size(); ++j) {
      Seq& q = seq[active[j]];
      const int64_t row = static_cast<int64_t>(j) * per;
      ++q.r.main_steps;
      if (!o.speculative) {
        ++q.L;
        q.next = sample(dist(lg, row), unif(q.rng));
        continue;
      }
      ++q.r.drafted;
      const double u_accept = unif(q.rng), u_resample = unif(q.rng);
      const auto [tok, kept] = verify_draft(dist(lg, row), q.q, q.draft, u_accept, u_resample);
      if (kept) {  // both rows stand: two tokens this step
        ++q.r.accepted;
        if (emit(active[j], q.draft)) continue;
        q.next = sample(dist(lg, row + 1), unif(q.rng));
        mr.seqs.push_back({{q.draft, q.next}, q.L, &q.cache, 1});
        mr.h_rows.insert(mr.h_rows.end(),
                         {static_cast<int32_t>(row), static_cast<int32_t>(row + 1)});
        q.L += 2;
      } else {  // the draft's row is dropped (its cache row is overwritten next step)
        q.next = tok;
        mr.seqs.push_back({{q.next}, q.L, &q.cache, 1});
        mr.h_rows.push_back(static_cast<int32_t>(row));
        q.L += 1;
      }
      mr.owner.push_back(active[j]);
    }
    FP8_RETURN_IF_ERROR(mtp_step(st.h, mr));
    std::vector<size_t> still;
    for (size_t s : active) {
      if (!seq[s].done && !emit(s, seq[s].next)) still.push_back(s);
    }
    active = std::move(still);
  }
  const double decode_s = seconds_since(t0);
  std::vector<GenerateResult> out;
  for (Seq& q : seq) {
    q.r.prefill_s = prefill_s;
    q.r.decode_s = decode_s;
    q.r.cache_bytes_per_position = q.cache.bytes_per_position();
    out.push_back(std::move(q.r));
  }
  return out;
}

Result<GenerateResult> generate(ModelCtx& c, Model& m, const std::vector<int32_t>& prompt,
                                const GenerateOptions& o) {
  FP8_ASSIGN_OR_RETURN(auto r, generate_batch(c, m, {prompt}, o));
  return std::move(r.front());
}

}  // namespace fp8pipe::model
