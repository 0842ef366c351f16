// DeepSeek-V3 mixture of experts (moe.h): forward = route -> dispatch -> experts -> combine. Kept
// assignments travel as records (source, assignment, expert, gate, row) with the token rows over
// one all-to-all hop (flat) or two (two-level: once per node across nodes, then inside the node);
// the owner applies the gates and sums per row, so combine is the transpose of dispatch (rows go
// back and are summed). Records are host work (capacity, sorting, exchanges). Without an ep group
// and without a capacity factor the dispatch is direct instead: the assignments are sorted by
// expert on the backend (sort_assignments) and only the per-expert counts come to the host, with
// the same bits as records would give. Either way the router's backward (gates' quotient rule and
// the balance loss) runs on the backend (router_grad). Rows cross ranks in DeepSeek-V3's formats:
// FP8 toward the experts (fp8_dispatch; bf16 in BF16), bf16 back from them (bf16_combine).
#include "core/model/moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>

#include "core/model/experts.h"

namespace fp8pipe::model {
namespace {

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
  // One kept (token, expert) assignment on its way to the expert's owner: its source ep rank,
  // flat assignment a = t * K + k there, global expert, gate, and the row of the buffer of the
  // rank now holding the record that carries the token's hidden state.
  struct Rec {
    int32_t src = 0, a = 0, e = 0, row = 0;
    float g = 0;
  };
  // One all-to-all hop of token rows: a row goes once to each rank that one of its records goes
  // to. Forward moves rows (gather by send_idx); the transpose returns rows and sums them back
  // (scatter-add by send_idx), which is how combine and the input gradient come home.
  struct Hop {
    std::vector<int32_t> send_idx;              // input row of each sent row, by destination
    std::vector<int64_t> send_rows, recv_rows;  // rows per ep rank
    int64_t n_in = 0, n_out = 0;
  };
  struct Saved {
    int64_t B = 0, T = 0;
    Tensor scores, idx, gates_sel;  // router_topk's outputs on the backend ([n, E], [n, K] x2)
    Routing r;                      // host copies of what the host work needs (route())
    // Direct dispatch (no ep group, no capacity factor): the assignments sorted by expert on the
    // backend (sort_assignments), no records; slot (i32 [n*K]) is each assignment's place.
    bool direct = false;
    Tensor slot;
    Tensor f;  // direct, alpha != 0: the balance counts (f64 [B, E]) from Backend::balance_stats
    std::vector<Hop> hops;        // 1 (flat) or 2 (two-level: cross-node, then inside the node)
    std::vector<Rec> recs;        // the records this rank's experts serve, ordered (e, src, a)
    std::vector<int64_t> offset;  // [E_local + 1] first buffer row of each local expert
    // ModelCtx::expert_row_align (plan_padding): each expert's first row in the zero-padded
    // layout [E_local + 1] (the experts' row groups) and, when any expert needs padding, each
    // record's padded row (pad_idx, i32 [m]) and each padded row's record or -1 (pad_src, i32
    // [padded rows]): both directions are gathers (gather_rows_scaled: -1 is a zero row).
    std::vector<int64_t> pad_offset;
    RowGroups groups;
    Tensor pad_idx, pad_src;
    bool padded = false;
    Tensor rows;   // i32 [m] last-hop row of each record
    Tensor gates;  // f32 [m]
    Tensor out;    // [m, hidden] unweighted expert outputs (for dgate), bf16 (hold_bf16)
  };

  int64_t hidden = 0, E = 0, K = 0, n_groups = 1, max_groups = 1;
  int64_t E_local = 0, e_begin = 0;  // this rank's experts: [e_begin, e_begin + E_local)
  int P = 1, me = 0, per_node = 1;   // ep group size, this rank, ep ranks per node
  float route_scale = 1.0f, alpha = 0.0f, capacity_factor = 0.0f;
  Linear router;
  Param bias;
  std::unique_ptr<SwiGLU> shared;
  RoutedExperts experts;  // local experts only
  MoeStepStats stats;
  Backend* be = nullptr;
  // Direct dispatch with alpha != 0: the step's balance-loss sum (f64 [1]) stays on the backend
  // until stats() reads it, so the forward downloads nothing but the expert counts.
  Tensor aux_dev;
  PerMicrobatch<Saved> saved;

