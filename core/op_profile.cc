#include "core/op_profile.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <map>
#include <mutex>

namespace fp8pipe {
namespace {

using Clock = std::chrono::steady_clock;

// One call in flight: its events on the compute stream, resolved into the totals once done.
struct Pending {
  const char* op;
  std::shared_ptr<Event> start, stop;
  double host_ms, flops;
};

class Profile final : public OpProfile {
 public:
  explicit Profile(Stream& compute) : compute_(compute) {}

  void add(const char* op, std::shared_ptr<Event> start, std::shared_ptr<Event> stop,
           double host_ms, double flops) {
    std::lock_guard<std::mutex> lk(mu_);
    pending_.push_back({op, std::move(start), std::move(stop), host_ms, flops});
    // Completed calls (in stream order) are folded in as we go, so the list stays short when the
    // device keeps up; never waits.
    if (pending_.size() > 256) drain_locked(false);
  }

  void reset() override {
    std::lock_guard<std::mutex> lk(mu_);
    pending_.clear();
    by_op_.clear();
  }

  std::vector<OpStats> totals() override {
    compute_.synchronize();
    std::lock_guard<std::mutex> lk(mu_);
    drain_locked(true);
    std::vector<OpStats> out;
    for (const auto& [op, s] : by_op_) out.push_back(s);
    std::sort(out.begin(), out.end(), [](const OpStats& a, const OpStats& b) {
      return a.device_ms != b.device_ms ? a.device_ms > b.device_ms : a.op < b.op;
    });
    return out;
  }

 private:
  void drain_locked(bool all) {
    while (!pending_.empty()) {
      Pending& p = pending_.front();
      if (!all && !p.stop->query()) break;
      OpStats& s = by_op_[p.op];
      s.op = p.op;
      ++s.calls;
      s.device_ms += p.stop->ms_since(*p.start).value_or(0.0);
      s.host_ms += p.host_ms;
      s.flops += p.flops;
      pending_.pop_front();
    }
  }

  Stream& compute_;
  std::mutex mu_;
  std::deque<Pending> pending_;
  std::map<std::string, OpStats> by_op_;
};

double gemm_flops(int64_t m, int64_t n, int64_t k, int64_t batch = 1) {
  return 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) *
         static_cast<double>(batch);
}

// Every Backend method forwarded; operators go through timed().
class ProfiledBackend final : public Backend {
 public:
  ProfiledBackend(std::unique_ptr<Backend> inner, std::shared_ptr<Profile> profile)
      : in_(std::move(inner)), prof_(std::move(profile)) {}

  Device device() const override { return in_->device(); }
  std::string name() const override { return in_->name(); }
  MemoryUse memory() const override { return in_->memory(); }
  void reset_peak_memory() override { in_->reset_peak_memory(); }
  Result<Tensor> empty(const Shape& shape, DType dtype) override {
    return in_->empty(shape, dtype);
  }
  Status fill_zero(Tensor& t) override {
    return timed("fill_zero", 0, [&] { return in_->fill_zero(t); });
  }
  Status copy(const Tensor& src, Tensor& dst) override {
    return timed("copy", 0, [&] { return in_->copy(src, dst); });
  }
  Status copy_ranges(std::span<const CopyRange> rs) override {
    return timed("copy_ranges", 0, [&] { return in_->copy_ranges(rs); });
  }
  Stream& compute() override { return in_->compute(); }
  std::unique_ptr<Stream> create_stream(const std::string& name) override {
    return in_->create_stream(name);
  }

