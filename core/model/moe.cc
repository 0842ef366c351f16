// DeepSeek-V3 mixture of experts (moe.h): forward = route -> dispatch -> experts -> combine, each a
// function so the expert-parallel all-to-all can later sit between them; the routing bookkeeping
// (stable sort, capacity, gate and balance-loss gradients) is small [n, E] work done on the host.
#include "core/model/moe.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace fp8pipe::model {
namespace {

template <typename T>
Result<Tensor> upload(ModelCtx& c, const std::vector<T>& v, Shape shape, DType dt) {
  auto cpu = make_cpu_backend();
  FP8_ASSIGN_OR_RETURN(Tensor h, cpu->empty(shape, dt));
  std::copy(v.begin(), v.end(), h.data_as<T>());
  if (c.be->device() == Device::kCpu) return h;
  FP8_ASSIGN_OR_RETURN(Tensor d, c.be->empty(shape, dt));
  FP8_RETURN_IF_ERROR(c.be->copy(h, d));
  return d;
}

template <typename T>
Result<std::vector<T>> download(ModelCtx& c, const Tensor& t) {
  FP8_ASSIGN_OR_RETURN(Tensor h, c.be->to_host(t));
  const T* p = h.data_as<T>();
  return std::vector<T>(p, p + h.numel());
}

}  // namespace

struct MoE::Impl {
  struct Routing {              // host copies of router_topk's outputs
    std::vector<float> scores;  // [n, E] sigmoid affinities s
    std::vector<int32_t> idx;   // [n, K] selected experts
    std::vector<float> gates;   // [n, K] s_sel / sum(s_sel) * route_scale
  };
  struct Dispatch {
    std::vector<int64_t> offset;  // [E + 1] first buffer row of each expert
    std::vector<int32_t> assign;  // [m] flat assignment t * K + k of each buffer row
    Tensor tokens;                // i32 [m] token of each buffer row
    Tensor weights;               // f32 [m] gate of each buffer row
    Tensor x;                     // [m, hidden] gathered inputs ordered by expert (the EP send)
    int64_t dropped = 0;
  };
  struct Saved {
    int64_t B = 0, T = 0;
    Routing r;
    Dispatch d;
    Tensor out;                // [m, hidden] expert outputs (the gate gradient needs them)
    std::vector<uint8_t> ran;  // experts whose SwiGLU ran (and keeps state) for this mb
  };

  int64_t hidden = 0, E = 0, K = 0, n_groups = 1, max_groups = 1;
  float route_scale = 1.0f, alpha = 0.0f, capacity_factor = 0.0f;
  Linear router;
  Param bias;
  std::unique_ptr<SwiGLU> shared;
  std::vector<SwiGLU> experts;
  MoeStepStats stats;
  PerMicrobatch<Saved> saved;

  Result<Routing> route(ModelCtx& c, int mb, const Tensor& x);
  Result<Dispatch> dispatch(ModelCtx& c, const Tensor& x, const Routing& r) const;
  Result<Tensor> run_experts(ModelCtx& c, int mb, Saved& s);
  Result<Tensor> combine(ModelCtx& c, int mb, const Tensor& x, const Saved& s);
  double balance_loss(const Routing& r, int64_t B, int64_t T, double scale,
                      std::vector<double>* ds) const;
  Status experts_backward(ModelCtx& c, int mb, const Saved& s, const Tensor& dy,
                          std::vector<double>& dgate, Tensor& dx);
  Status router_backward(ModelCtx& c, int mb, const Saved& s, const std::vector<double>& dgate,
                         Tensor& dx);
  int64_t rows_of(const Dispatch& d, int64_t e) const { return d.offset[e + 1] - d.offset[e]; }
};

// ---- forward phases -----------------------------------------------------------------------------