  Status route(ModelCtx& c, int mb, const Tensor& x, Saved& s);
  Result<Tensor> dispatch_direct(ModelCtx& c, int mb, const Tensor& x, Saved& s);
  std::vector<Rec> records(const Routing& r, int64_t n, int64_t* dropped) const;
  int owner(int32_t e) const { return static_cast<int>(e / E_local); }
  Status exchange(ModelCtx& c, const void* send, std::span<const int64_t> sc, void* recv,
                  std::span<const int64_t> rc, int64_t row_bytes) const;
  Result<std::vector<int64_t>> exchange_counts(ModelCtx& c, const std::vector<int64_t>& send,
                                               int per_peer) const;
  // Rows held in tensors; what goes to other ranks is counted in stats (leg; `rows`: also count
  // the rows, false for FP8 scales that travel beside their codes).
  Status exchange_rows(ModelCtx& c, const Tensor& send, std::span<const int64_t> sc, Tensor& recv,
                       std::span<const int64_t> rc, int64_t row_bytes, int leg, bool rows = true);
  // fp32 rows [.., hidden] exchanged in the wire format `wire` (fp32, or bf16: cast before and
  // widened after, exactly).
  Status exchange_wire(ModelCtx& c, const Tensor& send, std::span<const int64_t> sc, Tensor& recv,
                       std::span<const int64_t> rc, DType wire, int leg);
  // The wire format of fp32 rows (FP8 rows: quantize_rows, move_fp8_rows). Toward the experts
  // in the forward: bf16 in BF16 with fp8_dispatch (the experts read bf16 operands: the same
  // bits), else fp32. The rest (combine, the backward's output gradient unless FP8, its input
  // gradient): bf16 with ModelCtx::bf16_combine outside FP32. fp32 without an ep group.
  DType dispatch_wire(const ModelCtx& c) const {
    return c.ep && c.fp8_dispatch && c.precision == Precision::kBF16 ? DType::kBF16 : DType::kF32;
  }
  DType return_wire(const ModelCtx& c) const {
    return c.ep && c.bf16_combine && c.precision != Precision::kFP32 ? DType::kBF16 : DType::kF32;
  }
  // Tokens as FP8 on their way to the experts (ModelCtx::fp8_dispatch): quantized 1x128 once at
  // their source; codes [rows, hidden] and scales in the VEC128 layout of `groups` (one group at
  // the source, then one per sending rank).
  struct Fp8Rows {
    Tensor codes, scales;
    RowGroups groups;
  };
  Status hop_plan(ModelCtx& c, int64_t n_in, std::vector<Rec>& recs, int which, Hop& hop,
                  int64_t& stats_cross) const;
  Result<Tensor> move_rows(ModelCtx& c, const Tensor& x, const Hop& hop, DType wire, int leg);
  Result<Fp8Rows> quantize_rows(ModelCtx& c, const Tensor& x) const;
  Result<Fp8Rows> move_fp8_rows(ModelCtx& c, const Fp8Rows& x, const Hop& hop, int leg);
  Result<Tensor> return_rows(ModelCtx& c, const Tensor& y, const Hop& hop, DType wire, int leg);
  Result<Tensor> run_experts(ModelCtx& c, int mb, const Tensor& x_last, const Fp8Rows* fx,
                             Saved& s);
  Result<Tensor> expert_rows(ModelCtx& c, int mb, const Tensor& x_last, const Fp8Rows* fx,
                             Saved& s);
  Status plan_padding(ModelCtx& c, Saved& s) const;
  Result<Tensor> pad_rows(ModelCtx& c, const Saved& s, const Tensor& rows) const;
  Result<Tensor> unpad_rows(ModelCtx& c, const Saved& s, const Tensor& padded) const;
  Status return_dgates(ModelCtx& c, const Saved& s, const std::vector<double>& dg,
                       std::vector<double>& dgate) const;
  std::vector<double> balance_counts(const Routing& r, int64_t B, int64_t T) const;
  double balance_loss(const Routing& r, int64_t B, int64_t T) const;
  Status experts_backward(ModelCtx& c, int mb, const Saved& s, const Tensor& dy, Tensor& dgate,
                          Tensor& dx);
  Status router_backward(ModelCtx& c, int mb, const Saved& s, const Tensor& dgate, Tensor& dx);
};

// ---- forward phases -----------------------------------------------------------------------------

// Router logits [n, E] (BF16/FP32 Linear, never FP8), then sigmoid + biased node-limited top-k,
// kept on the backend. Direct: the balance loss's counts and value on the backend too. Records:
// the host gets the selection and gates, and the scores for the balance loss (alpha != 0).
Status MoE::Impl::route(ModelCtx& c, int mb, const Tensor& x, Saved& s) {
  const int64_t n = x.rows();
  FP8_ASSIGN_OR_RETURN(Tensor logits, router.forward(c, mb, x));
  FP8_ASSIGN_OR_RETURN(s.scores, new_f32(c, n, E));
  FP8_ASSIGN_OR_RETURN(s.idx, c.be->empty({n, K}, DType::kI32));
  FP8_ASSIGN_OR_RETURN(s.gates_sel, new_f32(c, n, K));
  FP8_RETURN_IF_ERROR(c.be->router_topk(logits, bias.value, K, n_groups, max_groups, route_scale,
                                        s.scores, s.idx, s.gates_sel));
  if (s.direct) {
    if (alpha == 0.0f) return Status::Ok();
    FP8_ASSIGN_OR_RETURN(s.f, c.be->empty({s.B, E}, DType::kF64));
    if (!aux_dev.defined()) {
      FP8_ASSIGN_OR_RETURN(aux_dev, c.be->zeros({1}, DType::kF64));
    }
    return c.be->balance_stats(s.scores, s.idx, s.B, s.T, alpha, s.f, aux_dev);
  }
  FP8_ASSIGN_OR_RETURN(s.r.idx, download<int32_t>(c, s.idx));
  FP8_ASSIGN_OR_RETURN(s.r.gates, download<float>(c, s.gates_sel));
  if (alpha != 0.0f) {
    FP8_ASSIGN_OR_RETURN(s.r.scores, download<float>(c, s.scores));
  }
  return Status::Ok();
}

// Direct dispatch: the n*K assignments sorted by expert on the backend; only the E counts come
// to the host (the expert loop needs them). The same order, rows and gates as the records' path
// on one rank without drops ((expert, assignment) order, each token's row of x itself).
Result<Tensor> MoE::Impl::dispatch_direct(ModelCtx& c, int mb, const Tensor& x, Saved& s) {
  const int64_t nk = x.rows() * K;
  FP8_ASSIGN_OR_RETURN(Tensor order, c.be->empty({nk}, DType::kI32));
  FP8_ASSIGN_OR_RETURN(s.rows, c.be->empty({nk}, DType::kI32));
  FP8_ASSIGN_OR_RETURN(s.slot, c.be->empty({nk}, DType::kI32));
  FP8_ASSIGN_OR_RETURN(Tensor counts, c.be->empty({E}, DType::kI32));
  FP8_RETURN_IF_ERROR(c.be->sort_assignments(s.idx, E, order, s.rows, s.slot, counts));
  FP8_ASSIGN_OR_RETURN(auto cnt, download<int32_t>(c, counts));
  s.offset.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    s.offset[e + 1] = s.offset[e] + cnt[e];
    stats.load[e] += cnt[e];
  }
  if (s.offset[E] != nk) {  // every selection names an expert (router_topk's contract)
    return FP8_ERROR(Code::kInternal, "moe: {} of {} assignments name no expert in [0, {})",
                     nk - s.offset[E], nk, E);
  }
  FP8_ASSIGN_OR_RETURN(s.gates, new_f32(c, nk, 1));
  FP8_ASSIGN_OR_RETURN(Tensor all_gates, s.gates_sel.reshape({nk, 1}));
  if (nk > 0) FP8_RETURN_IF_ERROR(c.be->gather_rows(all_gates, order, s.gates));
  FP8_ASSIGN_OR_RETURN(s.gates, s.gates.reshape({nk}));
  return expert_rows(c, mb, x, nullptr, s);
}

