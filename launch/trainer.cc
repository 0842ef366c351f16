#include "launch/trainer.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <cstring>

#include "core/log.h"
#include "core/safetensors.h"
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
  return c;
}

Result<std::unique_ptr<Trainer>> Trainer::create(const config::Config& cfg) {
  std::unique_ptr<Trainer> t(new Trainer());
  t->cfg_ = cfg;
  t->be_ = make_cpu_backend();
  FP8_RETURN_IF_ERROR(t->setup_model());
  FP8_RETURN_IF_ERROR(t->setup_optimizer());
  FP8_RETURN_IF_ERROR(t->setup_data());
  return t;
}

Status Trainer::setup_model() {
  ctx_ = make_ctx(cfg_, be_.get());
  model_ = std::make_unique<model::Model>();
  FP8_RETURN_IF_ERROR(model_->init(ctx_, cfg_.model(), cfg_.train().seed()));
  flops_per_token_ = flops_per_token(cfg_.model(), cfg_.train().seq_len()).train();
  int64_t n = 0;
  for (auto* p : model_->params()) n += p->value.numel();
  log::info("model: {} parameters, {} precision, {} GEMMs, {:.3g} train FLOP/token", n,
            model::precision_name(ctx_.precision), cfg_.precision().gemm(), flops_per_token_);
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
  std::vector<optim::ParamGroup> groups;
  for (auto* p : model_->params()) {
    groups.push_back({p->name, p->value.data_as<float>(), p->grad.data_as<float>(), 0,
                      p->value.numel(), p->decay});
  }
  FP8_ASSIGN_OR_RETURN(auto opt, optim::AdamW::create(ac, std::move(groups)));
  opt_.emplace(std::move(opt));
  const int64_t total =
      o.decay_steps() > 0 ? o.warmup_steps() + o.decay_steps() : cfg_.train().steps();
  if (o.schedule() == "constant") {
    FP8_ASSIGN_OR_RETURN(auto s, optim::LrSchedule::constant(o.lr(), o.warmup_steps()));
    lr_.emplace(s);
  } else {
    FP8_ASSIGN_OR_RETURN(
        auto s, optim::LrSchedule::warmup_cosine(o.lr(), o.min_lr(), o.warmup_steps(), total));
    lr_.emplace(s);
  }
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
  FP8_ASSIGN_OR_RETURN(auto b, data::Batcher::create(source_, bs));
  batcher_.emplace(std::move(b));
  return Status::Ok();
}

// Forward (and backward) of every micro-batch of one global batch; losses averaged.
Result<model::LossParts> Trainer::run_microbatches(data::Split split, int64_t step, bool backward) {
  const int64_t G = cfg_.train().global_batch(), T = cfg_.train().seq_len();
  const int64_t M = std::max<int64_t>(1, cfg_.parallel().microbatches());
  FP8_ASSIGN_OR_RETURN(auto rows, batcher_->global_batch(split, step));
  model::LossParts sum;
  for (int64_t mb = 0; mb < M; ++mb) {
    model::MicroBatch batch;
    batch.B = G / M;
    batch.T = T;
    batch.tokens.assign(rows.begin() + mb * batch.B * (T + 1),
                        rows.begin() + (mb + 1) * batch.B * (T + 1));
    FP8_ASSIGN_OR_RETURN(auto lp, model_->forward(ctx_, static_cast<int>(mb), batch));
    if (backward) {
      FP8_RETURN_IF_ERROR(model_->backward(ctx_, static_cast<int>(mb), 1.0f / M));
    } else {
      FP8_RETURN_IF_ERROR(model_->backward(ctx_, static_cast<int>(mb), 0.0f));  // frees state
    }
    sum.main += lp.main / M;
    sum.total += lp.total / M;
    sum.mtp.resize(lp.mtp.size());
    for (size_t k = 0; k < lp.mtp.size(); ++k) sum.mtp[k] += lp.mtp[k] / M;
    sum.tokens += lp.tokens;
  }
  return sum;
}

Status Trainer::update_router_biases() {
  const float gamma = cfg_.model().moe().bias_update_rate();
  for (auto* moe : model_->moes()) {
    auto& load = moe->stats().load;
    FP8_RETURN_IF_ERROR(optim::update_router_bias(moe->bias().value.data_as<float>(), load.data(),
                                                  static_cast<int64_t>(load.size()), gamma));
  }
  return Status::Ok();
}

