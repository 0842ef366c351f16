#include "launch/trainer.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>

#include "core/config.h"
#include "core/hf_import.h"
#include "core/json.h"
#include "core/log.h"
#include "core/op_profile.h"
#include "core/safetensors.h"
#include "launch/fault_inject.h"
#include "launch/flops.h"
#include "optim/bias_update.h"

namespace fp8pipe {

model::ModelCtx make_ctx(const config::Config& cfg, Backend* be) {
  model::ModelCtx c;
  c.be = be;
  switch (cfg.precision().mode()) {
    case config::Precision::FP8:
      c.precision = model::Precision::kFP8;
      break;
    case config::Precision::BF16:
      c.precision = model::Precision::kBF16;
      break;
    default:
      c.precision = model::Precision::kFP32;
      break;
  }
  c.gemm = cfg.precision().gemm() == "exact" ? GemmMode::kExact : GemmMode::kFast;
  c.qp.pow2 = cfg.precision().pow2_scales();
  const std::string& attn = cfg.precision().attention();
  const bool gpu = be->device() != Device::kCpu;
  c.attention_gemm = attn == "gemm" || attn == "gemm_bf16" || (attn == "auto" && gpu);
  c.attention_bf16 = attn == "gemm_bf16" || (attn == "auto" && gpu);
  c.count_nonfinite = false;  // a synchronization per quantization on a GPU (module.h)
  c.fp8_dispatch = cfg.precision().fp8_dispatch();
  c.bf16_combine = cfg.precision().bf16_combine();
  c.recompute_mla_up = recomputes(cfg.train(), "mla_up_proj");
  c.recompute_norm = recomputes(cfg.train(), "rmsnorm");
  c.fp8_swiglu_cache = cfg.precision().fp8_swiglu_cache();
  c.bf16_norm_inputs = cfg.precision().bf16_norm_inputs();
  const std::string_view cache = fp8pipe::attn_out_cache(cfg.precision());
  c.attn_out_cache = cache == "e5m6"   ? model::ModelCtx::AttnOutCache::kE5M6
                     : cache == "e4m3" ? model::ModelCtx::AttnOutCache::kE4M3
                                       : model::ModelCtx::AttnOutCache::kBf16;
  // cuBLASLt's FP8 GEMMs refuse an expert's odd token counts (FP8.md §3.3): pad them on a GPU,
  // where the refused shapes would fall back to a dequantize + fp32 GEMM.
  if (c.precision == model::Precision::kFP8 && be->device() != Device::kCpu) {
    c.expert_row_align = 16;
  }
  return c;
}

// This rank's GPU: its index among the ranks of its host (as the launcher reports it: OpenMPI,
// MPICH, Slurm; else the layout's node-local index) modulo the GPUs the process sees, so ranks
// share GPUs round-robin when there are more ranks than GPUs (parallel.comm_backend=mpi only).
int local_gpu(const parallel::Topology& topo) {
  int local = topo.coords().local_rank;
  for (const char* v : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"}) {
    if (const char* s = std::getenv(v); s != nullptr && *s != '\0') {
      local = std::atoi(s);
      break;
    }
  }
  return local % std::max(1, cuda_device_count());
}

Result<std::unique_ptr<Trainer>> Trainer::create(const config::Config& cfg, const Runtime* rt) {
  std::unique_ptr<Trainer> t(new Trainer());
  t->cfg_ = cfg;
  if (cfg.train().device() == "cuda") {
    const int dev = rt ? local_gpu(rt->topo) : 0;
    FP8_ASSIGN_OR_RETURN(t->be_, make_cuda_backend(dev));
    if (rt && rt->topo.world_size() > 1) {
      log::info("rank {}: GPU {} of {} on this host", rt->topo.rank(), dev, cuda_device_count());
    }
  } else {
    t->be_ = make_cpu_backend();
  }
  if (!cfg.log().op_profile().empty()) {
    t->be_ = make_profiled_backend(std::move(t->be_), &t->op_profile_);
  }
  FP8_RETURN_IF_ERROR(t->setup_parallel(rt));
  FP8_RETURN_IF_ERROR(t->setup_model());
  FP8_RETURN_IF_ERROR(t->setup_optimizer());
  FP8_RETURN_IF_ERROR(t->setup_data());
  FP8_RETURN_IF_ERROR(t->setup_checkpoints());
  return t;
}

Status Trainer::setup_model() {
  ctx_ = make_ctx(cfg_, be_.get());
  if (topo_->ep() > 1) {  // routed experts sharded over the ep group (parallel/expert_comm.h)
    ep_comm_ = std::make_unique<parallel::CommExpertComm>(
        &exchange_comms()->get(parallel::GroupKind::kExpert), parallel::ep_ranks_per_node(*topo_));
    ctx_.ep = ep_comm_.get();
    ctx_.ep_two_level = cfg_.parallel().ep_dispatch() == "two_level";
  }
  const int prank = topo_->coords().stage;
  for (int dir = 0; dir < parallel::chunks_per_rank(*sched_); ++dir) {
    chunks_.push_back(std::make_unique<model::Model>());
    const model::ModelPart& part = parts_[parallel::stage_of(*sched_, prank, dir)];
    FP8_RETURN_IF_ERROR(chunks_.back()->init(ctx_, cfg_.model(), cfg_.train().seed(), part));
  }
  model_ = chunks_[0].get();
  exec_ = std::make_unique<parallel::PipelineExecutor>(
      *sched_, prank, comms_ ? &exchange_comms()->get(parallel::GroupKind::kPipeline) : nullptr,
      [&] {
        std::vector<model::Model*> v;
        for (auto& c : chunks_) v.push_back(c.get());
        return v;
      }(),
      &ctx_, cfg_.model().hidden(), cfg_.parallel().fb_overlap());
  flops_per_token_ = flops_per_token(cfg_.model(), cfg_.train().seq_len()).train();
  int64_t n = 0;
  for (auto* p : all_params()) n += p->value.numel();
  log::info(
      "model: {} parameters on this rank ({} chunk(s)), {} precision, {} GEMMs, {:.3g} "
      "train FLOP/token",
      n, chunks_.size(), model::precision_name(ctx_.precision), cfg_.precision().gemm(),
      flops_per_token_);
  return Status::Ok();
}

Status Trainer::setup_optimizer() {
  const auto& o = cfg_.optim();
  optim::AdamWConfig ac;
  ac.beta1 = o.beta1();
  ac.beta2 = o.beta2();
  ac.eps = o.eps();
  ac.weight_decay = o.weight_decay();
  ac.clip_norm = cfg_.train().grad_clip();
  // ZeRO-1: a rank keeps Adam state only for its shard of each parameter (sharded over every
  // rank holding the name: dp replicas, or an expert's ep owners, and DualPipe's two copies).
  setup_owned();
  // Parameters move into the flat buffers before the host AdamW records where they are.
  FP8_ASSIGN_OR_RETURN(const bool on_device, use_device_optimizer());
  if (on_device) FP8_RETURN_IF_ERROR(flatten_params());
  std::vector<optim::ParamGroup> groups;
  for (const Owned& o : owned_) {
    if (o.begin == o.end) continue;
    model::Param* p = o.copies.front();
    groups.push_back({o.name, p->host_value.data_as<float>() + o.begin,
                      p->host_grad.data_as<float>() + o.begin, o.begin, o.end, p->decay});
  }
  if (o.ema_decay() > 0) ema_ = std::make_unique<optim::ParamEma>(o.ema_decay(), groups);
  FP8_ASSIGN_OR_RETURN(auto opt, optim::AdamW::create(ac, std::move(groups)));
  opt_.emplace(std::move(opt));
  if (on_device) FP8_RETURN_IF_ERROR(setup_device_optimizer());
  const int64_t total =
      o.decay_steps() > 0 ? o.warmup_steps() + o.decay_steps() : cfg_.train().steps();
  if (o.schedule() == "cosine" && o.warmup_steps() > total) {
    return FP8_INVALID(
        "optim.warmup_steps={} exceeds the cosine schedule's length {} (train.steps, "
        "or warmup_steps + optim.decay_steps when decay_steps > 0)",
        o.warmup_steps(), total);
  }
  if (o.schedule() == "constant") {
    FP8_ASSIGN_OR_RETURN(auto s, optim::LrSchedule::constant(o.lr(), o.warmup_steps()));
    lr_.emplace(s);
  } else if (o.schedule() == "step") {
    FP8_ASSIGN_OR_RETURN(auto s, optim::LrSchedule::step_decay(o.lr(), o.min_lr(), o.warmup_steps(),
                                                               o.step_every(), o.step_gamma()));
    lr_.emplace(s);
  } else if (o.schedule() == "phases") {
    std::vector<optim::LrPhase> phases;
    for (const auto& ph : o.phase()) {
      optim::LrPhase q;
      q.until_tokens = ph.until_tokens();
      q.shape = ph.shape() == "linear"   ? optim::LrPhase::Shape::kLinear
                : ph.shape() == "cosine" ? optim::LrPhase::Shape::kCosine
                                         : optim::LrPhase::Shape::kConstant;
      q.has_lr = ph.has_lr();
      q.lr = ph.lr();
      phases.push_back(q);
    }
    FP8_ASSIGN_OR_RETURN(auto s,
                         optim::LrSchedule::phases(o.lr(), o.warmup_steps(), std::move(phases)));
    lr_.emplace(s);
  } else {
    FP8_ASSIGN_OR_RETURN(
        auto s, optim::LrSchedule::warmup_cosine(o.lr(), o.min_lr(), o.warmup_steps(), total));
    lr_.emplace(s);
  }
  return Status::Ok();
}

// optim.placement: device puts the fp64 gradient sums and AdamW on be_ (Param::grad_acc_dev,
// DeviceAdamW, and on several ranks the ZeRO-1 exchanges on the backend: DeviceNameSync); auto
// does so on a GPU, where it saves the per-instruction gradient downloads, the host AdamW and the
// weight uploads.
Result<bool> Trainer::use_device_optimizer() {
  const std::string& placement = cfg_.optim().placement();
  if (placement == "device") return true;
  return placement == "auto" && be_->device() != Device::kCpu;
}

Status Trainer::flatten_params() {
  constexpr int64_t kAlign = 64;  // 256 bytes of fp32 between tensors
  int64_t total = 0;
  for (auto* p : all_params()) total += (p->value.numel() + kAlign - 1) / kAlign * kAlign;
  FP8_ASSIGN_OR_RETURN(flat_value_, be_->zeros({total}, DType::kF32));
  FP8_ASSIGN_OR_RETURN(flat_grad_, be_->zeros({total}, DType::kF32));
  FP8_ASSIGN_OR_RETURN(flat_acc_, be_->zeros({total}, DType::kF64));
  int64_t off = 0;
  flat_offset_.clear();
  for (auto* p : all_params()) {
    const int64_t n = p->value.numel();
    const Shape& shape = p->value.shape();
    FP8_ASSIGN_OR_RETURN(Tensor value, flat_value_.slice_rows(off, off + n).reshape(shape));
    FP8_RETURN_IF_ERROR(be_->copy(p->value, value));
    p->value = value;
    FP8_ASSIGN_OR_RETURN(p->grad, flat_grad_.slice_rows(off, off + n).reshape(shape));
    FP8_ASSIGN_OR_RETURN(p->grad_acc_dev, flat_acc_.slice_rows(off, off + n).reshape(shape));
    if (be_->device() == Device::kCpu) {  // host copies alias on the CPU
      p->host_value = p->value;
      p->host_grad = p->grad;
    }
    flat_offset_.push_back(off);
    off += (n + kAlign - 1) / kAlign * kAlign;
  }
  exec_->set_flat_grads(flat_grad_, flat_acc_);
  return Status::Ok();
}

Status Trainer::setup_device_optimizer() {
  // owned_ follows all_params() (first copies), so the groups' flat offsets increase.
  std::map<const model::Param*, int64_t> offset;
  const auto params = all_params();
  for (size_t i = 0; i < params.size(); ++i) offset[params[i]] = flat_offset_[i];
  std::vector<optim::TensorGroup> groups;
  std::vector<int64_t> offsets;
  bool exchange = world_size_ > 1;
  std::vector<parallel::DeviceEntry> sums, weights;
  std::map<std::string, std::vector<int>> holders;
  for (const Owned& o : owned_) {
    model::Param* p = o.copies.front();
    exchange = exchange || o.copies.size() > 1;
    parallel::DeviceEntry sum{o.name, {}}, weight{o.name, {}};
    for (model::Param* c : o.copies) {
      sum.copies.push_back(c->grad_acc_dev);
      weight.copies.push_back(c->value);
    }
    sums.push_back(std::move(sum));
    weights.push_back(std::move(weight));
    holders[o.name] = o.holders;
    if (o.begin == o.end) continue;  // an empty shard: no host group either
    groups.push_back({o.name, &p->value, &p->grad, p->decay, o.begin, o.end});
    offsets.push_back(offset.at(p));
  }
  if (exchange) {
    parallel::Comm* world =
        exchange_comms() ? &exchange_comms()->get(parallel::GroupKind::kWorld) : nullptr;
    FP8_ASSIGN_OR_RETURN(const int64_t bucket, parallel::DeviceNameSync::bucket_bytes());
    dev_grad_sync_ = std::make_unique<parallel::DeviceNameSync>(*be_, sums, holders, world_rank_,
                                                                world, bucket, grad_set_key());
    dev_param_sync_ = std::make_unique<parallel::DeviceNameSync>(
        *be_, std::move(weights), holders, world_rank_, world, bucket, grad_set_key());
  }
  const optim::FlatLayout flat{flat_value_, flat_grad_, offsets};
  FP8_ASSIGN_OR_RETURN(auto d, optim::DeviceAdamW::create(*be_, *opt_, std::move(groups), flat));
  dev_opt_.emplace(std::move(d));
  std::string how;
  if (world_size_ > 1) {
    how = fmt::format(", ZeRO-1 exchanges over {} in {} buckets",
                      nccl_comms_ ? "NCCL on device tensors" : "MPI", dev_grad_sync_->buckets());
  } else if (exchange) {
    how = ", local copies summed there";
  }
  log::info("optimizer: fp64 gradient sums and AdamW on {} (optim.placement={}){}", be_->name(),
            cfg_.optim().placement(), how);
  return Status::Ok();
}

// optim.placement=device: the host copies that saves read (weights, moments, step count).
Status Trainer::sync_host() {
  FP8_RETURN_IF_ERROR(finish_param_gather());  // saves read whole weights
  if (!dev_opt_) return Status::Ok();
  if (be_->device() != Device::kCpu) {
    for (auto* p : all_params()) FP8_RETURN_IF_ERROR(be_->copy(p->value, p->host_value));
  }
  return dev_opt_->store_to(*opt_);
}

void Trainer::setup_owned() {
  std::map<std::string, size_t> at;
  for (auto* p : all_params()) {
    auto [it, fresh] = at.try_emplace(p->name, owned_.size());
    if (!fresh) {
      owned_[it->second].copies.push_back(p);
      continue;
    }
    owned_at_[p->name] = owned_.size();
    Owned o;
    o.name = p->name;
    o.copies = {p};
    o.holders =
        parallel::holders_of(p->name, *sched_, parts_, *topo_, cfg_.model().moe().routed_experts());
    const auto pos = std::find(o.holders.begin(), o.holders.end(), world_rank_);
    const optim::Range r =
        optim::shard_range(p->value.numel(), static_cast<int>(pos - o.holders.begin()),
                           static_cast<int>(o.holders.size()));
    o.begin = r.begin;
    o.end = r.end;
    owned_.push_back(std::move(o));
  }
}

Status Trainer::setup_param_gather() {
  if (gather_checked_) return Status::Ok();
  gather_checked_ = true;
  if (!dev_opt_) {
    std::vector<parallel::GatherEntry> entries;
    std::map<std::string, std::vector<int>> holders;
    for (const Owned& o : owned_) {
      entries.push_back({o.name, o.copies.front()->host_value.data_as<float>(),
                         o.copies.front()->host_value.numel()});
      holders[o.name] = o.holders;
    }
    param_gather_ = std::make_unique<parallel::ShardGather>(
        std::move(entries), std::move(holders), world_rank_,
        comms_ ? &comms_->get(parallel::GroupKind::kWorld) : nullptr, grad_set_key());
  }
  if (!cfg_.optim().overlap_param_gather() || world_size_ == 1) return Status::Ok();
  parallel::GatherExchange* ex = dev_opt_
                                     ? static_cast<parallel::GatherExchange*>(dev_param_sync_.get())
                                     : param_gather_.get();
  if (!ex) return Status::Ok();
  if (!dev_opt_ && nccl_comms_) {
    // The host all-gather goes over MPI, whose messages move only inside MPI calls; a rank
    // waiting on the pipeline's NCCL makes none, so a wait inside the pipeline could hang.
    if (is_root()) {
      log::info(
          "optim.overlap_param_gather: off with optim.placement=host and "
          "parallel.comm_backend=nccl (the host all-gather runs over MPI after the optimizer)");
    }
    return Status::Ok();
  }
  // Per set: this rank's chunks holding it (a set's names have the same stages, SetKey); the
  // sets posted in GatherOverlap's global order.
  const int my_stage = topo_->coords().stage;
  std::vector<std::vector<int>> dirs(ex->sets());
  std::set<std::string> in_sets;
  for (size_t k = 0; k < ex->sets(); ++k) {
    const std::vector<std::string> names = ex->set_names(k);
    dirs[k] = parallel::dirs_holding(names.front(), *sched_, parts_, my_stage);
    in_sets.insert(names.begin(), names.end());
  }
  std::vector<size_t> order = parallel::GatherOverlap::global_order(*ex, parts_);
  for (const Owned& o : owned_)
    if (!in_sets.count(o.name)) unshared_.push_back(o.name);
  gather_overlap_ = std::make_unique<parallel::GatherOverlap>(
      *ex, std::move(dirs), std::move(order),
      [this, ex](size_t k) { return weights_ready(ex->set_names(k)); });
  return Status::Ok();
}

Status Trainer::gather_params(bool defer) {
  FP8_RETURN_IF_ERROR(finish_param_gather());  // one all-gather in flight at a time
  FP8_RETURN_IF_ERROR(setup_param_gather());
  if (defer && gather_overlap_) {
    FP8_RETURN_IF_ERROR(gather_overlap_->start());
    gather_posted_ = true;
    return weights_ready(unshared_);
  }
  if (dev_opt_) return dev_param_sync_ ? dev_param_sync_->all_gather() : Status::Ok();
  FP8_RETURN_IF_ERROR(param_gather_->all_gather());
  for (const Owned& o : owned_) {  // a second local copy (DualPipe's embedding) follows the first
    for (size_t c = 1; c < o.copies.size(); ++c)
      FP8_RETURN_IF_ERROR(be_->copy(o.copies.front()->host_value, o.copies[c]->host_value));
  }
  return Status::Ok();
}

Status Trainer::finish_param_gather() {
  if (!gather_overlap_ || !gather_overlap_->pending()) return Status::Ok();
  return gather_overlap_->finish();
}

Status Trainer::weights_ready(const std::vector<std::string>& names) {
  const bool upload = !dev_opt_ && be_->device() != Device::kCpu;
  for (const std::string& name : names) {
    const Owned& o = owned_[owned_at_.at(name)];
    const model::Param* first = o.copies.front();
    for (size_t c = 1; c < o.copies.size(); ++c) {
      if (dev_opt_) {
        FP8_RETURN_IF_ERROR(be_->copy(first->value, o.copies[c]->value));
      } else {
        FP8_RETURN_IF_ERROR(be_->copy(first->host_value, o.copies[c]->host_value));
      }
    }
    if (upload)
      for (model::Param* p : o.copies) FP8_RETURN_IF_ERROR(be_->copy(p->host_value, p->value));
  }
  return Status::Ok();
}

// Where the step runs. The model's forward and backward run on be_ (train.device). With
// optim.placement=host the rest of a step is host work on each Param's host_value / host_grad:
// the fp64 gradient sums (the executor downloads each chunk's gradients per compute instruction
// on a device), the name sums and norm, AdamW on the fp32 master weights, the router-bias update
// and checkpoints. On the CPU backend host_value and host_grad are value and grad (no copy); on
// a device this costs, per step, one download of every gradient per backward instruction and one
// upload of every weight (below). With optim.placement=device (auto on a GPU in a world of one)
// the sums, the norm and AdamW run on be_ (setup_device_optimizer) and only the router biases
// travel per step; host copies are refreshed for saves (sync_host).
Status Trainer::upload_params(bool weights) {
  if (be_->device() == Device::kCpu) return Status::Ok();
  for (auto* p : all_params()) {
    if (weights) FP8_RETURN_IF_ERROR(be_->copy(p->host_value, p->value));
  }
  for (auto* moe : all_moes())
    FP8_RETURN_IF_ERROR(be_->copy(moe->bias().host_value, moe->bias().value));
  return Status::Ok();
}

Status Trainer::setup_data() {
  const auto& d = cfg_.data();
  data::SourceSpec spec;
  spec.source = d.source();
  spec.path = d.path();
  spec.token_dtype = d.token_dtype();
  spec.vocab_size = cfg_.model().vocab_size();
  spec.order = d.synthetic().order();
  spec.branching = d.synthetic().branching();
  spec.seed = d.synthetic().seed();
  FP8_ASSIGN_OR_RETURN(source_, data::open_source(spec));
  synthetic_ = std::dynamic_pointer_cast<data::SyntheticMarkov>(source_);
  if (synthetic_) {
    log::info("data: synthetic Markov chain, entropy rate {:.4f} nats/token (the loss floor)",
              synthetic_->entropy_rate());
  }
  data::BatchSpec bs;
  bs.global_batch = cfg_.train().global_batch();
  bs.seq_len = cfg_.train().seq_len();
  bs.seed = cfg_.train().seed();
  bs.heldout_fraction = d.heldout_fraction();
  FP8_ASSIGN_OR_RETURN(auto plan, batch_plan(cfg_));
  if (plan.ramped()) {
    bs.plan = std::make_shared<const data::BatchPlan>(std::move(plan));
    if (is_root()) {
      log::info("batch ramp: {} sequences per step rising to {} by {} over {} steps ({} tokens)",
                bs.plan->batch(0), bs.plan->full(), cfg_.train().batch_ramp().increment(),
                bs.plan->ramp_steps(), bs.plan->first_sample(bs.plan->ramp_steps()) * bs.seq_len);
    }
  }
  FP8_ASSIGN_OR_RETURN(auto b, data::Batcher::create(source_, bs));
  batcher_.emplace(std::move(b));
  return Status::Ok();
}

Result<StepResult> Trainer::train_step() {
  if (flat_grad_.defined()) {  // every gradient and sum at once
    FP8_RETURN_IF_ERROR(be_->fill_zero(flat_grad_));
    FP8_RETURN_IF_ERROR(be_->fill_zero(flat_acc_));
  } else {
    for (auto* p : all_params()) FP8_RETURN_IF_ERROR(be_->fill_zero(p->grad));
  }
  for (auto* moe : all_moes()) moe->reset_stats();
  ctx_.nonfinite_groups = 0;
  nan_checked_ = false;
  StepResult r;
  // Settings that follow the tokens trained before this step (DeepSeek-V3's λ and γ switches).
  const float lambda =
      switched(cfg_.model().mtp_lambda(), cfg_.model().mtp_lambda_after(), tokens_seen_);
  for (auto& c : chunks_) c->set_mtp_lambda(lambda);
  r.batch = batcher_->rows_in(data::Split::kTrain, step_);
  FP8_ASSIGN_OR_RETURN(r.loss, run_microbatches(data::Split::kTrain, step_, true));
  if (!nan_checked_) {  // else injected at the first chunk's end (on_chunk_final)
    FP8_RETURN_IF_ERROR(fault_inject::maybe_nan_grad(*be_, world_rank_, step_ + 1, all_params()));
  }
  FP8_ASSIGN_OR_RETURN(r.grad_norm,
                       dev_opt_ ? device_sync_grads_and_norm() : sync_grads_and_norm());
  r.lr = lr_->lr(step_ + 1, tokens_seen_);
  const bool finite = std::isfinite(r.grad_norm) && std::isfinite(r.loss.total);
  if (!finite) {
    if (cfg_.fault().on_nonfinite() != "skip" || skipped_ >= cfg_.fault().max_skips()) {
      return FP8_ERROR(
          Code::kAborted,
          "step {}: non-finite loss ({}) or gradient norm ({}); fault.on_nonfinite={}, "
          "{} steps skipped of fault.max_skips={}",
          step_ + 1, r.loss.total, r.grad_norm, cfg_.fault().on_nonfinite(), skipped_,
          cfg_.fault().max_skips());
    }
    ++skipped_;
    r.skipped = true;
  } else {
    const float clip = optim::AdamW::clip_factor(r.grad_norm, cfg_.train().grad_clip());
    if (ema_) ema_->wait();  // the last average has read the weights this step overwrites
    if (dev_opt_) {
      FP8_RETURN_IF_ERROR(dev_opt_->step(r.lr, clip));
    } else {
      FP8_RETURN_IF_ERROR(opt_->step(r.lr, clip));
    }
    // Inside run() with optim.overlap_param_gather: posted here, ended in the next step.
    const bool defer = defer_gather_ && cfg_.optim().overlap_param_gather();
    FP8_RETURN_IF_ERROR(gather_params(defer));
    ++ctx_.weight_version;
    FP8_RETURN_IF_ERROR(update_router_biases());
    // Uploads of the host placement's weights: by weights_ready when the all-gather was posted.
    FP8_RETURN_IF_ERROR(upload_params(/*weights=*/!dev_opt_ && !(defer && gather_overlap_)));
    if (ema_) {
      FP8_RETURN_IF_ERROR(download_weights());  // the average reads the host copies
      ema_->update_async();
    }
  }
  ++step_;
  tokens_seen_ += r.loss.tokens;
  be_->compute().synchronize();  // a device's queued tail (AdamW) belongs to this step's time
  return r;
}

StepRecord Trainer::record(const StepResult& r, double seconds) {
  StepRecord rec;
  rec.step = step_;
  rec.loss = r.loss.main;
  for (double l : r.loss.mtp) rec.mtp_loss += l / r.loss.mtp.size();
  rec.aux_loss = r.loss.aux;
  rec.lr = r.lr;
  rec.grad_norm = r.grad_norm;
  rec.ms = seconds * 1e3;
  rec.tokens_per_s = r.loss.tokens / seconds;
  rec.tflops = rec.tokens_per_s * flops_per_token_ / 1e12;
  rec.mem_gib = resident_gib();
  rec.tensor_gib = static_cast<double>(be_->memory().peak) / (1024.0 * 1024 * 1024);
  rec.tokens_seen = tokens_seen_;
  rec.batch = r.batch;
  rec.ramping = r.batch < cfg_.train().global_batch();
  rec.skipped = skipped_;
  int i = 0;
  for (auto* moe : all_moes()) {
    const auto& load = moe->stats().load;
    double sum = 0, mx = 0;
    int dead = 0;
    for (int64_t l : load) {
      sum += l;
      mx = std::max<double>(mx, l);
      dead += l == 0;
    }
    const double ratio = sum > 0 ? mx / (sum / load.size()) : 0;
    rec.loads.push_back({fmt::format("moe{}", i++), ratio, dead});
    rec.expert_overload = std::max(rec.expert_overload, ratio);
    rec.dropped += moe->stats().dropped;
    for (int64_t b : moe->stats().a2a_bytes) rec.a2a_bytes += b;
  }
  return rec;
}

Status Trainer::run(MetricsSink& sink) {
  const auto& t = cfg_.train();
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  defer_gather_ = true;  // each step's all-gather may end in the next (optim.overlap_param_gather)
  while (step_ < t.steps()) {
    const auto t0 = Clock::now();
    FP8_RETURN_IF_ERROR(trace_step_begin());
    be_->reset_peak_memory();
    auto stepped = train_step();  // an error names the step (a timeout names its op and peer)
    if (!stepped.ok()) return stepped.status().with_context(fmt::format("step {}", step_ + 1));
    StepResult r = std::move(*stepped);
    FP8_RETURN_IF_ERROR(trace_step_end());
    StepRecord rec = record(r, std::chrono::duration<double>(Clock::now() - t0).count());
    if (t.eval_every() > 0 && (step_ % t.eval_every() == 0 || step_ == t.steps())) {
      FP8_ASSIGN_OR_RETURN(rec.eval_loss, evaluate(t.eval_batches()));
      if (ema_) {
        FP8_ASSIGN_OR_RETURN(rec.eval_ema_loss, evaluate_ema(t.eval_batches()));
      }
    }
    sink.write(rec);
    FP8_RETURN_IF_ERROR(maybe_checkpoint());
    if (op_profile_ && !profile_start_) {  // the profile starts after this run's first step
      op_profile_->reset();
      profile_start_ = Clock::now();
      profile_from_ = step_ + 1;
    }
    FP8_ASSIGN_OR_RETURN(bool stop,
                         should_stop(std::chrono::duration<double>(Clock::now() - start).count()));
    if (stop) {
      stopped_early_ = true;
      if (is_root()) log::info("stopping after step {} (SIGTERM or fault.walltime_s)", step_);
      break;
    }
  }
  defer_gather_ = false;
  FP8_RETURN_IF_ERROR(finish_param_gather());  // the weights whole when run() returns
  if (op_profile_ && profile_start_) {
    FP8_RETURN_IF_ERROR(write_op_profile(
        std::chrono::duration<double, std::milli>(Clock::now() - *profile_start_).count()));
  }
  return finish_checkpoints();
}

// log.op_profile: this rank's totals from profile_from_ on as JSON; rank 0 also logs the table.
Status Trainer::write_op_profile(double wall_ms) {
  const std::vector<OpStats> stats = op_profile_->totals();
  const std::string path = rank_path(cfg_.log().op_profile(), world_rank_);
  json::Value doc = op_stats_json(stats, wall_ms);
  doc.set("rank", world_rank_);
  doc.set("backend", be_->name());
  doc.set("first_step", profile_from_);
  doc.set("last_step", step_);
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr)
    return FP8_ERROR(Code::kIo, "log.op_profile: cannot open '{}' for writing", path);
  const std::string text = json::write(doc, 1) + "\n";
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  if (std::fclose(f) != 0 || !ok)
    return FP8_ERROR(Code::kIo, "log.op_profile: cannot write '{}'", path);
  if (is_root()) {
    log::info("op profile of steps {}..{} on {} (rank 0; every rank's JSON: {}):\n{}",
              profile_from_, step_, be_->name(), cfg_.log().op_profile(),
              format_op_table(stats, wall_ms, 15));
  }
  return Status::Ok();
}