// The kept assignments in token order. With a capacity factor an expert keeps its first
// ceil(cf * n * K / E) assignments of this rank's micro-batch (token order); the rest drop.
std::vector<MoE::Impl::Rec> MoE::Impl::records(const Routing& r, int64_t n,
                                               int64_t* dropped) const {
  const int64_t nk = n * K;
  const int64_t capacity =
      capacity_factor > 0
          ? static_cast<int64_t>(std::ceil(static_cast<double>(capacity_factor) * nk / E))
          : std::numeric_limits<int64_t>::max();
  std::vector<int64_t> used(E, 0);
  std::vector<Rec> recs;
  recs.reserve(nk);
  for (int64_t a = 0; a < nk; ++a) {
    const int32_t e = r.idx[a];
    if (used[e]++ >= capacity) {
      ++*dropped;
      continue;
    }
    recs.push_back({me, static_cast<int32_t>(a), e, static_cast<int32_t>(a / K), r.gates[a]});
  }
  return recs;
}

// One all-to-all on the ep group (a copy when this rank is the whole group), waited for through
// the context's overlap hook.
Status MoE::Impl::exchange(ModelCtx& c, const void* send, std::span<const int64_t> sc, void* recv,
                           std::span<const int64_t> rc, int64_t row_bytes) const {
  if (!c.ep) {
    if (sc[0] != rc[0]) return FP8_ERROR(Code::kInternal, "moe: local exchange count mismatch");
    if (sc[0] > 0) std::memcpy(recv, send, static_cast<size_t>(sc[0] * row_bytes));
    return Status::Ok();
  }
  return c.wait(c.ep->all_to_all(send, sc, recv, rc, row_bytes));
}

// exchange() of rows of `row_bytes` held in tensors (token rows [rows, hidden] fp32 or bf16; FP8
// codes and their scales). Without an ep group the backend copies them.
Status MoE::Impl::exchange_rows(ModelCtx& c, const Tensor& send, std::span<const int64_t> sc,
                                Tensor& recv, std::span<const int64_t> rc, int64_t row_bytes,
                                int leg, bool rows) {
  for (int p = 0; c.ep && p < P; ++p) {
    if (p == me) continue;
    stats.a2a_bytes[leg] += sc[p] * row_bytes;
    if (rows) stats.a2a_rows[leg] += sc[p];
  }
  if (!c.ep) {  // this rank is the whole group: a copy on the backend
    if (sc[0] != rc[0]) return FP8_ERROR(Code::kInternal, "moe: local exchange count mismatch");
    return c.be->copy(send, recv);
  }
  if (c.ep && send.device() != Device::kCpu && !c.ep->device_buffers()) {  // host-only comm
    FP8_ASSIGN_OR_RETURN(Tensor hs, c.be->to_host(send));
    FP8_ASSIGN_OR_RETURN(Tensor hr, make_cpu_backend()->empty(recv.shape(), recv.dtype()));
    FP8_RETURN_IF_ERROR(exchange(c, hs.data(), sc, hr.data(), rc, row_bytes));
    return c.be->copy(hr, recv);
  }
  return exchange(c, send.data(), sc, recv.data(), rc, row_bytes);
}

Status MoE::Impl::exchange_wire(ModelCtx& c, const Tensor& send, std::span<const int64_t> sc,
                                Tensor& recv, std::span<const int64_t> rc, DType wire, int leg) {
  if (wire == DType::kF32) return exchange_rows(c, send, sc, recv, rc, hidden * 4, leg);
  FP8_ASSIGN_OR_RETURN(Tensor s16, c.be->empty(send.shape(), DType::kBF16));
  FP8_ASSIGN_OR_RETURN(Tensor r16, c.be->empty(recv.shape(), DType::kBF16));
  if (send.numel() > 0) FP8_RETURN_IF_ERROR(c.be->cast(send, s16));
  FP8_RETURN_IF_ERROR(exchange_rows(c, s16, sc, r16, rc, hidden * 2, leg));
  return recv.numel() > 0 ? c.be->cast(r16, recv) : Status::Ok();
}

// `per_peer` int64 counts to and from every ep rank.
Result<std::vector<int64_t>> MoE::Impl::exchange_counts(ModelCtx& c,
                                                        const std::vector<int64_t>& send,
                                                        int per_peer) const {
  std::vector<int64_t> recv(send.size()), ones(P, 1);
  FP8_RETURN_IF_ERROR(exchange(c, send.data(), ones, recv.data(), ones, 8 * per_peer));
  return recv;
}