// Router logits [n, E] (BF16/FP32 Linear, never FP8), then sigmoid + biased node-limited top-k.
Result<MoE::Impl::Routing> MoE::Impl::route(ModelCtx& c, int mb, const Tensor& x) {
  const int64_t n = x.rows();
  FP8_ASSIGN_OR_RETURN(Tensor logits, router.forward(c, mb, x));
  FP8_ASSIGN_OR_RETURN(Tensor scores, new_f32(c, n, E));
  FP8_ASSIGN_OR_RETURN(Tensor idx, c.be->empty({n, K}, DType::kI32));
  FP8_ASSIGN_OR_RETURN(Tensor gates, new_f32(c, n, K));
  FP8_RETURN_IF_ERROR(c.be->router_topk(logits, bias.value, K, n_groups, max_groups, route_scale,
                                        scores, idx, gates));
  Routing r;
  FP8_ASSIGN_OR_RETURN(r.scores, download<float>(c, scores));
  FP8_ASSIGN_OR_RETURN(r.idx, download<int32_t>(c, idx));
  FP8_ASSIGN_OR_RETURN(r.gates, download<float>(c, gates));
  return r;
}

// Per-expert token lists by a stable counting sort of (expert, token); with a capacity factor an
// expert keeps its first ceil(cf * n * K / E) assignments in token order and the rest are dropped.
Result<MoE::Impl::Dispatch> MoE::Impl::dispatch(ModelCtx& c, const Tensor& x,
                                                const Routing& r) const {
  const int64_t n = x.rows(), nk = n * K;
  const int64_t capacity =
      capacity_factor > 0
          ? static_cast<int64_t>(std::ceil(static_cast<double>(capacity_factor) * nk / E))
          : std::numeric_limits<int64_t>::max();
  std::vector<int64_t> count(E, 0);
  for (int64_t a = 0; a < nk; ++a) ++count[r.idx[a]];
  Dispatch d;
  d.offset.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t kept = std::min(count[e], capacity);
    d.dropped += count[e] - kept;
    d.offset[e + 1] = d.offset[e] + kept;
  }
  const int64_t m = d.offset[E];
  d.assign.resize(m);
  std::vector<int64_t> next(d.offset.begin(), d.offset.end() - 1);
  for (int64_t a = 0; a < nk; ++a) {  // token-major order: the sort is stable in token order
    const int32_t e = r.idx[a];
    if (next[e] < d.offset[e + 1]) d.assign[next[e]++] = static_cast<int32_t>(a);
  }
  std::vector<int32_t> tok(m);
  std::vector<float> w(m);
  for (int64_t i = 0; i < m; ++i) {
    tok[i] = static_cast<int32_t>(d.assign[i] / K);
    w[i] = r.gates[d.assign[i]];
  }
  FP8_ASSIGN_OR_RETURN(d.tokens, upload(c, tok, {m}, DType::kI32));
  FP8_ASSIGN_OR_RETURN(d.weights, upload(c, w, {m}, DType::kF32));
  FP8_ASSIGN_OR_RETURN(d.x, new_f32(c, m, hidden));
  if (m > 0) FP8_RETURN_IF_ERROR(c.be->gather_rows(x, d.tokens, d.x));
  return d;
}

// Each routed expert on its contiguous slice of the buffer; experts without tokens do not run
// (so they keep no saved state for this micro-batch).
Result<Tensor> MoE::Impl::run_experts(ModelCtx& c, int mb, Saved& s) {
  const Dispatch& d = s.d;
  FP8_ASSIGN_OR_RETURN(Tensor out, new_f32(c, d.offset[E], hidden));
  s.ran.assign(E, 0);
  for (int64_t e = 0; e < E; ++e) {
    if (rows_of(d, e) == 0) continue;
    FP8_ASSIGN_OR_RETURN(Tensor ye,
                         experts[e].forward(c, mb, d.x.slice_rows(d.offset[e], d.offset[e + 1])));
    Tensor dst = out.slice_rows(d.offset[e], d.offset[e + 1]);
    FP8_RETURN_IF_ERROR(c.be->copy(ye, dst));
    s.ran[e] = 1;
  }
  return out;
}