// Stop when any rank got SIGTERM or the wall-time budget is spent: a MAX all-reduce, so every
// rank takes the same decision after the same step (STYLE.md 8).
Result<bool> Trainer::should_stop(double elapsed_s) {
  const double budget = cfg_.fault().walltime_s();
  const bool mine = (stop_flag_ && stop_flag_->load()) || (budget > 0 && elapsed_s >= budget);
  std::vector<double> v = {mine ? 1.0 : 0.0};
  if (comms_ && world_size_ > 1) {
    FP8_RETURN_IF_ERROR(comms_->get(parallel::GroupKind::kWorld)
                            .all_reduce(v.data(), v.data(), 1, parallel::DataType::kFloat64,
                                        parallel::ReduceOp::kMax)
                            .wait());
  }
  return v[0] > 0;
}

// log.trace: the steps [trace_start, trace_start + trace_steps) (1-based) are traced on every
// rank and written to the path with "{rank}" replaced (Chrome trace / Perfetto JSON).
Status Trainer::trace_step_begin() {
  const auto& l = cfg_.log();
  const int64_t next = step_ + 1;
  if (l.trace().empty() || next < l.trace_start() || next >= l.trace_start() + l.trace_steps()) {
    return Status::Ok();
  }
  if (!tracer_) tracer_ = std::make_unique<parallel::Tracer>(world_rank_);
  exec_->set_tracer(tracer_.get(), next);
  return Status::Ok();
}