// Hop `which` of the dispatch: records go to their next rank (flat: the expert's owner;
// two-level hop 0: the rank with this rank's local index on the owner's node, hop 1: the owner),
// each row once per destination; counts first, then the records. On return `hop` says which rows
// go where (the caller moves them: move_rows, or move_fp8_rows) and `recs` are the records that
// arrived here, their rows indexing the buffer those rows will arrive in.
Status MoE::Impl::hop_plan(ModelCtx& c, int64_t n_in, std::vector<Rec>& recs, int which, Hop& hop,
                           int64_t& stats_cross) const {
  auto dest = [&](const Rec& r) {
    const int o = owner(r.e);
    return which == 0 && c.ep_two_level && per_node < P ? o / per_node * per_node + me % per_node
                                                        : o;
  };
  hop = Hop{};
  hop.n_in = n_in;
  hop.send_rows.assign(P, 0);
  std::vector<std::vector<Rec>> by(P);
  for (const Rec& r : recs) by[dest(r)].push_back(r);
  std::vector<Rec> out_recs;
  std::vector<int64_t> counts(2 * P, 0);
  for (int p = 0; p < P; ++p) {
    std::stable_sort(by[p].begin(), by[p].end(),
                     [](const Rec& a, const Rec& b) { return a.row < b.row; });
    const int64_t base = static_cast<int64_t>(hop.send_idx.size());
    int32_t last = -1;
    for (Rec r : by[p]) {
      if (r.row != last) {
        last = r.row;
        hop.send_idx.push_back(r.row);
      }
      r.row = static_cast<int32_t>(hop.send_idx.size() - 1 - base);
      out_recs.push_back(r);
    }
    hop.send_rows[p] = static_cast<int64_t>(hop.send_idx.size()) - base;
    if (p / per_node != me / per_node) stats_cross += hop.send_rows[p];
    counts[2 * p] = hop.send_rows[p];
    counts[2 * p + 1] = static_cast<int64_t>(by[p].size());
  }
  FP8_ASSIGN_OR_RETURN(auto got, exchange_counts(c, counts, 2));
  std::vector<int64_t> send_nrec(P), recv_nrec(P), row_off(P + 1, 0);
  hop.recv_rows.assign(P, 0);
  for (int p = 0; p < P; ++p) {
    send_nrec[p] = counts[2 * p + 1];
    hop.recv_rows[p] = got[2 * p];
    recv_nrec[p] = got[2 * p + 1];
    row_off[p + 1] = row_off[p] + got[2 * p];
  }
  hop.n_out = row_off[P];
  std::vector<Rec> in_recs(std::accumulate(recv_nrec.begin(), recv_nrec.end(), int64_t{0}));
  FP8_RETURN_IF_ERROR(
      exchange(c, out_recs.data(), send_nrec, in_recs.data(), recv_nrec, sizeof(Rec)));
  int64_t i = 0;
  for (int p = 0; p < P; ++p)
    for (int64_t j = 0; j < recv_nrec[p]; ++j, ++i) in_recs[i].row += row_off[p];
  recs = std::move(in_recs);
  return Status::Ok();
}

// Rows along a hop: gathered by send_idx, exchanged; [n_in, hidden] -> [n_out, hidden].
Result<Tensor> MoE::Impl::move_rows(ModelCtx& c, const Tensor& x, const Hop& hop, DType wire,
                                    int leg) {
  const int64_t ns = static_cast<int64_t>(hop.send_idx.size());
  FP8_ASSIGN_OR_RETURN(Tensor send, new_f32(c, ns, hidden));
  if (ns > 0) {
    FP8_ASSIGN_OR_RETURN(Tensor idx, upload(c, hop.send_idx, {ns}, DType::kI32));
    FP8_RETURN_IF_ERROR(c.be->gather_rows(x, idx, send));
  }
  FP8_ASSIGN_OR_RETURN(Tensor recv, new_f32(c, hop.n_out, hidden));
  FP8_RETURN_IF_ERROR(exchange_wire(c, send, hop.send_rows, recv, hop.recv_rows, wire, leg));
  return recv;
}

Result<MoE::Impl::Fp8Rows> MoE::Impl::quantize_rows(ModelCtx& c, const Tensor& x) const {
  FP8_ASSIGN_OR_RETURN(Tensor q, c.be->quantize(x, Granularity::k1x128, c.qp));
  Fp8Rows r;
  r.scales = *q.scale();
  r.codes = q;
  FP8_ASSIGN_OR_RETURN(r.groups, make_row_groups(*c.be, {0, x.rows()}));
  return r;
}

// move_rows of FP8 rows: gathered by send_idx, grouped by destination (each destination's codes
// and scales contiguous), exchanged as two all-to-alls (hidden bytes and 4 * ceil(hidden / 128)
// bytes a row); what arrives is grouped by source.
Result<MoE::Impl::Fp8Rows> MoE::Impl::move_fp8_rows(ModelCtx& c, const Fp8Rows& x, const Hop& hop,
                                                    int leg) {
  const int64_t ns = static_cast<int64_t>(hop.send_idx.size()), KB = (hidden + 127) / 128;
  std::vector<int64_t> soff(P + 1, 0), roff(P + 1, 0);
  for (int p = 0; p < P; ++p) {
    soff[p + 1] = soff[p] + hop.send_rows[p];
    roff[p + 1] = roff[p] + hop.recv_rows[p];
  }
  FP8_ASSIGN_OR_RETURN(RowGroups sg, make_row_groups(*c.be, soff));
  FP8_ASSIGN_OR_RETURN(Tensor idx, upload(c, hop.send_idx, {ns}, DType::kI32));
  FP8_ASSIGN_OR_RETURN(GroupedFp8 sent, c.be->gather_fp8_groups(x.codes, x.scales, x.groups,
                                                                c.qp.pow2, idx, Tensor(), sg));
  Fp8Rows y;
  FP8_ASSIGN_OR_RETURN(y.codes, c.be->empty({hop.n_out, hidden}, x.codes.dtype()));
  FP8_ASSIGN_OR_RETURN(y.scales, c.be->empty({hop.n_out * KB}, DType::kF32));
  FP8_ASSIGN_OR_RETURN(y.groups, make_row_groups(*c.be, roff));
  FP8_RETURN_IF_ERROR(
      exchange_rows(c, sent.codes, hop.send_rows, y.codes, hop.recv_rows, hidden, leg));
  FP8_RETURN_IF_ERROR(exchange_rows(c, sent.scales, hop.send_rows, y.scales, hop.recv_rows, 4 * KB,
                                    leg, /*rows=*/false));
  return y;
}

