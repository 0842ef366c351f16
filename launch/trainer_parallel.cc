// The trainer's distributed half: layout and schedule set-up, one global batch through the
// pipeline executor, and the name-based sums that keep every copy of a parameter identical
// (DualPipe's two copies of a stage, dp replicas) plus the global gradient norm and expert loads.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "core/config.h"
#include "core/log.h"
#include "launch/fault_inject.h"
#include "launch/trainer.h"
#include "optim/bias_update.h"
#ifdef FP8PIPE_HAVE_NCCL
#include "parallel/nccl_comm.h"
#endif

namespace fp8pipe {

Status Trainer::setup_parallel(const Runtime* rt) {
  const auto& p = cfg_.parallel();
  if (rt) {
    topo_ = rt->topo;
    comms_ = rt->comms;
  } else {
    if (p.pp() * p.dp() != 1) {
      return FP8_INVALID(
          "parallel.pp={} parallel.dp={} needs {} MPI ranks; this process runs alone", p.pp(),
          p.dp(), p.pp() * p.dp());
    }
    FP8_ASSIGN_OR_RETURN(auto t, parallel::Topology::create(1, 1, 1, 1, 0));
    topo_ = std::move(t);
  }
  world_rank_ = comms_ ? comms_->get(parallel::GroupKind::kWorld).group().index : 0;
  world_size_ = p.pp() * p.dp();
  if (p.comm_backend() == "nccl" && comms_ && world_size_ > 1) {
#ifdef FP8PIPE_HAVE_NCCL
    parallel::NcclOptions o;
    o.timeout_s = cfg_.fault().timeout_s();
    o.device = local_gpu(*topo_);
    o.order_after = &be_->compute();
    FP8_ASSIGN_OR_RETURN(auto nccl, parallel::create_nccl_comms(*comms_, o));
    nccl_comms_.emplace(std::move(nccl));
    if (world_rank_ == 0) log::info("pipeline and expert exchanges on NCCL (GPU memory)");
#else
    return FP8_INVALID(
        "parallel.comm_backend=\"nccl\" needs a build with CUDA and NCCL; valid here: \"mpi\"");
#endif
  }
  FP8_ASSIGN_OR_RETURN(auto kind, parallel::parse_schedule_kind(p.schedule()));
  FP8_ASSIGN_OR_RETURN(auto s,
                       parallel::make_schedule(kind, p.pp(), std::max(1, p.microbatches())));
  sched_ = std::move(s);
  FP8_ASSIGN_OR_RETURN(parts_, parallel::partition_stages(cfg_.model(), sched_->stages()));
  return Status::Ok();
}

std::vector<model::Param*> Trainer::all_params() const {
  std::vector<model::Param*> out;
  for (auto& c : chunks_)
    for (auto* p : c->params()) out.push_back(p);
  return out;
}

std::vector<model::MoE*> Trainer::all_moes() const {
  std::vector<model::MoE*> out;
  for (auto& c : chunks_)
    for (auto* m : c->moes()) out.push_back(m);
  return out;
}

Status Trainer::sum_over_world(std::vector<double>& v) {
  if (!comms_ || world_size_ == 1) return Status::Ok();
  auto& w = comms_->get(parallel::GroupKind::kWorld);
  return w
      .all_reduce(v.data(), v.data(), static_cast<int64_t>(v.size()), parallel::DataType::kFloat64,
                  parallel::ReduceOp::kSum)
      .wait();
}

Result<double> Trainer::max_over_world(double v) {
  std::vector<double> all(world_size_, 0.0);
  all[world_rank_] = v;
  FP8_RETURN_IF_ERROR(sum_over_world(all));
  return *std::max_element(all.begin(), all.end());
}

// One global batch: this replica's micro-batches through the schedule; losses are global means.
Result<model::LossParts> Trainer::run_microbatches(data::Split split, int64_t step, bool backward) {
  const int64_t T = cfg_.train().seq_len();
  const int dp = cfg_.parallel().dp();
  // The micro-batch size B is fixed; a batch ramp's smaller steps run fewer micro-batches.
  const int64_t step_rows = batcher_->rows_in(split, step), d = topo_->coords().dp_index;
  const int M = microbatches_for(cfg_, step_rows);
  const int64_t B = step_rows / (int64_t{dp} * M);
  FP8_ASSIGN_OR_RETURN(const parallel::Schedule* sched, schedule_for(M));
  FP8_RETURN_IF_ERROR(exec_->set_schedule(*sched));
  if (backward) FP8_RETURN_IF_ERROR(setup_grad_overlap());
  const bool overlap = backward && overlap_;
  parallel::PipelineExecutor::GradHooks hooks;
  if (overlap) {
    FP8_ASSIGN_OR_RETURN(const parallel::P2pPlan* plan, exec_->plan());
    overlap_->begin(*sched, plan);
    hooks.chunk_final = [this](int dir, bool more) { return on_chunk_final(dir, more); };
    if (plan) {
      hooks.before_round = [this](int round, bool more) {
        return overlap_->before_round(round, more);
      };
    }
  }
  if (gather_overlap_ && gather_overlap_->pending()) {  // the last step's weights, chunk by chunk
    hooks.chunk_first = [this](int dir, bool computed) {
      return gather_overlap_->chunk_first(dir, computed);
    };
  }
  exec_->set_grad_hooks(std::move(hooks));
  FP8_ASSIGN_OR_RETURN(auto rows, batcher_->rows(split, step, d * M * B, (d + 1) * M * B));
  std::map<std::pair<int, int>, model::MicroBatch> cache;
  auto batch = [&](int stream, int mb) -> const model::MicroBatch& {
    auto [it, fresh] = cache.try_emplace({stream, mb});
    if (fresh) {
      const int64_t g = stream * sched->mb_per_stream() + mb;
      it->second.B = B;
      it->second.T = T;
      it->second.tokens.assign(rows.begin() + g * B * (T + 1),
                               rows.begin() + (g + 1) * B * (T + 1));
    }
    return it->second;
  };
  const float scale = backward ? 1.0f / static_cast<float>(dp * M) : 0.0f;
  for (auto* p : all_params()) std::fill(p->grad_acc.begin(), p->grad_acc.end(), 0.0);
  auto run = exec_->run(batch, scale);
  exec_->set_grad_hooks({});
  FP8_ASSIGN_OR_RETURN(auto st, std::move(run));
  FP8_RETURN_IF_ERROR(finish_param_gather());  // sets of chunks without compute (none so far)
  if (backward && gather_posted_) FP8_RETURN_IF_ERROR(log_param_gather());
  if (overlap) {
    FP8_RETURN_IF_ERROR(overlap_->end());  // the rest, in the order every member posts them
    // Once: how much of the exchange the pipeline can hide.
    if (overlap_logged_ < 1) {
      std::vector<double> n = {static_cast<double>(overlap_->started()),
                               static_cast<double>(overlap_->hidden()),
                               static_cast<double>(overlap_->local_sets())};
      FP8_RETURN_IF_ERROR(sum_over_world(n));
      // Each rank's most message buffers held at once (every set is started by now), the
      // largest over ranks: the overlap's transient memory.
      FP8_ASSIGN_OR_RETURN(const double peak,
                           max_over_world(overlap_->exchange().take_peak_buffer_bytes()));
      if (is_root()) {
        log::info(
            "ZeRO-1 overlap: {} of {} gradient exchanges (sets of holders, counted on "
            "each member) started during the pipeline, {} of them with compute left on "
            "their rank ({}); at most {:.2f} MB of message buffers held at once on a rank",
            n[0], n[2], n[1], overlap_->matched() ? "at matched-group rounds" : "when final",
            peak / (1024.0 * 1024.0));
      }
      ++overlap_logged_;
    }
  }
  const size_t D = st.loss.mtp.size();
  std::vector<double> v = {st.loss.main, st.loss.total, static_cast<double>(st.loss.tokens),
                           static_cast<double>(st.loss_microbatches), 0.0};
  for (auto* moe : all_moes()) v[4] += moe->stats().aux_loss;
  v.resize(5 + cfg_.model().mtp_depth(), 0.0);
  for (size_t k = 0; k < D; ++k) v[5 + k] = st.loss.mtp[k];
  FP8_RETURN_IF_ERROR(sum_over_world(v));
  model::LossParts lp;
  const double n = std::max(1.0, v[3]);
  lp.main = v[0] / n;
  lp.total = v[1] / n;
  lp.tokens = static_cast<int64_t>(v[2]);
  lp.aux = v[4] / n;
  for (int k = 0; k < cfg_.model().mtp_depth(); ++k) lp.mtp.push_back(v[5 + k] / n);
  return lp;
}

Result<const parallel::Schedule*> Trainer::schedule_for(int microbatches) {
  if (microbatches == sched_->microbatches) return &*sched_;
  auto it = ramp_scheds_.find(microbatches);
  if (it == ramp_scheds_.end()) {
    FP8_ASSIGN_OR_RETURN(auto s,
                         parallel::make_schedule(sched_->kind, sched_->ranks, microbatches));
    it = ramp_scheds_.emplace(microbatches, std::move(s)).first;
  }
  return &it->second;
}

Status Trainer::make_grad_sync() {
  if (!grad_sync_) {
    std::map<std::string, parallel::SyncEntry> entries;
    std::map<std::string, std::vector<int>> holders;
    for (auto* p : all_params()) {
      auto& e = entries[p->name];
      e.name = p->name;
      e.numel = p->grad.numel();
      if (static_cast<int64_t>(p->grad_acc.size()) != e.numel) p->grad_acc.assign(e.numel, 0.0);
      e.copies.push_back(p->grad_acc.data());
      holders[p->name] = parallel::holders_of(p->name, *sched_, parts_, *topo_,
                                              cfg_.model().moe().routed_experts());
    }
    std::vector<parallel::SyncEntry> list;
    for (auto& [n, e] : entries) list.push_back(e);
    grad_sync_ = std::make_unique<parallel::NameSync>(
        list, holders, world_rank_, comms_ ? &comms_->get(parallel::GroupKind::kWorld) : nullptr,
        grad_set_key());
  }
  return Status::Ok();
}

parallel::SetKey Trainer::grad_set_key() const {
  return [this](const std::string& name) { return parallel::stages_holding(name, parts_); };
}

Status Trainer::setup_grad_overlap() {
  if (overlap_checked_) return Status::Ok();
  overlap_checked_ = true;
  if (!cfg_.optim().overlap_grad_reduce() || world_size_ == 1) return Status::Ok();
  parallel::SetExchange* ex = nullptr;
  if (dev_opt_) {
    ex = dev_grad_sync_.get();
  } else {
    FP8_RETURN_IF_ERROR(make_grad_sync());
    ex = grad_sync_.get();
  }
  if (!ex) return Status::Ok();
  auto dirs_of = [this](int rank, const std::string& name) {
    return parallel::dirs_holding(name, *sched_, parts_, topo_->coords_of(rank).stage);
  };
  auto pp_of = [this](int rank) { return topo_->coords_of(rank).stage; };
  overlap_ = std::make_unique<parallel::GradOverlap>(*ex, world_rank_, dirs_of, pp_of);
  return Status::Ok();
}

Status Trainer::log_param_gather() {
  gather_posted_ = false;
  if (gather_logged_ >= 1) return Status::Ok();
  ++gather_logged_;
  const parallel::GatherOverlap& g = *gather_overlap_;
  std::vector<double> n = {
      static_cast<double>(g.at_first_use()), static_cast<double>(g.after_compute()),
      static_cast<double>(g.by_finish()), static_cast<double>(gather_overlap_->exchange().sets())};
  FP8_RETURN_IF_ERROR(sum_over_world(n));
  FP8_ASSIGN_OR_RETURN(const double peak,
                       max_over_world(gather_overlap_->exchange().take_peak_buffer_bytes()));
  if (is_root()) {
    log::info(
        "ZeRO-1 overlap: {} of {} weight all-gathers (sets of holders, counted on each member) "
        "ended at their chunk's first use in the next step, {} of them after compute had run on "
        "their rank, {} by a wait outside it (an evaluation, a checkpoint); at most {:.2f} MB of "
        "message buffers held at once on a rank",
        n[0], n[3], n[1], n[2], peak / (1024.0 * 1024.0));
  }
  return Status::Ok();
}

Status Trainer::on_chunk_final(int dir, bool more_compute) {
  if (!nan_checked_) {
    nan_checked_ = true;
    FP8_RETURN_IF_ERROR(
        fault_inject::maybe_nan_grad(*be_, world_rank_, step_ + 1, chunks_[dir]->params()));
  }
  return overlap_->chunk_final(dir, more_compute);
}

// Sums every parameter's copies by global name, then the global gradient norm: each rank adds
// the squares of its ZeRO-1 shards (each element counted once over the world), in owned_ order.
Result<double> Trainer::sync_grads_and_norm() {
  FP8_RETURN_IF_ERROR(make_grad_sync());
  FP8_RETURN_IF_ERROR(grad_sync_->reduce_scatter_sum());  // ZeRO-1: this rank's shards
  for (auto* p : all_params()) {  // the fp64 sums, rounded once, are what the optimizer sees
    float* g = p->host_grad.data_as<float>();
    for (int64_t i = 0; i < p->host_grad.numel(); ++i) g[i] = static_cast<float>(p->grad_acc[i]);
  }
  std::vector<double> sq = {0.0};
  for (const Owned& o : owned_) {
    const float* g = o.copies.front()->host_grad.data_as<float>();
    for (int64_t i = o.begin; i < o.end; ++i) sq[0] += static_cast<double>(g[i]) * g[i];
  }
  FP8_RETURN_IF_ERROR(sum_over_world(sq));
  return std::sqrt(sq[0]);
}

// optim.placement=device: the sums by name on the backend (DeviceNameSync: the host path's
// shards and bits), each fp64 sum rounded to fp32 in place of the parameter's gradient, and the
// squares of this rank's shards in owned_ order, as sync_grads_and_norm does on the host
// (bitwise on the CPU backend). One rank with one copy of everything sums the flat buffer at once
// (its zero gaps add exact zeros).
Result<double> Trainer::device_sync_grads_and_norm() {
  if (dev_grad_sync_) FP8_RETURN_IF_ERROR(dev_grad_sync_->reduce_scatter_sum());
  FP8_RETURN_IF_ERROR(be_->round_f64(flat_acc_, flat_grad_));
  std::vector<double> sq = {0.0};
  if (!dev_grad_sync_) {
    const Tensor* all[] = {&flat_grad_};
    FP8_RETURN_IF_ERROR(be_->sum_squares(all, &sq[0]));  // one synchronization on a device
    return std::sqrt(sq[0]);
  }
  std::vector<Tensor> shards;
  for (const Owned& o : owned_) {
    if (o.begin == o.end) continue;
    FP8_ASSIGN_OR_RETURN(Tensor g,
                         o.copies.front()->grad.reshape({o.copies.front()->grad.numel()}));
    shards.push_back(g.slice_rows(o.begin, o.end));
  }
  std::vector<const Tensor*> ptrs;
  for (const Tensor& t : shards) ptrs.push_back(&t);
  FP8_RETURN_IF_ERROR(be_->sum_squares(ptrs, &sq[0]));
  FP8_RETURN_IF_ERROR(sum_over_world(sq));
  return std::sqrt(sq[0]);
}

// Expert loads summed over every copy of each MoE layer (keyed by its bias name), then the
// auxiliary-loss-free bias update, identical on every copy.
Status Trainer::update_router_biases() {
  auto moes = all_moes();
  if (!load_sync_) {
    loads_.resize(moes.size());
    std::vector<parallel::SyncEntry> list;
    std::map<std::string, std::vector<int>> holders;
    std::map<std::string, size_t> at;
    for (size_t i = 0; i < moes.size(); ++i) {
      const std::string& name = moes[i]->bias().name;
      loads_[i].resize(moes[i]->bias().value.numel());
      auto [it, fresh] = at.try_emplace(name, list.size());
      if (fresh) list.push_back({name, {}, static_cast<int64_t>(loads_[i].size())});
      list[it->second].copies.push_back(loads_[i].data());
      holders[name] = parallel::holders_of(name, *sched_, parts_, *topo_);
    }
    load_sync_ = std::make_unique<parallel::NameSync>(
        list, holders, world_rank_, comms_ ? &comms_->get(parallel::GroupKind::kWorld) : nullptr);
  }
  for (size_t i = 0; i < moes.size(); ++i) {
    const auto& load = moes[i]->stats().load;
    for (size_t e = 0; e < load.size(); ++e) loads_[i][e] = static_cast<double>(load[e]);
  }
  FP8_RETURN_IF_ERROR(load_sync_->all_reduce_sum());
  // Called before this step's tokens are counted: the switch sees the tokens before the step.
  const float gamma = switched(cfg_.model().moe().bias_update_rate(),
                               cfg_.model().moe().bias_update_rate_after(), tokens_seen_);
  for (size_t i = 0; i < moes.size(); ++i) {
    auto& load = moes[i]->stats().load;
    for (size_t e = 0; e < load.size(); ++e) load[e] = static_cast<int64_t>(loads_[i][e]);
    FP8_RETURN_IF_ERROR(optim::update_router_bias(moes[i]->bias().host_value.data_as<float>(),
                                                  load.data(), static_cast<int64_t>(load.size()),
                                                  gamma));
  }
  return Status::Ok();
}

}  // namespace fp8pipe