Status Trainer::trace_step_end() {
  exec_->set_tracer(nullptr, 0);
  const auto& l = cfg_.log();
  if (!tracer_ || step_ + 1 < l.trace_start() + l.trace_steps()) return Status::Ok();
  const std::string path = rank_path(l.trace(), world_rank_);
  FP8_RETURN_IF_ERROR(tracer_->write(path));
  log::info("trace: {} events of steps {}..{} written to {}", tracer_->size(), l.trace_start(),
            l.trace_start() + l.trace_steps() - 1, path);
  tracer_.reset();
  return Status::Ok();
}

Result<double> Trainer::evaluate(int64_t batches) {
  FP8_RETURN_IF_ERROR(finish_param_gather());
  double sum = 0;
  for (int64_t b = 0; b < batches; ++b) {
    FP8_ASSIGN_OR_RETURN(auto lp, run_microbatches(data::Split::kHeldout, b, false));
    sum += lp.main;
  }
  for (auto* moe : all_moes()) moe->reset_stats();
  return sum / std::max<int64_t>(1, batches);
}

// The device AdamW on a GPU updates the weights there, leaving their host copies stale: copies
// them down (each owned parameter's first copy, the one the optimizer groups point into).
// Otherwise the host copies are current already.
Status Trainer::download_weights() {
  if (!dev_opt_ || be_->device() == Device::kCpu) return Status::Ok();
  for (const Owned& o : owned_) {
    model::Param* p = o.copies.front();
    FP8_RETURN_IF_ERROR(be_->copy(p->value, p->host_value));
  }
  return Status::Ok();
}