// y = sum over kept assignments of gate * expert output (back in token order) + shared(x).
Result<Tensor> MoE::Impl::combine(ModelCtx& c, int mb, const Tensor& x, const Saved& s) {
  FP8_ASSIGN_OR_RETURN(Tensor y, new_zeros(c, x.rows(), hidden));
  if (s.d.offset[E] > 0) {
    FP8_RETURN_IF_ERROR(c.be->scatter_add_rows(s.out, s.d.tokens, s.d.weights, y));
  }
  if (shared) {
    FP8_ASSIGN_OR_RETURN(Tensor ys, shared->forward(c, mb, x));
    FP8_RETURN_IF_ERROR(c.be->axpy(1.0f, ys, y));
  }
  if (c.precision != Precision::kFP32) FP8_RETURN_IF_ERROR(c.be->round_bf16(y, y));
  return y;
}

// Sequence-wise balance loss of one micro-batch: the mean over its B sequences (rows b*T ..
// b*T+T-1) of alpha * sum_i f_i P_i, with f_i = E/(K*T) * #tokens selecting i and
// P_i = mean_t s_i / sum_j s_j. The trainer weights it like the main loss (the mean over the
// micro-batch). With ds, adds scale * d(loss)/d(scores) [n, E] (f_i counts selections: constant).
double MoE::Impl::balance_loss(const Routing& r, int64_t B, int64_t T, double scale,
                               std::vector<double>* ds) const {
  if (alpha == 0.0f) return 0.0;
  double total = 0.0;
  std::vector<double> f(E), P(E);
  for (int64_t b = 0; b < B; ++b) {
    std::fill(f.begin(), f.end(), 0.0);
    std::fill(P.begin(), P.end(), 0.0);
    for (int64_t t = b * T; t < (b + 1) * T; ++t) {
      for (int64_t k = 0; k < K; ++k) f[r.idx[t * K + k]] += static_cast<double>(E) / (K * T);
      const float* s = &r.scores[t * E];
      double S = 0.0;
      for (int64_t e = 0; e < E; ++e) S += s[e];
      for (int64_t e = 0; e < E; ++e) P[e] += s[e] / S / T;
    }
    for (int64_t e = 0; e < E; ++e) total += alpha * f[e] * P[e];
    if (!ds) continue;
    // d(alpha/B * sum_i f_i s_i/(T*S))/d s_j = alpha/(B*T*S) * (f_j - sum_i f_i s_i/S).
    for (int64_t t = b * T; t < (b + 1) * T; ++t) {
      const float* s = &r.scores[t * E];
      double S = 0.0, fs = 0.0;
      for (int64_t e = 0; e < E; ++e) S += s[e];
      for (int64_t e = 0; e < E; ++e) fs += f[e] * s[e] / S;
      const double coef = scale * alpha / (static_cast<double>(B) * T * S);
      for (int64_t e = 0; e < E; ++e) (*ds)[t * E + e] += coef * (f[e] - fs);
    }
  }
  return total / static_cast<double>(B);
}

// ---- backward phases ----------------------------------------------------------------------------

// Routed part: dgate[a] = <dy_t, out_a> for each kept assignment a of token t; each expert gets
// gate * dy_t on its slice; its input gradient is scattered back to token order into dx.
Status MoE::Impl::experts_backward(ModelCtx& c, int mb, const Saved& s, const Tensor& dy,
                                   std::vector<double>& dgate, Tensor& dx) {
  const Dispatch& d = s.d;
  const int64_t m = d.offset[E];
  if (m == 0) return Status::Ok();
  FP8_ASSIGN_OR_RETURN(Tensor dyr, new_f32(c, m, hidden));
  FP8_RETURN_IF_ERROR(c.be->gather_rows(dy, d.tokens, dyr));
  FP8_ASSIGN_OR_RETURN(std::vector<float> dyh, download<float>(c, dyr));
  FP8_ASSIGN_OR_RETURN(std::vector<float> oh, download<float>(c, s.out));
  for (int64_t i = 0; i < m; ++i) {
    double dot = 0.0;
    for (int64_t j = 0; j < hidden; ++j) dot += double{dyh[i * hidden + j]} * oh[i * hidden + j];
    dgate[d.assign[i]] = dot;
  }
  // Row scaling by the gates: scatter with identity rows.
  std::vector<int32_t> iota(m);
  for (int64_t i = 0; i < m; ++i) iota[i] = static_cast<int32_t>(i);
  FP8_ASSIGN_OR_RETURN(Tensor ident, upload(c, iota, {m}, DType::kI32));
  FP8_ASSIGN_OR_RETURN(Tensor dout, new_zeros(c, m, hidden));
  FP8_RETURN_IF_ERROR(c.be->scatter_add_rows(dyr, ident, d.weights, dout));
  FP8_ASSIGN_OR_RETURN(Tensor dxr, new_f32(c, m, hidden));  // the combine-side EP buffer
  for (int64_t e = 0; e < E; ++e) {
    if (!s.ran[e]) continue;
    const int64_t lo = d.offset[e], hi = d.offset[e + 1];
    FP8_ASSIGN_OR_RETURN(Tensor dxe, experts[e].backward_input(c, mb, dout.slice_rows(lo, hi)));
    Tensor dst = dxr.slice_rows(lo, hi);
    FP8_RETURN_IF_ERROR(c.be->copy(dxe, dst));
  }
  return c.be->scatter_add_rows(dxr, d.tokens, Tensor(), dx);
}