Result<StepResult> Trainer::train_step() {
  for (auto* p : model_->params()) FP8_RETURN_IF_ERROR(be_->fill_zero(p->grad));
  for (auto* moe : model_->moes()) moe->reset_stats();
  ctx_.nonfinite_groups = 0;
  StepResult r;
  FP8_ASSIGN_OR_RETURN(r.loss, run_microbatches(data::Split::kTrain, step_, true));
  for (auto* moe : model_->moes())
    r.loss.aux += moe->stats().aux_loss / std::max(1, cfg_.parallel().microbatches());
  r.grad_norm = std::sqrt(opt_->grad_sq_sum());
  r.lr = lr_->lr(step_ + 1);
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
    FP8_RETURN_IF_ERROR(opt_->step(r.lr, clip));
    ++ctx_.weight_version;
    FP8_RETURN_IF_ERROR(update_router_biases());
  }
  ++step_;
  tokens_seen_ += r.loss.tokens;
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
  rec.tokens_seen = tokens_seen_;
  rec.skipped = skipped_;
  int i = 0;
  for (auto* moe : model_->moes()) {
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
  }
  return rec;
}

Status Trainer::run(MetricsSink& sink) {
  const auto& t = cfg_.train();
  using Clock = std::chrono::steady_clock;
  while (step_ < t.steps()) {
    const auto t0 = Clock::now();
    FP8_ASSIGN_OR_RETURN(StepResult r, train_step());
    StepRecord rec = record(r, std::chrono::duration<double>(Clock::now() - t0).count());
    if (t.eval_every() > 0 && (step_ % t.eval_every() == 0 || step_ == t.steps())) {
      FP8_ASSIGN_OR_RETURN(rec.eval_loss, evaluate(t.eval_batches()));
    }
    sink.write(rec);
  }
  return Status::Ok();
}

Result<double> Trainer::evaluate(int64_t batches) {
  double sum = 0;
  for (int64_t b = 0; b < batches; ++b) {
    FP8_ASSIGN_OR_RETURN(auto lp, run_microbatches(data::Split::kHeldout, b, false));
    sum += lp.main;
  }
  for (auto* moe : model_->moes()) moe->reset_stats();
  return sum / std::max<int64_t>(1, batches);
}

Status Trainer::save_model(const std::string& path) const {
  safetensors::Writer w;
  auto add = [&](const model::Param& p) -> Status {
    auto* bytes = static_cast<const uint8_t*>(p.value.data());
    return w.add(p.name, "F32", p.value.shape(), std::span<const uint8_t>(bytes, p.value.nbytes()));
  };
  for (auto* p : model_->params()) FP8_RETURN_IF_ERROR(add(*p));
  for (auto* moe : model_->moes()) FP8_RETURN_IF_ERROR(add(moe->bias()));
  w.set_metadata("format", "fp8pipe-model");
  w.set_metadata("step", std::to_string(step_));
  return w.write(path);
}

Status Trainer::load_model(const std::string& path) {
  FP8_ASSIGN_OR_RETURN(auto r, safetensors::Reader::open(path));
  auto load = [&](model::Param& p) -> Status {
    FP8_ASSIGN_OR_RETURN(const safetensors::TensorView* v, r.get(p.name));
    if (v->dtype != "F32" || v->shape != p.value.shape()) {
      return FP8_INVALID("{}: tensor '{}' is {} {}, the model needs F32 {}", path, p.name, v->dtype,
                         v->shape_str(), shape_str(p.value.shape()));
    }
    std::memcpy(p.value.data(), v->data, v->nbytes);
    return Status::Ok();
  };
  for (auto* p : model_->params()) FP8_RETURN_IF_ERROR(load(*p));
  for (auto* moe : model_->moes()) FP8_RETURN_IF_ERROR(load(moe->bias()));
  auto it = r.metadata().find("step");
  if (it != r.metadata().end()) step_ = std::stoll(it->second);
  ++ctx_.weight_version;
  return Status::Ok();
}

}  // namespace fp8pipe