Result<double> Trainer::evaluate_ema(int64_t batches) {
  if (!ema_) return FP8_INVALID("evaluate_ema: optim.ema_decay is 0 (no moving average)");
  FP8_RETURN_IF_ERROR(finish_param_gather());
  FP8_RETURN_IF_ERROR(download_weights());
  std::vector<std::vector<float>> keep;
  for (const Owned& o : owned_) {
    const Tensor& v = o.copies.front()->host_value;
    keep.emplace_back(v.data_as<float>(), v.data_as<float>() + v.numel());
  }
  ema_->copy_to_params();  // this rank's slices; the holders exchange them as after AdamW
  FP8_RETURN_IF_ERROR(gather_params());
  FP8_RETURN_IF_ERROR(upload_params());
  ++ctx_.weight_version;
  auto loss = evaluate(batches);
  for (size_t i = 0; i < owned_.size(); ++i) {
    for (model::Param* p : owned_[i].copies) {
      std::copy(keep[i].begin(), keep[i].end(), p->host_value.data_as<float>());
    }
  }
  FP8_RETURN_IF_ERROR(upload_params());
  ++ctx_.weight_version;
  return loss;
}

Status Trainer::save_model(const std::string& path) {
  FP8_RETURN_IF_ERROR(sync_host());
  safetensors::Writer w;
  auto add = [&](const model::Param& p) -> Status {
    auto* bytes = static_cast<const uint8_t*>(p.host_value.data());
    return w.add(p.name, "F32", p.value.shape(),
                 std::span<const uint8_t>(bytes, p.host_value.nbytes()));
  };
  // A rank may hold a parameter in two chunks (DualPipe puts the first and the last stage, each
  // with an "embed.weight", on one rank; the copies are equal, their gradients being summed by
  // name): write each global name once.
  std::set<std::string> written;
  for (auto* p : all_params())
    if (written.insert(p->name).second) FP8_RETURN_IF_ERROR(add(*p));
  for (auto* moe : all_moes()) FP8_RETURN_IF_ERROR(add(moe->bias()));
  w.set_metadata("format", "fp8pipe-model");
  w.set_metadata("step", std::to_string(step_));
  return w.write(path);
}