// The transpose of move_rows: rows go back to their senders and are summed into the rows they
// came from (a token reaching two experts gets both contributions); [n_out] -> [n_in, hidden].
Result<Tensor> MoE::Impl::return_rows(ModelCtx& c, const Tensor& y, const Hop& hop, DType wire,
                                      int leg) {
  const int64_t ns = static_cast<int64_t>(hop.send_idx.size());
  FP8_ASSIGN_OR_RETURN(Tensor back, new_f32(c, ns, hidden));
  FP8_RETURN_IF_ERROR(exchange_wire(c, y, hop.recv_rows, back, hop.send_rows, wire, leg));
  FP8_ASSIGN_OR_RETURN(Tensor out, new_zeros(c, hop.n_in, hidden));
  if (ns > 0) {
    FP8_ASSIGN_OR_RETURN(Tensor idx, upload(c, hop.send_idx, {ns}, DType::kI32));
    FP8_RETURN_IF_ERROR(c.be->scatter_add_rows(back, idx, Tensor(), out));
  }
  return out;
}

// The owner's part: records ordered by (expert, source, assignment), each local expert on its
// contiguous slice; returns sum over a row's records of gate * expert output, per last-hop row.
// Experts without tokens do not run (so they keep no saved state for this micro-batch).
Result<Tensor> MoE::Impl::run_experts(ModelCtx& c, int mb, const Tensor& x_last, const Fp8Rows* fx,
                                      Saved& s) {
  std::stable_sort(s.recs.begin(), s.recs.end(), [](const Rec& a, const Rec& b) {
    return std::tie(a.e, a.src, a.a) < std::tie(b.e, b.src, b.a);
  });
  const int64_t m = static_cast<int64_t>(s.recs.size());
  s.offset.assign(E_local + 1, 0);
  std::vector<int32_t> rows(m);
  std::vector<float> gates(m);
  for (int64_t i = 0; i < m; ++i) {
    const Rec& r = s.recs[i];
    if (r.e < e_begin || r.e >= e_begin + E_local) {
      return FP8_ERROR(Code::kInternal, "moe: expert {} reached ep rank {} (owns {}..{})", r.e, me,
                       e_begin, e_begin + E_local - 1);
    }
    ++s.offset[r.e - e_begin + 1];
    rows[i] = r.row;
    gates[i] = r.g;
  }
  for (int64_t e = 0; e < E_local; ++e) s.offset[e + 1] += s.offset[e];
  FP8_ASSIGN_OR_RETURN(s.rows, upload(c, rows, {m}, DType::kI32));
  FP8_ASSIGN_OR_RETURN(s.gates, upload(c, gates, {m}, DType::kF32));
  return expert_rows(c, mb, x_last, fx, s);
}

// With s.offset, s.rows and s.gates set: the records' rows of the last hop's buffer (x_last, or
// fx: the same rows as FP8), zero-padded per expert, go through the experts; the gated outputs
// are summed per row of that buffer.
Result<Tensor> MoE::Impl::expert_rows(ModelCtx& c, int mb, const Tensor& x_last, const Fp8Rows* fx,
                                      Saved& s) {
  const int64_t m = s.offset[E_local];
  const int64_t n_last = fx ? fx->codes.rows() : x_last.rows();  // the last hop's rows
  FP8_RETURN_IF_ERROR(plan_padding(c, s));
  Tensor ye;
  Fp8Rows own;
  if (c.precision == Precision::kFP8) {
    // Each token quantized 1x128 once (here, or at its source: fx), its codes and scales
    // gathered into the experts' padded layout: bitwise quantize_groups of the gathered rows,
    // without them (K copies per token).
    if (!fx) {
      FP8_ASSIGN_OR_RETURN(own, quantize_rows(c, x_last));
      fx = &own;
    }
    FP8_ASSIGN_OR_RETURN(
        GroupedFp8 xq, c.be->gather_fp8_groups(fx->codes, fx->scales, fx->groups, c.qp.pow2, s.rows,
                                               s.padded ? s.pad_src : Tensor(), s.groups));
    FP8_ASSIGN_OR_RETURN(ye, experts.forward(c, mb, std::move(xq), s.groups));
  } else {
    FP8_ASSIGN_OR_RETURN(Tensor xin, new_f32(c, m, hidden));
    if (m > 0) FP8_RETURN_IF_ERROR(c.be->gather_rows(x_last, s.rows, xin));
    FP8_ASSIGN_OR_RETURN(Tensor xe, pad_rows(c, s, xin));
    FP8_ASSIGN_OR_RETURN(ye, experts.forward(c, mb, xe, s.groups));
  }
  FP8_ASSIGN_OR_RETURN(Tensor out, unpad_rows(c, s, ye));
  FP8_ASSIGN_OR_RETURN(Tensor y, new_zeros(c, n_last, hidden));
  if (m > 0) FP8_RETURN_IF_ERROR(c.be->scatter_add_rows(out, s.rows, s.gates, y));
  FP8_ASSIGN_OR_RETURN(s.out, hold_bf16(c, out));  // held as bf16 for the gate gradients
  return y;
}

// ModelCtx::expert_row_align: each expert's first row in the zero-padded layout (s.pad_offset)
// and, when any expert needs padding, the padded row of each record (s.pad_idx).
Status MoE::Impl::plan_padding(ModelCtx& c, Saved& s) const {
  const int64_t align = std::max<int64_t>(1, c.expert_row_align);
  s.pad_offset.assign(E_local + 1, 0);
  for (int64_t e = 0; e < E_local; ++e) {
    const int64_t n = s.offset[e + 1] - s.offset[e];
    s.pad_offset[e + 1] = s.pad_offset[e] + (n + align - 1) / align * align;
  }
  FP8_ASSIGN_OR_RETURN(s.groups, make_row_groups(*c.be, s.pad_offset));
  s.padded = s.pad_offset[E_local] != s.offset[E_local];
  if (!s.padded) return Status::Ok();
  std::vector<int32_t> idx(s.offset[E_local]), src(s.pad_offset[E_local], -1);
  for (int64_t e = 0; e < E_local; ++e) {
    for (int64_t i = s.offset[e]; i < s.offset[e + 1]; ++i) {
      idx[i] = static_cast<int32_t>(s.pad_offset[e] + (i - s.offset[e]));
      src[idx[i]] = static_cast<int32_t>(i);
    }
  }
  FP8_ASSIGN_OR_RETURN(s.pad_idx, upload(c, idx, {s.offset[E_local]}, DType::kI32));
  FP8_ASSIGN_OR_RETURN(s.pad_src, upload(c, src, {s.pad_offset[E_local]}, DType::kI32));
  return Status::Ok();
}