  Result<Tensor> quantize(const Tensor& x, Granularity g, QuantParams p,
                          int64_t* nonfinite) override {
    return timed("quantize", 0, [&] { return in_->quantize(x, g, p, nonfinite); });
  }
  Result<Tensor> quantize_transposed(const Tensor& x, QuantParams p, int64_t* nonfinite) override {
    return timed("quantize_transposed", 0,
                 [&] { return in_->quantize_transposed(x, p, nonfinite); });
  }
  Result<Tensor> transpose_fp8(const Tensor& q) override {
    return timed("transpose_fp8", 0, [&] { return in_->transpose_fp8(q); });
  }
  Result<Tensor> quantize_e5m6(const Tensor& x, int64_t* nonfinite) override {
    return timed("quantize_e5m6", 0, [&] { return in_->quantize_e5m6(x, nonfinite); });
  }
  Status dequantize(const Tensor& q, Tensor& out) override {
    return timed("dequantize", 0, [&] { return in_->dequantize(q, out); });
  }
  Result<GroupedFp8> quantize_groups(const Tensor& x, const RowGroups& groups,
                                     QuantParams p) override {
    return timed("quantize_groups", 0, [&] { return in_->quantize_groups(x, groups, p); });
  }
  Result<GroupedFp8> quantize_transposed_groups(const Tensor& x, const RowGroups& groups,
                                                QuantParams p) override {
    return timed("quantize_transposed_groups", 0,
                 [&] { return in_->quantize_transposed_groups(x, groups, p); });
  }
  Result<GroupedFp8> gather_fp8_groups(const Tensor& codes, const Tensor& scales,
                                       const RowGroups& in_groups, bool pow2, const Tensor& rows,
                                       const Tensor& pad, const RowGroups& groups) override {
    return timed("gather_fp8_groups", 0, [&] {
      return in_->gather_fp8_groups(codes, scales, in_groups, pow2, rows, pad, groups);
    });
  }
  Result<Tensor> requantize_transposed(const Tensor& q, QuantParams p,
                                       int64_t* nonfinite) override {
    return timed("requantize_transposed", 0,
                 [&] { return in_->requantize_transposed(q, p, nonfinite); });
  }
  Result<GroupedFp8> requantize_transposed_groups(const GroupedFp8& q, const RowGroups& groups,
                                                  QuantParams p) override {
    return timed("requantize_transposed_groups", 0,
                 [&] { return in_->requantize_transposed_groups(q, groups, p); });
  }
  Status dequantize_groups(const GroupedFp8& q, const RowGroups& groups, Tensor& out) override {
    return timed("dequantize_groups", 0, [&] { return in_->dequantize_groups(q, groups, out); });
  }
  Result<GroupedFp8> quantize_blocks_batch(std::span<const Tensor* const> ws, QuantParams p,
                                           int64_t* nonfinite) override {
    return timed("quantize_blocks_batch", 0,
                 [&] { return in_->quantize_blocks_batch(ws, p, nonfinite); });
  }
  Result<GroupedFp8> transpose_fp8_batch(const GroupedFp8& q) override {
    return timed("transpose_fp8_batch", 0, [&] { return in_->transpose_fp8_batch(q); });
  }
  Status gemm_fp8(const Tensor& a, const Tensor& b, Tensor& out, GemmMode mode) override {
    return timed("gemm_fp8", gemm_flops(a.rows(), b.rows(), a.cols()),
                 [&] { return in_->gemm_fp8(a, b, out, mode); });
  }
  Status gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, float alpha,
              float beta) override {
    const int64_t k = trans_a ? a.rows() : a.cols();
    const char* op = a.dtype() == DType::kBF16 ? "gemm_bf16" : "gemm_f32";
    return timed(op, gemm_flops(c.rows(), c.cols(), k),
                 [&] { return in_->gemm(a, trans_a, b, trans_b, c, alpha, beta); });
  }
  Status gemm_fp8_grouped(std::span<const Fp8GemmArgs> gs, GemmMode mode) override {
    double flops = 0;
    for (const Fp8GemmArgs& g : gs) flops += gemm_flops(g.a.rows(), g.b.rows(), g.a.cols());
    return timed("gemm_fp8_grouped", flops, [&] { return in_->gemm_fp8_grouped(gs, mode); });
  }
  Status gemm_grouped(std::span<const GemmArgs> gs) override {
    double flops = 0;
    for (const GemmArgs& g : gs) {
      flops += gemm_flops(g.c.rows(), g.c.cols(), g.trans_a ? g.a.rows() : g.a.cols());
    }
    const bool bf16 = !gs.empty() && gs[0].a.dtype() == DType::kBF16;
    return timed(bf16 ? "gemm_bf16_grouped" : "gemm_f32_grouped", flops,
                 [&] { return in_->gemm_grouped(gs); });
  }
  Status gemm_batched(const Tensor& a, const Tensor& b, Tensor& c, const GemmBatch& g, float alpha,
                      float beta) override {
    return timed("gemm_batched", gemm_flops(g.M, g.N, g.K, g.batch),
                 [&] { return in_->gemm_batched(a, b, c, g, alpha, beta); });
  }
  Status cast(const Tensor& src, Tensor& dst) override {
    return timed("cast", 0, [&] { return in_->cast(src, dst); });
  }