Status Trainer::load_model(const std::string& path) {
  FP8_ASSIGN_OR_RETURN(int64_t step, load_model_file(path));
  if (step >= 0) step_ = step;
  return Status::Ok();
}

// Every parameter and router bias this rank holds from `read` (into its host copy), then to the
// backend; a moving average restarts at them (the average of other weights would mean nothing).
Status Trainer::load_weights(const std::function<Status(model::Param&)>& read) {
  FP8_RETURN_IF_ERROR(finish_param_gather());  // a late shard must not overwrite what is read
  for (auto* p : all_params()) FP8_RETURN_IF_ERROR(read(*p));
  for (auto* moe : all_moes()) FP8_RETURN_IF_ERROR(read(moe->bias()));
  FP8_RETURN_IF_ERROR(upload_params());
  if (ema_) ema_->reset();
  ++ctx_.weight_version;
  return Status::Ok();
}

// The weights and router biases of a model-only file; the step it records (-1 if none).
Result<int64_t> Trainer::load_model_file(const std::string& path) {
  FP8_ASSIGN_OR_RETURN(auto r, safetensors::Reader::open(path));
  auto load = [&](model::Param& p) -> Status {
    FP8_ASSIGN_OR_RETURN(const safetensors::TensorView* v, r.get(p.name));
    if (v->dtype != "F32" || v->shape != p.value.shape()) {
      return FP8_INVALID("{}: tensor '{}' is {} {}, the model needs F32 {}", path, p.name, v->dtype,
                         v->shape_str(), shape_str(p.value.shape()));
    }
    std::memcpy(p.host_value.data(), v->data, v->nbytes);
    return Status::Ok();
  };
  FP8_RETURN_IF_ERROR(load_weights(load));
  auto it = r.metadata().find("step");
  return it == r.metadata().end() ? int64_t{-1} : std::stoll(it->second);
}