// Expert rows [m, hidden] (records in expert order) in the padded layout: each expert's rows,
// then zero rows (one gather); `rows` itself when no expert needs padding.
Result<Tensor> MoE::Impl::pad_rows(ModelCtx& c, const Saved& s, const Tensor& rows) const {
  if (!s.padded) return rows;
  FP8_ASSIGN_OR_RETURN(Tensor out, new_f32(c, s.pad_offset[E_local], hidden));
  FP8_RETURN_IF_ERROR(c.be->gather_rows_scaled(rows, s.pad_src, Tensor(), out));
  return out;
}

// The transpose of pad_rows: each record's row of the padded layout (padding rows dropped).
Result<Tensor> MoE::Impl::unpad_rows(ModelCtx& c, const Saved& s, const Tensor& padded) const {
  if (!s.padded) return padded;
  FP8_ASSIGN_OR_RETURN(Tensor out, new_f32(c, s.offset[E_local], hidden));
  FP8_RETURN_IF_ERROR(c.be->gather_rows(padded, s.pad_idx, out));
  return out;
}

// Sequence-wise balance loss of one micro-batch: the mean over its B sequences (rows b*T ..
// b*T+T-1) of alpha * sum_i f_i P_i, with f_i = E/(K*T) * #tokens selecting i and
// P_i = mean_t s_i / sum_j s_j. The trainer weights it like the main loss (the mean over the
// micro-batch); its gradient is part of Backend::router_grad (kernels/cpu/moe_routing.h).
// balance_counts: f [B, E] (counts selections: constant for the gradient).
std::vector<double> MoE::Impl::balance_counts(const Routing& r, int64_t B, int64_t T) const {
  std::vector<double> f(B * E);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t e = 0; e < E; ++e)
      f[b * E + e] = kernels::balance_count(&r.idx[b * T * K], T, K, E, e);
  }
  return f;
}

// The records' path (host copies); Backend::balance_stats computes the same on the backend.
double MoE::Impl::balance_loss(const Routing& r, int64_t B, int64_t T) const {
  if (alpha == 0.0f) return 0.0;
  const std::vector<double> f = balance_counts(r, B, T);
  std::vector<double> S(B * T), P(B * E);
  for (int64_t t = 0; t < B * T; ++t) S[t] = kernels::score_sum(&r.scores[t * E], E);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t e = 0; e < E; ++e) {
      P[b * E + e] = kernels::balance_share(&r.scores[b * T * E], &S[b * T], T, E, e);
    }
  }
  return kernels::balance_value(f.data(), P.data(), B, E, alpha);
}

// ---- backward phases ----------------------------------------------------------------------------

// Routed part. dy travels the dispatch hops to the owners; there, per record, dgate = <dy_row,
// expert output> (sent home to the record's source), the expert gets gate * dy_row, and its
// input gradient is summed per row and returned along the hops into dx. FP8 (as DeepSeek-V3):
// dy is quantized 1x128 once per token row, at its source when it crosses the all-to-all as FP8
// (ModelCtx::fp8_dispatch) or else where it arrives, the same bits either way; the experts' w2
// dgrad reads those codes with the gate applied to its result (RoutedExperts), and the gate
// gradients and w2's wgrad read the values of the codes.
Status MoE::Impl::experts_backward(ModelCtx& c, int mb, const Saved& s, const Tensor& dy,
                                   Tensor& dgate, Tensor& dx) {
  const bool fp8 = c.precision == Precision::kFP8;
  Tensor dyl = dy;  // the last hop's rows (fp32 rows unless they travel as FP8)
  Fp8Rows fdy;      // FP8: the same rows quantized
  if (fp8 && c.fp8_dispatch && c.ep) {
    FP8_ASSIGN_OR_RETURN(fdy, quantize_rows(c, dy));
    for (const Hop& h : s.hops) {
      FP8_ASSIGN_OR_RETURN(fdy, move_fp8_rows(c, fdy, h, MoeStepStats::kGradDispatch));
    }
  } else {
    for (const Hop& h : s.hops) {
      FP8_ASSIGN_OR_RETURN(dyl, move_rows(c, dyl, h, return_wire(c), MoeStepStats::kGradDispatch));
    }
    if (fp8) {
      FP8_ASSIGN_OR_RETURN(fdy, quantize_rows(c, dyl));
    }
  }
  const int64_t m = s.offset[E_local];
  const int64_t n_last = fp8 ? fdy.codes.rows() : dyl.rows();
  FP8_ASSIGN_OR_RETURN(Tensor dots, c.be->zeros({m}, DType::kF64));
  FP8_ASSIGN_OR_RETURN(Tensor dxl, new_zeros(c, n_last, hidden));
  if (m > 0) {
    // The gates in the experts' (padded) layout: 0 on padding rows.
    Tensor gp = s.gates;
    if (s.padded) {
      FP8_ASSIGN_OR_RETURN(Tensor g1, s.gates.reshape({m, 1}));
      FP8_ASSIGN_OR_RETURN(gp, new_f32(c, s.pad_offset[E_local], 1));
      FP8_RETURN_IF_ERROR(c.be->gather_rows_scaled(g1, s.pad_src, Tensor(), gp));
      FP8_ASSIGN_OR_RETURN(gp, gp.reshape({s.pad_offset[E_local]}));
    }
    Tensor dyr, dxe;  // each record's dy row (FP8: its codes' values); the experts' dx
    if (fp8) {
      FP8_ASSIGN_OR_RETURN(GroupedFp8 dyq, c.be->gather_fp8_groups(
                                               fdy.codes, fdy.scales, fdy.groups, c.qp.pow2, s.rows,
                                               s.padded ? s.pad_src : Tensor(), s.groups));
      FP8_ASSIGN_OR_RETURN(Tensor dyp, new_f32(c, s.pad_offset[E_local], hidden));
      FP8_RETURN_IF_ERROR(c.be->dequantize_groups(dyq, s.groups, dyp));
      FP8_ASSIGN_OR_RETURN(dyr, unpad_rows(c, s, dyp));
      FP8_ASSIGN_OR_RETURN(dxe, experts.backward_input(c, mb, std::move(dyq), gp, dyp));
    } else {
      FP8_ASSIGN_OR_RETURN(dyr, new_f32(c, m, hidden));
      FP8_RETURN_IF_ERROR(c.be->gather_rows(dyl, s.rows, dyr));
      // The experts' output gradient, gate * dy row, in their (padded) layout: one scaled
      // gather (-1 pad_src rows are zero rows).
      FP8_ASSIGN_OR_RETURN(Tensor dpad, new_f32(c, s.pad_offset[E_local], hidden));
      if (s.padded) {
        FP8_RETURN_IF_ERROR(c.be->gather_rows_scaled(dyr, s.pad_src, gp, dpad));
      } else {
        FP8_RETURN_IF_ERROR(c.be->gather_rows_scaled(dyl, s.rows, s.gates, dpad));
      }
      FP8_ASSIGN_OR_RETURN(dxe, experts.backward_input(c, mb, dpad));
    }
    // dgate per record = <dy_row, expert output> in fp64, on the backend: at most m doubles
    // travel to the host (records), none with direct dispatch.
    {
      FP8_ASSIGN_OR_RETURN(Tensor out, held_f32(c, s.out));
      FP8_RETURN_IF_ERROR(c.be->row_dot(dyr, out, dots));
    }
    FP8_ASSIGN_OR_RETURN(Tensor dxr, unpad_rows(c, s, dxe));
    FP8_RETURN_IF_ERROR(c.be->scatter_add_rows(dxr, s.rows, Tensor(), dxl));
  }
  if (s.direct) {
    dgate = dots;  // by place; router_grad reads it through s.slot
  } else {
    FP8_ASSIGN_OR_RETURN(auto dg, download<double>(c, dots));
    std::vector<double> by_assignment(s.B * s.T * K, 0.0);  // dropped assignments keep 0
    FP8_RETURN_IF_ERROR(return_dgates(c, s, dg, by_assignment));
    FP8_ASSIGN_OR_RETURN(dgate, upload(c, by_assignment, {s.B * s.T * K}, DType::kF64));
  }
  for (auto h = s.hops.rbegin(); h != s.hops.rend(); ++h) {
    FP8_ASSIGN_OR_RETURN(dxl, return_rows(c, dxl, *h, return_wire(c), MoeStepStats::kGradCombine));
  }
  return c.be->axpy(1.0f, dxl, dx);
}