  Status embedding_fwd(const Tensor& table, const Tensor& ids, Tensor& out) override {
    return timed("embedding_fwd", 0, [&] { return in_->embedding_fwd(table, ids, out); });
  }
  Status embedding_bwd_acc(const Tensor& dout, const Tensor& ids, Tensor& dtable) override {
    return timed("embedding_bwd_acc", 0, [&] { return in_->embedding_bwd_acc(dout, ids, dtable); });
  }
  Status rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, Tensor& y,
                     Tensor& rstd) override {
    return timed("rmsnorm_fwd", 0, [&] { return in_->rmsnorm_fwd(x, w, eps, y, rstd); });
  }
  Status rmsnorm_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                     Tensor& dx, Tensor& dw_acc) override {
    return timed("rmsnorm_bwd", 0, [&] { return in_->rmsnorm_bwd(dy, x, w, rstd, dx, dw_acc); });
  }
  Status rope(Tensor& x, const Tensor& pos, int64_t heads, const kernels::RopeSpec& r,
              bool inverse) override {
    return timed("rope", 0, [&] { return in_->rope(x, pos, heads, r, inverse); });
  }
  Status attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, int64_t B, int64_t T,
                       int64_t H, float scale, Tensor& o, Tensor& lse) override {
    return timed("attention_fwd", 0,
                 [&] { return in_->attention_fwd(q, k, v, B, T, H, scale, o, lse); });
  }
  Status attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                       const Tensor& o, const Tensor& lse, int64_t B, int64_t T, int64_t H,
                       float scale, Tensor& dq, Tensor& dk, Tensor& dv) override {
    return timed("attention_bwd", 0, [&] {
      return in_->attention_bwd(dout, q, k, v, o, lse, B, T, H, scale, dq, dk, dv);
    });
  }
  Status attention_cached(const Tensor& q, const Tensor& k, const Tensor& v, int64_t H, int64_t G,
                          int64_t dv, float scale, Tensor& o) override {
    return timed("attention_cached", 0,
                 [&] { return in_->attention_cached(q, k, v, H, G, dv, scale, o); });
  }
  Status causal_softmax(const Tensor& s, Tensor& p, Tensor& lse, bool recompute) override {
    return timed("causal_softmax", 0, [&] { return in_->causal_softmax(s, p, lse, recompute); });
  }
  Status softmax_bwd(const Tensor& p, const Tensor& dp, Tensor& ds) override {
    return timed("softmax_bwd", 0, [&] { return in_->softmax_bwd(p, dp, ds); });
  }
  Status swiglu_fwd(const Tensor& g, const Tensor& u, Tensor& h) override {
    return timed("swiglu_fwd", 0, [&] { return in_->swiglu_fwd(g, u, h); });
  }
  Status swiglu_bwd(const Tensor& dh, const Tensor& g, const Tensor& u, Tensor& dg,
                    Tensor& du) override {
    return timed("swiglu_bwd", 0, [&] { return in_->swiglu_bwd(dh, g, u, dg, du); });
  }
  Status cross_entropy_fwd(const Tensor& logits, const Tensor& targets, Tensor& loss) override {
    return timed("cross_entropy_fwd", 0,
                 [&] { return in_->cross_entropy_fwd(logits, targets, loss); });
  }
  Status cross_entropy_bwd(const Tensor& logits, const Tensor& targets, float row_scale,
                           Tensor& dlogits) override {
    return timed("cross_entropy_bwd", 0,
                 [&] { return in_->cross_entropy_bwd(logits, targets, row_scale, dlogits); });
  }
  Status router_topk(const Tensor& logits, const Tensor& bias, int64_t topk, int64_t n_groups,
                     int64_t max_groups, float route_scale, Tensor& scores, Tensor& idx,
                     Tensor& gates) override {
    return timed("router_topk", 0, [&] {
      return in_->router_topk(logits, bias, topk, n_groups, max_groups, route_scale, scores, idx,
                              gates);
    });
  }
  Status sort_assignments(const Tensor& idx, int64_t E, Tensor& order, Tensor& rows, Tensor& slot,
                          Tensor& counts) override {
    return timed("sort_assignments", 0,
                 [&] { return in_->sort_assignments(idx, E, order, rows, slot, counts); });
  }
  Status router_grad(const Tensor& scores, const Tensor& idx, const Tensor& gates,
                     const Tensor& dgate, const Tensor& slot, const Tensor& f,
                     const kernels::RouterGradParams& p, Tensor& dlogits) override {
    return timed("router_grad", 0,
                 [&] { return in_->router_grad(scores, idx, gates, dgate, slot, f, p, dlogits); });
  }
  Status balance_stats(const Tensor& scores, const Tensor& idx, int64_t B, int64_t T, float alpha,
                       Tensor& f, Tensor& loss) override {
    return timed("balance_stats", 0,
                 [&] { return in_->balance_stats(scores, idx, B, T, alpha, f, loss); });
  }
  Status gather_rows(const Tensor& in, const Tensor& rows, Tensor& out) override {
    return timed("gather_rows", 0, [&] { return in_->gather_rows(in, rows, out); });
  }
  Status gather_rows_scaled(const Tensor& in, const Tensor& rows, const Tensor& w,
                            Tensor& out) override {
    return timed("gather_rows_scaled", 0,
                 [&] { return in_->gather_rows_scaled(in, rows, w, out); });
  }
  Status scatter_add_rows(const Tensor& in, const Tensor& rows, const Tensor& w,
                          Tensor& out) override {
    return timed("scatter_add_rows", 0, [&] { return in_->scatter_add_rows(in, rows, w, out); });
  }
  Status add(const Tensor& a, const Tensor& b, Tensor& out) override {
    return timed("add", 0, [&] { return in_->add(a, b, out); });
  }
  Status axpy_batch(float alpha, const Tensor& x, std::span<Tensor* const> ys) override {
    return timed("axpy_batch", 0, [&] { return in_->axpy_batch(alpha, x, ys); });
  }
  Status axpy(float alpha, const Tensor& x, Tensor& y) override {
    return timed("axpy", 0, [&] { return in_->axpy(alpha, x, y); });
  }
  Status round_bf16(const Tensor& x, Tensor& out) override {
    return timed("round_bf16", 0, [&] { return in_->round_bf16(x, out); });
  }
  Status row_dot(const Tensor& a, const Tensor& b, Tensor& out) override {
    return timed("row_dot", 0, [&] { return in_->row_dot(a, b, out); });
  }
  Status accumulate_grad(Tensor& grad, Tensor& acc) override {
    return timed("accumulate_grad", 0, [&] { return in_->accumulate_grad(grad, acc); });
  }
  Status round_f64(const Tensor& acc, Tensor& out) override {
    return timed("round_f64", 0, [&] { return in_->round_f64(acc, out); });
  }
  Status sum_squares(std::span<const Tensor* const> gs, double* total) override {
    return timed("sum_squares", 0, [&] { return in_->sum_squares(gs, total); });
  }
  Status adamw(Tensor& p, const Tensor& g, Tensor& m, Tensor& v,
               const kernels::AdamWScalars& s) override {
    return timed("adamw", 0, [&] { return in_->adamw(p, g, m, v, s); });
  }
  Status adamw_runs(Tensor& p, const Tensor& g, Tensor& m, Tensor& v,
                    std::span<const AdamWRun> runs, const kernels::AdamWScalars s[2]) override {
    return timed("adamw_runs", 0, [&] { return in_->adamw_runs(p, g, m, v, runs, s); });
  }

 private:
  // Calls fn between two timed events on the compute stream (where the model's operators run),
  // measuring the host time in between too. A refused call counts as a call without FLOPs.
  template <class Fn>
  auto timed(const char* op, double flops, Fn&& fn) -> decltype(fn()) {
    Stream& s = in_->compute();
    std::shared_ptr<Event> start = s.record_timed();
    const auto t0 = Clock::now();
    auto r = fn();
    const double host_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    prof_->add(op, std::move(start), s.record_timed(), host_ms, r.ok() ? flops : 0.0);
    return r;
  }

  std::unique_ptr<Backend> in_;
  std::shared_ptr<Profile> prof_;
};

}  // namespace