// Router part: gates g_k = rs * s_k / Z (Z = sum of the selected s) give, by the quotient rule,
// ds_j = (rs * dg_j - sum_k dg_k g_k) / Z for selected j; the balance loss adds its ds (times the
// trainer's loss scale); dlogits = ds * s (1 - s); the router Linear turns that into dx.
Status MoE::Impl::router_backward(ModelCtx& c, int mb, const Saved& s,
                                  const std::vector<double>& dgate, Tensor& dx) {
  const Routing& r = s.r;
  const int64_t n = s.B * s.T;
  std::vector<double> ds(n * E, 0.0);
  balance_loss(r, s.B, s.T, c.loss_scale, &ds);
  for (int64_t t = 0; t < n; ++t) {
    double Z = 0.0, dot = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      Z += r.scores[t * E + r.idx[t * K + k]];
      dot += dgate[t * K + k] * r.gates[t * K + k];
    }
    for (int64_t k = 0; k < K; ++k) {
      ds[t * E + r.idx[t * K + k]] += (route_scale * dgate[t * K + k] - dot) / Z;
    }
  }
  std::vector<float> dl(n * E);
  for (int64_t i = 0; i < n * E; ++i) {
    const double sc = r.scores[i];
    dl[i] = static_cast<float>(ds[i] * sc * (1.0 - sc));
  }
  FP8_ASSIGN_OR_RETURN(Tensor dlogits, upload(c, dl, {n, E}, DType::kF32));
  FP8_ASSIGN_OR_RETURN(Tensor dxr, router.backward_input(c, mb, dlogits));
  return c.be->axpy(1.0f, dxr, dx);
}

// ---- public interface ---------------------------------------------------------------------------

Status MoE::init(ModelCtx& c, const std::string& prefix, const config::Model& m, uint64_t seed) {
  impl_ = std::make_shared<Impl>();
  Impl& p = *impl_;
  const config::Moe& moe = m.moe();
  p.hidden = m.hidden();
  p.E = moe.routed_experts();
  p.K = moe.topk();
  p.n_groups = moe.n_groups();
  p.max_groups = moe.max_nodes() > 0 ? moe.max_nodes() : moe.n_groups();
  p.route_scale = moe.route_scale();
  p.alpha = moe.seq_aux_alpha();
  p.capacity_factor = moe.capacity_factor();
  if (p.E < 1 || p.K < 1 || p.K > p.E || moe.expert_hidden() < 1) {
    return FP8_INVALID(
        "{}: MoE needs routed_experts >= 1, 1 <= topk <= routed_experts and "
        "expert_hidden >= 1 (got {}, {}, {})",
        prefix, p.E, p.K, moe.expert_hidden());
  }
  const float init_std = m.init_std();
  FP8_RETURN_IF_ERROR(p.router.init(c, prefix + ".gate.weight", p.hidden, p.E, seed, init_std,
                                    /*fp8=*/false));
  p.bias.decay = false;
  FP8_RETURN_IF_ERROR(
      init_param(*c.be, p.bias, prefix + ".gate.e_score_correction_bias", {p.E}, seed, 0.0f));
  if (moe.shared_experts() > 0) {
    p.shared = std::make_unique<SwiGLU>();
    FP8_RETURN_IF_ERROR(p.shared->init(c, prefix + ".shared_experts", p.hidden,
                                       int64_t{moe.expert_hidden()} * moe.shared_experts(), seed,
                                       init_std));
  }
  p.experts.resize(p.E);
  for (int64_t e = 0; e < p.E; ++e) {
    FP8_RETURN_IF_ERROR(p.experts[e].init(c, prefix + ".experts." + std::to_string(e), p.hidden,
                                          moe.expert_hidden(), seed, init_std, /*expert=*/true));
  }
  reset_stats();
  return Status::Ok();
}