// Gate gradients from the owners straight back to each record's source rank.
Status MoE::Impl::return_dgates(ModelCtx& c, const Saved& s, const std::vector<double>& dg,
                                std::vector<double>& dgate) const {
  struct Item {
    int64_t a;
    double d;
  };
  std::vector<std::vector<Item>> by(P);
  for (size_t i = 0; i < s.recs.size(); ++i) by[s.recs[i].src].push_back({s.recs[i].a, dg[i]});
  std::vector<int64_t> sc(P);
  std::vector<Item> send;
  for (int p = 0; p < P; ++p) {
    sc[p] = static_cast<int64_t>(by[p].size());
    send.insert(send.end(), by[p].begin(), by[p].end());
  }
  FP8_ASSIGN_OR_RETURN(auto rc, exchange_counts(c, sc, 1));
  std::vector<Item> recv(std::accumulate(rc.begin(), rc.end(), int64_t{0}));
  FP8_RETURN_IF_ERROR(exchange(c, send.data(), sc, recv.data(), rc, sizeof(Item)));
  for (const Item& it : recv) {
    if (it.a < 0 || it.a >= static_cast<int64_t>(dgate.size()))
      return FP8_ERROR(Code::kInternal, "moe: gate gradient for assignment {} out of range", it.a);
    dgate[it.a] = it.d;
  }
  return Status::Ok();
}

// Router part (Backend::router_grad, kernels/cpu/moe_routing.h): the gate gradients through the
// gates' quotient rule, plus the balance loss (times the trainer's loss scale), through the
// sigmoid to dlogits; the router Linear turns that into dx.
Status MoE::Impl::router_backward(ModelCtx& c, int mb, const Saved& s, const Tensor& dgate,
                                  Tensor& dx) {
  const int64_t n = s.B * s.T;
  kernels::RouterGradParams rp;
  rp.E = E;
  rp.K = K;
  rp.route_scale = route_scale;
  rp.alpha = alpha;
  rp.loss_scale = c.loss_scale;
  rp.B = s.B;
  rp.T = s.T;
  Tensor f = s.f;  // direct: from balance_stats; records: counted here
  if (alpha != 0.0f && !s.direct) {
    FP8_ASSIGN_OR_RETURN(f, upload(c, balance_counts(s.r, s.B, s.T), {s.B, E}, DType::kF64));
  }
  FP8_ASSIGN_OR_RETURN(Tensor dlogits, new_f32(c, n, E));
  FP8_RETURN_IF_ERROR(c.be->router_grad(s.scores, s.idx, s.gates_sel, dgate,
                                        s.direct ? s.slot : Tensor(), f, rp, dlogits));
  FP8_ASSIGN_OR_RETURN(Tensor dxr, router.backward_input(c, mb, dlogits));
  return c.be->axpy(1.0f, dxr, dx);
}

// ---- public interface ---------------------------------------------------------------------------