// checkpoint.init_from: another run's weights and router biases by global name, at step 0 with
// fresh optimizer state. From a checkpoint the tensors are re-sliced from whichever shards hold
// them (any layout); the optimizer moments and the data position there are not read.
Status Trainer::init_from(const std::string& path) {
  namespace fs = std::filesystem;
  const std::string field = "checkpoint.init_from=" + path;
  std::error_code ec;
  if (hf::is_hf_folder(path)) {  // a Hugging Face DeepseekV3 folder (core/hf_import.h)
    auto folder = hf::Folder::open(path, cfg_.model());
    if (!folder.ok()) return folder.status().with_context(field);
    FP8_RETURN_IF_ERROR(load_weights([&](model::Param& p) -> Status {
      const Status s = (*folder)->read(p.name, p.value.shape(), p.host_value.data_as<float>());
      return s.ok() ? s : s.with_context(field);
    }));
    if (is_root()) {
      std::vector<std::string> kinds;
      for (const auto& [dtype, n] : (*folder)->dtypes_read()) {
        kinds.push_back(fmt::format("{} {}", n, dtype));
      }
      log::info(
          "checkpoint: initialized the weights from the Hugging Face folder {} ({} tensors); "
          "starting at step 0 with fresh optimizer state",
          path, fmt::join(kinds, ", "));
    }
  } else if (fs::is_regular_file(path, ec)) {
    auto step = load_model_file(path);
    if (!step.ok()) return step.status().with_context(field);
    if (is_root()) {
      log::info("checkpoint: initialized the weights from {} (its step {}); starting at step 0",
                path, *step);
    }
  } else if (fs::is_directory(path, ec)) {
    // a step directory (it has a manifest), else a root whose newest committed step is used
    const bool step_dir = fs::exists(fs::path(path) / std::string(ckpt::kManifestFile), ec);
    auto found = step_dir ? ckpt::resolve(fs::path(path).parent_path().string(), path, false)
                          : ckpt::resolve(path, "", false);
    if (!found.ok()) return found.status().with_context(field);
    if (!*found) {
      return FP8_INVALID(
          "{}: no committed checkpoint there (a checkpoint root, a step directory "
          "or a model .safetensors file)",
          field);
    }
    auto loaded = ckpt::Loaded::open((*found)->step_dir, std::move((*found)->manifest));
    if (!loaded.ok()) return loaded.status().with_context(field);
    FP8_RETURN_IF_ERROR(load_weights([&](model::Param& p) -> Status {
      const ckpt::TensorRecord* t = loaded->manifest().find(p.name);
      if (!t) return FP8_INVALID("{}: no tensor '{}' (another model?)", field, p.name);
      if (t->shape != p.value.shape()) {
        return FP8_INVALID("{}: tensor '{}' has shape {}, this model needs {}", field, p.name,
                           shape_str(t->shape), shape_str(p.value.shape()));
      }
      return loaded->read(p.name, "F32", 0, p.value.numel(), p.host_value.data());
    }));
    if (is_root()) {
      log::info(
          "checkpoint: initialized the weights from {} (step {}, {} tokens, {}); starting at "
          "step 0 with fresh optimizer state",
          loaded->step_dir(), loaded->manifest().step, loaded->manifest().tokens_seen,
          loaded->manifest().topology.to_string());
    }
  } else {
    return FP8_INVALID("{}: no such file or directory", field);
  }
  // placement=device keeps its own weights: start them from the loaded host copies
  return dev_opt_ ? dev_opt_->load_from(*opt_) : Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// Checkpoints: what a rank saves and restores (the format and its guarantees: core/checkpoint.h).

Status Trainer::setup_checkpoints() {
  const auto& k = cfg_.checkpoint();
  if (k.dir().empty()) return Status::Ok();
  ckpt_ = std::make_unique<ckpt::Checkpointer>(
      ckpt::Options{k.dir(), k.keep_last(), k.keep_every(), k.async()});
  if (world_size_ > 1) ckpt_col_ = checkpoint_collective();
  return Status::Ok();
}

// The N-rank save's collectives on the world communicator: a MIN agreement and a gather of
// strings to rank 0 (lengths, then bytes, point to point).
ckpt::Collective Trainer::checkpoint_collective() {
  ckpt::Collective col;
  col.rank = world_rank_;
  col.size = world_size_;
  parallel::Comm* w = &comms_->get(parallel::GroupKind::kWorld);
  col.agree = [w](bool ok) { return parallel::agree(*w, ok); };
  col.gather = [w, this](const std::string& mine) -> Result<std::vector<std::string>> {
    constexpr int kLenTag = 32001, kDataTag = 32002;
    std::vector<std::string> all;
    if (world_rank_ != 0) {
      int64_t n = static_cast<int64_t>(mine.size());
      FP8_RETURN_IF_ERROR(w->send(&n, 1, parallel::DataType::kInt64, 0, kLenTag).wait());
      FP8_RETURN_IF_ERROR(w->send(mine.data(), n, parallel::DataType::kByte, 0, kDataTag).wait());
      return all;
    }
    all.resize(world_size_);
    all[0] = mine;
    for (int r = 1; r < world_size_; ++r) {
      int64_t n = 0;
      FP8_RETURN_IF_ERROR(w->recv(&n, 1, parallel::DataType::kInt64, r, kLenTag).wait());
      all[r].resize(n);
      FP8_RETURN_IF_ERROR(w->recv(all[r].data(), n, parallel::DataType::kByte, r, kDataTag).wait());
    }
    return all;
  };
  return col;
}

ckpt::Topology Trainer::topology() const {
  const auto& p = cfg_.parallel();
  return {p.pp(), p.dp(), p.ep(), p.pp() * p.dp()};
}

// This rank's slices: the fp32 master weights and bf16 moments of its optimizer groups (each
// group a [begin, end) of a global tensor, the whole tensor on one rank) and the router biases.
// Weights are borrowed (a sync save writes before returning; an async one copies them first).
ckpt::SaveRequest Trainer::checkpoint_request() {
  ckpt::SaveRequest r;
  r.step = step_;
  r.tokens_seen = tokens_seen_;
  r.optimizer_step = opt_->step_count();
  r.skipped_steps = skipped_;
  r.config = to_text(cfg_);
  r.topology = topology();
  r.rank = {world_rank_, topo_->coords().stage, topo_->coords().dp_index,
            step_,       cfg_.train().seed(),   step_,
            skipped_};
  std::map<std::string, Shape> shapes;
  for (auto* p : all_params()) shapes[p->name] = p->value.shape();
  for (const optim::ParamGroup& g : opt_->groups()) {
    auto* bytes = reinterpret_cast<const uint8_t*>(g.param);
    r.slices.push_back({g.name,
                        ckpt::Kind::kParam,
                        "F32",
                        shapes.at(g.name),
                        g.begin,
                        g.end,
                        0,
                        {bytes, size_t(g.numel()) * sizeof(float)},
                        nullptr});
  }
  for (optim::StateArray& a : opt_->export_state().arrays) {
    const bool sq = a.name.ends_with(".exp_avg_sq");
    const std::string param = a.name.substr(0, a.name.rfind(".exp_avg"));
    auto owned = std::make_shared<const std::vector<uint8_t>>(std::move(a.bytes));
    r.slices.push_back({a.name, sq ? ckpt::Kind::kExpAvgSq : ckpt::Kind::kExpAvg, "BF16",
                        shapes.at(param), a.begin, a.end, 0, *owned, owned});
  }
  if (ema_) {
    for (optim::StateArray& a : ema_->export_state()) {
      const std::string param = a.name.substr(0, a.name.size() - 4);  // "<param>.ema"
      auto owned = std::make_shared<const std::vector<uint8_t>>(std::move(a.bytes));
      r.slices.push_back(
          {a.name, ckpt::Kind::kEma, "F32", shapes.at(param), a.begin, a.end, 0, *owned, owned});
    }
  }
  std::set<std::string> biases;
  for (auto* moe : all_moes()) {
    const model::Param& b = moe->bias();
    // Every holder keeps an identical copy: the lowest holder writes it, once.
    if (parallel::holders_of(b.name, *sched_, parts_, *topo_).front() != world_rank_ ||
        !biases.insert(b.name).second) {
      continue;
    }
    r.slices.push_back({b.name,
                        ckpt::Kind::kRouterBias,
                        "F32",
                        b.value.shape(),
                        0,
                        b.value.numel(),
                        0,
                        {static_cast<const uint8_t*>(b.host_value.data()), b.host_value.nbytes()},
                        nullptr});
  }
  return r;
}

Status Trainer::save_checkpoint() {
  if (!ckpt_) return FP8_INVALID("save_checkpoint: checkpoint.dir is empty");
  FP8_RETURN_IF_ERROR(sync_host());
  FP8_RETURN_IF_ERROR(ckpt_->save(checkpoint_request(), collective()));
  last_checkpoint_step_ = step_;
  if (is_root()) {
    log::info("checkpoint: {} step {} ({})", ckpt_->options().async ? "writing" : "saved", step_,
              ckpt_->options().root);
  }
  return Status::Ok();
}

Status Trainer::maybe_checkpoint() {
  // An N-rank async save of an earlier step is committed now, after the step its write overlapped
  // (every rank is at this point after the same step).
  if (ckpt_) FP8_RETURN_IF_ERROR(finish_pending_checkpoint());
  const int64_t every = cfg_.checkpoint().every();
  if (!ckpt_ || every <= 0 || step_ % every != 0) return Status::Ok();
  return save_checkpoint();
}

Status Trainer::finish_checkpoints() {
  if (!ckpt_) return Status::Ok();
  if (last_checkpoint_step_ != step_) FP8_RETURN_IF_ERROR(save_checkpoint());
  return finish_pending_checkpoint();
}

Status Trainer::finish_pending_checkpoint() {
  const std::optional<int64_t> uncommitted = ckpt_->uncommitted_step();
  FP8_RETURN_IF_ERROR(ckpt_->finish(collective()));
  if (uncommitted && is_root()) {
    log::info("checkpoint: committed step {} ({})", *uncommitted, ckpt_->options().root);
  }
  return Status::Ok();
}

// Refuses a checkpoint this run cannot continue exactly: another layout (unless resharding is
// asked for) or another data seed. Warns when the LR schedule's length changed.
Status Trainer::check_resumable(const ckpt::Manifest& m, const ResumeOptions& opt) const {
  if (!(m.topology == topology()) && !opt.reshard) {
    return Status(Code::kInvalidArgument,
                  fmt::format("checkpoint step {} was written with {}; this run is {}", m.step,
                              m.topology.to_string(), topology().to_string()),
                  "pass --reshard to re-slice it by global tensor name");
  }
  for (const ckpt::RankState& rs : m.ranks) {
    if (rs.rng_seed != cfg_.train().seed() || rs.data_step != m.step) {
      return Status(Code::kInvalidArgument,
                    fmt::format("checkpoint step {}: rank {} has train.seed={} at data step {}; "
                                "this run has train.seed={} (the data order would change)",
                                m.step, rs.rank, rs.rng_seed, rs.data_step, cfg_.train().seed()),
                    fmt::format("run with --train.seed={}", rs.rng_seed));
    }
  }
  auto saved = parse_config_text(m.config, "checkpoint config");
  const auto& o = cfg_.optim();
  if (saved.ok() && o.decay_steps() == 0 && saved->train().steps() != cfg_.train().steps()) {
    log::warn(
        "checkpoint: train.steps {} -> {} with optim.decay_steps=0 changes the LR schedule "
        "after step {}; set optim.decay_steps to keep it",
        saved->train().steps(), cfg_.train().steps(), m.step);
  }
  return Status::Ok();
}

// Master weights (every parameter this rank holds, whole: ZeRO-1 shards only the optimizer state)
// and router biases, by global name, re-sliced from whichever shards cover them. One process
// also checks that the checkpoint holds nothing this model lacks.
Status Trainer::restore_tensors(const ckpt::Loaded& l) {
  std::set<std::string> want;
  auto check = [&](const std::string& name, const Shape& shape) -> Status {
    want.insert(name);
    const ckpt::TensorRecord* t = l.manifest().find(name);
    if (!t)
      return FP8_INVALID("checkpoint {}: no tensor '{}' (model changed?)", l.step_dir(), name);
    if (t->shape != shape) {
      return FP8_INVALID("checkpoint {}: tensor '{}' has shape {}, the model needs {}",
                         l.step_dir(), name, shape_str(t->shape), shape_str(shape));
    }
    return Status::Ok();
  };
  for (const Owned& o : owned_) {
    model::Param& p = *o.copies.front();
    FP8_RETURN_IF_ERROR(check(o.name, p.value.shape()));
    FP8_RETURN_IF_ERROR(check(o.name + ".exp_avg", p.value.shape()));
    FP8_RETURN_IF_ERROR(check(o.name + ".exp_avg_sq", p.value.shape()));
    FP8_RETURN_IF_ERROR(l.read(o.name, "F32", 0, p.value.numel(), p.host_value.data()));
    for (size_t c = 1; c < o.copies.size(); ++c)
      FP8_RETURN_IF_ERROR(be_->copy(p.host_value, o.copies[c]->host_value));
  }
  for (auto* moe : all_moes()) {
    model::Param& b = moe->bias();
    FP8_RETURN_IF_ERROR(check(b.name, b.value.shape()));
    FP8_RETURN_IF_ERROR(l.read(b.name, "F32", 0, b.value.numel(), b.host_value.data()));
  }
  FP8_RETURN_IF_ERROR(upload_params());
  if (world_size_ > 1) return Status::Ok();  // other ranks hold the other names
  for (const ckpt::TensorRecord& t : l.manifest().tensors) {
    // a moving average is optional state (restore_optimizer reads it when optim.ema_decay > 0)
    if (!want.count(t.name) && t.kind != ckpt::Kind::kEma)
      return FP8_INVALID("checkpoint {}: tensor '{}' is not in this model", l.step_dir(), t.name);
  }
  return Status::Ok();
}

Status Trainer::restore_optimizer(const ckpt::Loaded& l) {
  optim::AdamWState st;
  st.step = l.manifest().optimizer_step;
  for (const optim::ParamGroup& g : opt_->groups()) {
    for (const char* suffix : {".exp_avg", ".exp_avg_sq"}) {
      optim::StateArray a{g.name + suffix, g.begin, g.end,
                          std::vector<uint8_t>(size_t(g.numel()) * 2)};
      FP8_RETURN_IF_ERROR(l.read(a.name, "BF16", a.begin, a.end, a.bytes.data()));
      st.arrays.push_back(std::move(a));
    }
  }
  FP8_RETURN_IF_ERROR(opt_->import_state(st));
  if (ema_) FP8_RETURN_IF_ERROR(restore_ema(l));
  return dev_opt_ ? dev_opt_->load_from(*opt_) : Status::Ok();
}

// optim.ema_decay: the checkpoint's average when it has one for every group (re-sliced by name
// like the moments), else the average restarts at the restored weights.
Status Trainer::restore_ema(const ckpt::Loaded& l) {
  std::vector<optim::StateArray> arrays;
  for (const optim::ParamGroup& g : opt_->groups()) {
    const std::string name = g.name + ".ema";
    if (!l.manifest().find(name)) {
      if (is_root()) {
        log::warn(
            "checkpoint {} has no moving average '{}': optim.ema_decay restarts it at the "
            "restored weights",
            l.step_dir(), name);
      }
      ema_->reset();
      return Status::Ok();
    }
    optim::StateArray a{name, g.begin, g.end, std::vector<uint8_t>(size_t(g.numel()) * 4)};
    FP8_RETURN_IF_ERROR(l.read(name, "F32", a.begin, a.end, a.bytes.data()));
    arrays.push_back(std::move(a));
  }
  return ema_->import_state(arrays);
}

Status Trainer::resume(const ResumeOptions& opt) {
  const auto& k = cfg_.checkpoint();
  if (k.resume() == "none" || (k.resume() == "auto" && k.dir().empty())) {
    return k.init_from().empty() ? Status::Ok() : init_from(k.init_from());
  }
  const std::string which = k.resume() == "auto" ? "" : k.resume();
  FP8_ASSIGN_OR_RETURN(auto found, ckpt::resolve(k.dir(), which, opt.fallback));
  if (!found) {
    if (!k.init_from().empty()) return init_from(k.init_from());
    log::info("checkpoint: no committed checkpoint under {}; starting at step 0", k.dir());
    return Status::Ok();
  }
  if (!k.init_from().empty() && is_root()) {  // this run's own progress wins
    log::info("checkpoint: resuming this run from {}; checkpoint.init_from={} is not read",
              found->step_dir, k.init_from());
  }
  FP8_RETURN_IF_ERROR(check_resumable(found->manifest, opt));
  FP8_ASSIGN_OR_RETURN(auto loaded,
                       ckpt::Loaded::open(found->step_dir, std::move(found->manifest)));
  FP8_RETURN_IF_ERROR(restore_tensors(loaded));
  FP8_RETURN_IF_ERROR(restore_optimizer(loaded));
  const ckpt::Manifest& m = loaded.manifest();
  step_ = m.step;  // also the data position and, through the schedule, the LR
  tokens_seen_ = m.tokens_seen;
  skipped_ = m.skipped_steps;
  last_checkpoint_step_ = step_;
  ++ctx_.weight_version;            // cached quantized weights are stale
  if (comms_ && world_size_ > 1) {  // every rank must have resolved the same checkpoint
    std::vector<double> lo = {-static_cast<double>(step_)}, hi = {static_cast<double>(step_)};
    auto& w = comms_->get(parallel::GroupKind::kWorld);
    FP8_RETURN_IF_ERROR(w.all_reduce(lo.data(), lo.data(), 1, parallel::DataType::kFloat64,
                                     parallel::ReduceOp::kMax)
                            .wait());
    FP8_RETURN_IF_ERROR(w.all_reduce(hi.data(), hi.data(), 1, parallel::DataType::kFloat64,
                                     parallel::ReduceOp::kMax)
                            .wait());
    if (-lo[0] != hi[0]) {
      return FP8_ERROR(Code::kAborted,
                       "checkpoint: ranks resumed from different steps ({} .. {}) under {}", -lo[0],
                       hi[0], k.dir());
    }
  }
  if (is_root()) {
    log::info("checkpoint: resumed from {} (step {}, {} tokens, {} skipped)", found->step_dir,
              step_, tokens_seen_, skipped_);
    // The data position follows the step through the batch plan; a checkpoint written under
    // another train.global_batch or batch_ramp has seen other rows (the run goes on).
    const int64_t planned = batcher_->spec().plan ? batcher_->spec().plan->first_sample(step_)
                                                  : step_ * cfg_.train().global_batch();
    if (planned * cfg_.train().seq_len() != tokens_seen_) {
      log::warn(
          "checkpoint: {} tokens trained in {} steps, but this config's batches "
          "(train.global_batch, train.batch_ramp) make {}; the data continues at this config's "
          "step {} position",
          tokens_seen_, step_, planned * cfg_.train().seq_len(), step_);
    }
  }
  return Status::Ok();
}

}  // namespace fp8pipe