Result<Tensor> MoE::forward(ModelCtx& c, int mb, const Tensor& x, int64_t B, int64_t T) {
  Impl& p = *impl_;
  if (x.rows() != B * T || x.cols() != p.hidden) {
    return FP8_INVALID("moe: input {} is not [B*T = {}, hidden = {}]", x.describe(), B * T,
                       p.hidden);
  }
  Impl::Saved& s = p.saved.put(mb);
  s = Impl::Saved{};
  s.B = B;
  s.T = T;
  FP8_ASSIGN_OR_RETURN(s.r, p.route(c, mb, x));
  FP8_ASSIGN_OR_RETURN(s.d, p.dispatch(c, x, s.r));
  FP8_ASSIGN_OR_RETURN(s.out, p.run_experts(c, mb, s));
  FP8_ASSIGN_OR_RETURN(Tensor y, p.combine(c, mb, x, s));
  for (int64_t e = 0; e < p.E; ++e) p.stats.load[e] += p.rows_of(s.d, e);
  p.stats.dropped += s.d.dropped;
  p.stats.aux_loss += p.balance_loss(s.r, B, T, 0.0, nullptr);
  return y;
}

// dx = shared'(dy) + routed experts' dx (gather/scatter transposes) + router dx (gates + balance).
Result<Tensor> MoE::backward_input(ModelCtx& c, int mb, const Tensor& dy) {
  Impl& p = *impl_;
  FP8_ASSIGN_OR_RETURN(Impl::Saved * s, p.saved.get(mb, "moe"));
  Tensor dx;
  if (p.shared) {
    FP8_ASSIGN_OR_RETURN(dx, p.shared->backward_input(c, mb, dy));
  } else {
    FP8_ASSIGN_OR_RETURN(dx, new_zeros(c, dy.rows(), p.hidden));
  }
  std::vector<double> dgate(s->r.idx.size(), 0.0);  // dropped assignments keep 0
  FP8_RETURN_IF_ERROR(p.experts_backward(c, mb, *s, dy, dgate, dx));
  FP8_RETURN_IF_ERROR(p.router_backward(c, mb, *s, dgate, dx));
  s->d.x = Tensor();  // activations no longer needed; the W pass needs only `ran`
  s->out = Tensor();
  return dx;
}

Status MoE::backward_weight(ModelCtx& c, int mb) {
  Impl& p = *impl_;
  FP8_ASSIGN_OR_RETURN(Impl::Saved * s, p.saved.get(mb, "moe"));
  FP8_RETURN_IF_ERROR(p.router.backward_weight(c, mb));
  if (p.shared) FP8_RETURN_IF_ERROR(p.shared->backward_weight(c, mb));
  for (int64_t e = 0; e < p.E; ++e) {
    if (s->ran[e]) FP8_RETURN_IF_ERROR(p.experts[e].backward_weight(c, mb));
  }
  p.saved.erase(mb);
  return Status::Ok();
}

std::vector<Param*> MoE::params() {
  Impl& p = *impl_;
  std::vector<Param*> ps = {&p.router.weight()};
  if (p.shared) {
    for (Param* q : p.shared->params()) ps.push_back(q);
  }
  for (SwiGLU& e : p.experts) {
    for (Param* q : e.params()) ps.push_back(q);
  }
  return ps;
}

Param& MoE::bias() { return impl_->bias; }
MoeStepStats& MoE::stats() { return impl_->stats; }

void MoE::reset_stats() {
  impl_->stats = MoeStepStats{};
  impl_->stats.load.assign(impl_->E, 0);
}

}  // namespace fp8pipe::model