Status MoE::init(ModelCtx& c, const std::string& prefix, const config::Model& m, uint64_t seed) {
  impl_ = std::make_shared<Impl>();
  Impl& p = *impl_;
  p.be = c.be;
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
                                       init_std, /*expert=*/false, /*in_moe=*/true));
  }
  p.P = c.ep ? c.ep->size() : 1;
  p.me = c.ep ? c.ep->rank() : 0;
  p.per_node = c.ep ? std::max(1, c.ep->ranks_per_node()) : 1;
  if (p.E % p.P != 0 || p.P % p.per_node != 0) {
    return FP8_INVALID("{}: {} routed experts cannot be split over {} ep ranks ({} per node)",
                       prefix, p.E, p.P, p.per_node);
  }
  p.E_local = p.E / p.P;
  p.e_begin = p.me * p.E_local;
  FP8_RETURN_IF_ERROR(p.experts.init(c, prefix, p.e_begin, p.E_local, p.hidden, moe.expert_hidden(),
                                     seed, init_std));
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
  s.direct = !c.ep && (p.capacity_factor <= 0.0f || c.inference);
  FP8_RETURN_IF_ERROR(p.route(c, mb, x, s));
  p.stats.tokens += x.rows();
  if (!s.direct) p.stats.aux_loss += p.balance_loss(s.r, B, T);
  Tensor yl;
  if (s.direct) {
    FP8_ASSIGN_OR_RETURN(yl, p.dispatch_direct(c, mb, x, s));
  } else {
    int64_t dropped = 0;
    std::vector<Impl::Rec> recs = p.records(s.r, x.rows(), &dropped);
    for (const Impl::Rec& r : recs) ++p.stats.load[r.e];
    p.stats.dropped += dropped;
    // Dispatch: one hop (flat) or two (two-level, when the ep group spans nodes).
    s.hops.resize(c.ep_two_level && p.per_node < p.P ? 2 : 1);
    // FP8 dispatch: the tokens travel as FP8 codes and scales (quantized once, here).
    const bool fp8_rows = c.precision == Precision::kFP8 && c.fp8_dispatch && c.ep;
    Tensor xl = x;
    Impl::Fp8Rows fx;
    if (fp8_rows) {
      FP8_ASSIGN_OR_RETURN(fx, p.quantize_rows(c, x));
    }
    for (size_t h = 0; h < s.hops.size(); ++h) {
      const int64_t n_in = fp8_rows ? fx.codes.rows() : xl.rows();
      FP8_RETURN_IF_ERROR(
          p.hop_plan(c, n_in, recs, static_cast<int>(h), s.hops[h], p.stats.cross_node_rows));
      if (fp8_rows) {
        FP8_ASSIGN_OR_RETURN(fx, p.move_fp8_rows(c, fx, s.hops[h], MoeStepStats::kDispatch));
      } else {
        FP8_ASSIGN_OR_RETURN(
            xl, p.move_rows(c, xl, s.hops[h], p.dispatch_wire(c), MoeStepStats::kDispatch));
      }
    }
    s.recs = std::move(recs);
    FP8_ASSIGN_OR_RETURN(yl, p.run_experts(c, mb, xl, fp8_rows ? &fx : nullptr, s));
  }
  // Combine: the gated sums travel the hops back, summed per row at each sender.
  for (auto h = s.hops.rbegin(); h != s.hops.rend(); ++h) {
    FP8_ASSIGN_OR_RETURN(yl, p.return_rows(c, yl, *h, p.return_wire(c), MoeStepStats::kCombine));
  }
  Tensor y = yl;
  if (p.shared) {
    FP8_ASSIGN_OR_RETURN(Tensor ys, p.shared->forward(c, mb, x));
    FP8_RETURN_IF_ERROR(c.be->axpy(1.0f, ys, y));
  }
  if (c.precision != Precision::kFP32) FP8_RETURN_IF_ERROR(c.be->round_bf16(y, y));
  return y;
}

Status MoE::drop_input(int mb) {
  FP8_RETURN_IF_ERROR(impl_->router.drop_input(mb));
  return impl_->shared ? impl_->shared->drop_input(mb) : Status::Ok();
}

Status MoE::restore_input(ModelCtx& c, int mb, const Tensor& x) {
  FP8_RETURN_IF_ERROR(impl_->router.restore_input(c, mb, x));
  return impl_->shared ? impl_->shared->restore_input(c, mb, x) : Status::Ok();
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
  Tensor dgate;
  FP8_RETURN_IF_ERROR(p.experts_backward(c, mb, *s, dy, dgate, dx));
  FP8_RETURN_IF_ERROR(p.router_backward(c, mb, *s, dgate, dx));
  s->out = Tensor();  // not needed by the W pass (the experts keep their own state)
  return dx;
}

Status MoE::backward_weight(ModelCtx& c, int mb) {
  Impl& p = *impl_;
  FP8_RETURN_IF_ERROR(p.saved.get(mb, "moe").status());  // the forward ran for mb
  FP8_RETURN_IF_ERROR(p.router.backward_weight(c, mb));
  if (p.shared) FP8_RETURN_IF_ERROR(p.shared->backward_weight(c, mb));
  FP8_RETURN_IF_ERROR(p.experts.backward_weight(c, mb));
  p.saved.erase(mb);
  return Status::Ok();
}

std::vector<Param*> MoE::params() {
  Impl& p = *impl_;
  std::vector<Param*> ps = {&p.router.weight()};
  if (p.shared) {
    for (Param* q : p.shared->params()) ps.push_back(q);
  }
  for (Param* q : p.experts.params()) ps.push_back(q);
  return ps;
}

Param& MoE::bias() { return impl_->bias; }
MoeStepStats& MoE::stats() {
  Impl& p = *impl_;
  if (p.aux_dev.defined()) {  // direct dispatch: the balance-loss sum lives on the backend
    auto h = p.be->to_host(p.aux_dev);
    p.stats.aux_loss =
        h.ok() ? h.value().data_as<double>()[0] : std::numeric_limits<double>::quiet_NaN();
  }
  return p.stats;
}

void MoE::reset_stats() {
  impl_->aux_dev = Tensor();  // a fresh zero sum at the next forward
  impl_->stats = MoeStepStats{};
  impl_->stats.load.assign(impl_->E, 0);
}

}  // namespace fp8pipe::model