int64_t calls_of(const std::vector<OpStats>& stats, std::string_view op) {
  for (const OpStats& s : stats)
    if (s.op == op) return s.calls;
  return 0;
}

std::unique_ptr<Backend> make_profiled_backend(std::unique_ptr<Backend> inner,
                                               std::shared_ptr<OpProfile>* profile) {
  auto prof = std::make_shared<Profile>(inner->compute());
  *profile = prof;
  return std::make_unique<ProfiledBackend>(std::move(inner), std::move(prof));
}

std::string format_op_table(const std::vector<OpStats>& stats, double wall_ms, size_t max_rows) {
  double device = 0, host = 0;
  int64_t calls = 0;
  for (const OpStats& s : stats) {
    device += s.device_ms;
    host += s.host_ms;
    calls += s.calls;
  }
  std::string out = fmt::format("{:<20} {:>9} {:>12} {:>7} {:>12} {:>10} {:>9}\n", "operator",
                                "calls", "device ms", "device%", "host ms", "us/call", "TFLOP/s");
  auto row = [&](const std::string& name, int64_t n, double dev, double hst, double flops) {
    const std::string tf = flops > 0 && dev > 0 ? fmt::format("{:.2f}", flops / dev / 1e9) : "";
    out += fmt::format("{:<20} {:>9} {:>12.3f} {:>6.1f}% {:>12.3f} {:>10.1f} {:>9}\n", name, n, dev,
                       device > 0 ? 100.0 * dev / device : 0.0, hst,
                       n > 0 ? 1e3 * dev / static_cast<double>(n) : 0.0, tf);
  };
  OpStats rest{"(others)"};
  for (size_t i = 0; i < stats.size(); ++i) {
    const OpStats& s = stats[i];
    if (i < max_rows) {
      row(s.op, s.calls, s.device_ms, s.host_ms, s.flops);
      continue;
    }
    rest.calls += s.calls;
    rest.device_ms += s.device_ms;
    rest.host_ms += s.host_ms;
    rest.flops += s.flops;
  }
  if (rest.calls > 0) row(rest.op, rest.calls, rest.device_ms, rest.host_ms, rest.flops);
  row("total", calls, device, host, 0);
  if (wall_ms > 0) {
    out += fmt::format("profiled operators kept the device busy {:.1f}% of {:.3f} ms wall time\n",
                       100.0 * device / wall_ms, wall_ms);
  }
  return out;
}

json::Value op_stats_json(const std::vector<OpStats>& stats, double wall_ms) {
  json::Value ops = json::Value::array();
  for (const OpStats& s : stats) {
    json::Value o = json::Value::object();
    o.set("op", s.op);
    o.set("calls", s.calls);
    o.set("device_ms", s.device_ms);
    o.set("host_ms", s.host_ms);
    o.set("flops", s.flops);
    ops.push_back(std::move(o));
  }
  json::Value doc = json::Value::object();
  doc.set("wall_ms", wall_ms);
  doc.set("ops", std::move(ops));
  return doc;
}

}  // namespace fp8pipe
