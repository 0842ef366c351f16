// The trainer: builds this rank's model chunks, optimizer, data and metrics from a validated
// config and runs the loop of DESIGN.md §2. Every micro-batch goes through the pipeline executor
// (a world of one runs the same schedule with one rank), then copies of each parameter are summed
// by global name over the pipeline and data-parallel ranks holding it (launch/trainer_parallel.cc).
// Setup is a sequence of named calls; the step body fits on one screen.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>

#include "core/checkpoint.h"
#include "core/data.h"
#include "core/model/transformer.h"
#include "core/op_profile.h"
#include "launch/metrics.h"
#include "optim/adamw.h"
#include "optim/device_adamw.h"
#include "optim/ema.h"
#include "optim/lr_schedule.h"
#include "parallel/executor.h"
#include "parallel/expert_comm.h"
#include "parallel/grad_sync.h"
#include "parallel/topology.h"

namespace fp8pipe {

// Command-line choices for resuming (cmd_train's --fallback and --reshard).
struct ResumeOptions {
  bool fallback = false;  // newest checkpoint corrupt: resume from the previous committed one
  bool reshard = false;   // accept a checkpoint of another layout, re-sliced by global name
};

struct StepResult {
  model::LossParts loss;  // averaged over micro-batches
  double grad_norm = 0;
  float lr = 0;
  int64_t batch = 0;  // sequences in the step's global batch (train.batch_ramp)
  bool skipped = false;
};

// The process's place in a multi-rank job: its layout and communicators (owned by the caller).
// The GPU of this process on its host (launcher's local rank modulo the visible GPUs).
int local_gpu(const parallel::Topology& topo);

struct Runtime {
  parallel::Topology topo;
  parallel::CommSet* comms = nullptr;
};

class Trainer {
 public:
  // rt null: a world of one (no MPI needed).
  static Result<std::unique_ptr<Trainer>> create(const config::Config& cfg,
                                                 const Runtime* rt = nullptr);

  Status run(MetricsSink& sink);  // steps [step(), train.steps)
  Result<StepResult> train_step();
  // Mean main loss over `batches` held-out global batches (no gradients kept).
  Result<double> evaluate(int64_t batches);
  // The same for the weights' moving average (optim.ema_decay > 0; collective): the average is
  // swapped into the weights for the evaluation, and the weights come back bitwise.
  Result<double> evaluate_ema(int64_t batches);

  // Model-only checkpoint (safetensors: every parameter and router bias by global name).
  Status save_model(const std::string& path);
  Status load_model(const std::string& path);
  // checkpoint.init_from: another run's weights at step 0 (resume() calls it when there is
  // nothing to resume).
  Status init_from(const std::string& path);

  // Checkpoints (DESIGN.md §6, core/checkpoint.h), when checkpoint.dir is set. resume() follows
  // checkpoint.resume (auto: the newest committed checkpoint if any; none; a step directory) and
  // restores master weights, Adam moments and step counter, router biases, step (hence the LR
  // and the data position), tokens seen and skipped steps. run() saves every checkpoint.every
  // steps and at the end (finish_checkpoints), which also waits for an async write.
  Status resume(const ResumeOptions& opt);
  Status save_checkpoint();
  // Waits for a pending async write; an N-rank one is committed now (collective).
  Status finish_pending_checkpoint();
  Status finish_checkpoints();

  // A flag the caller raises (SIGTERM): run() then stops after the current step, on every rank
  // together, saving a checkpoint. fault.walltime_s does the same after that many seconds.
  void set_stop_flag(const std::atomic<bool>* flag) { stop_flag_ = flag; }
  bool stopped_early() const { return stopped_early_; }

  int64_t step() const { return step_; }
  const config::Config& config() const { return cfg_; }
  model::Model& model() { return *model_; }  // this rank's first chunk (the whole model on one)
  // Every local chunk's parameters (a name twice where this rank holds two copies of it).
  std::vector<model::Param*> params() const { return all_params(); }
  bool is_root() const { return world_rank_ == 0; }
  model::ModelCtx& ctx() { return ctx_; }
  const data::SyntheticMarkov* synthetic() const { return synthetic_.get(); }

 private:
  Trainer() = default;
  Status setup_model();
  Status setup_optimizer();
  Status setup_data();
  Status setup_parallel(const Runtime* rt);
  Status trace_step_begin();
  Status trace_step_end();
  Result<model::LossParts> run_microbatches(data::Split split, int64_t step, bool backward);
  // The instruction list for M micro-batches per pipeline: sched_ (made for
  // parallel.microbatches), or one made for a batch ramp's smaller steps, kept for reuse.
  Result<const parallel::Schedule*> schedule_for(int microbatches);
  std::map<int, parallel::Schedule> ramp_scheds_;
  Result<double> sync_grads_and_norm();
  Status make_grad_sync();  // the host placement's NameSync of the fp64 sums (once)
  // The gradient exchange's sets: by holders and by the stages holding a name, so that each
  // stage's exchange can start when it is final (DualPipe's stage s and pp-1-s share holders).
  parallel::SetKey grad_set_key() const;
  // optim.overlap_grad_reduce on several ranks: the exchange whose sets start during the
  // pipeline (GradOverlap over grad_sync_ or dev_grad_sync_), made at the first training run.
  Status setup_grad_overlap();
  // The executor's hook at chunk dir's last backward work: FP8PIPE_TEST_NAN_GRAD's injection
  // (before anything of the step is sent), then the overlap.
  Status on_chunk_final(int dir, bool more_compute);
  std::unique_ptr<parallel::GradOverlap> overlap_;
  bool overlap_checked_ = false;  // setup_grad_overlap ran
  bool nan_checked_ = false;      // this step's fault injection ran
  int64_t overlap_logged_ = 0;    // steps whose overlap count was logged
  // optim.placement=device: the sums by name on the backend (ZeRO-1 reduce-scatter), rounded,
  // and the norm of this rank's shards summed over the world.
  Result<double> device_sync_grads_and_norm();
  Result<bool> use_device_optimizer();  // optim.placement, with the reason when it cannot
  Status flatten_params();
  Status setup_device_optimizer();
  // optim.placement=device: every parameter's value, gradient and fp64 sum as views of these (in
  // all_params() order, 64-element aligned, zero gaps), so that zeroing, accumulating, rounding,
  // the norm and AdamW are one backend call each (AdamW: one per run of equal decay flags)
  // instead of one per tensor.
  Tensor flat_value_, flat_grad_, flat_acc_;
  std::vector<int64_t> flat_offset_;  // per all_params() entry
  Status sync_host();  // optim.placement=device: weights and moments -> the host copies
  Status update_router_biases();
  std::vector<model::Param*> all_params() const;  // every local chunk's parameters
  // ZeRO-1: each global parameter on this rank, its local copies (DualPipe may hold one twice),
  // the world ranks holding it and the piece of it whose optimizer state this rank owns.
  struct Owned {
    std::string name;
    std::vector<model::Param*> copies;
    std::vector<int> holders;
    int64_t begin = 0, end = 0;
  };
  void setup_owned();
  std::map<std::string, size_t> owned_at_;  // name -> index in owned_
  // After the optimizer step: every holder gets every shard, every local copy the weights. With
  // defer and optim.overlap_param_gather on several ranks, the sets are only posted
  // (gather_overlap_): each ends before its chunk's first use in the next step's pipeline, or at
  // finish_param_gather().
  Status gather_params(bool defer = false);
  Status setup_param_gather();   // param_gather_ (host placement) and gather_overlap_, once
  Status finish_param_gather();  // ends a deferred all-gather (before reading the weights)
  // Names whose shards have landed: their second local copies follow the first and, with the
  // host placement on a device, the host copies go up.
  Status weights_ready(const std::vector<std::string>& names);
  std::unique_ptr<parallel::GatherOverlap> gather_overlap_;
  std::vector<std::string> unshared_;  // owned names of no gather set (this rank holds them alone)
  bool gather_checked_ = false;        // setup_param_gather ran
  bool defer_gather_ = false;          // run(): leave the all-gather to the next step
  bool gather_posted_ = false;         // a deferred all-gather was posted and not yet logged
  int64_t gather_logged_ = 0;
  // Once, the first training run after a deferred all-gather: how much ended inside the pipeline
  // (collective).
  Status log_param_gather();
  // Host master weights (unless the optimizer runs on the device) and router biases -> the
  // device (CPU: no-op).
  Status upload_params(bool weights = true);
  ckpt::Collective checkpoint_collective();
  std::vector<model::MoE*> all_moes() const;
  Status sum_over_world(std::vector<double>& v);
  Result<double> max_over_world(double v);  // the largest v over the world's ranks
  StepRecord record(const StepResult& r, double seconds);
  Status setup_checkpoints();
  Status maybe_checkpoint();
  ckpt::Topology topology() const;
  ckpt::SaveRequest checkpoint_request();
  Status check_resumable(const ckpt::Manifest& m, const ResumeOptions& opt) const;
  Status restore_tensors(const ckpt::Loaded& l);
  Status restore_optimizer(const ckpt::Loaded& l);
  Status restore_ema(const ckpt::Loaded& l);
  Status download_weights();  // optim.placement=device on a GPU: value -> host_value
  Result<int64_t> load_model_file(const std::string& path);  // -> the step it records, or -1
  Status load_weights(const std::function<Status(model::Param&)>& read);

  config::Config cfg_;
  std::unique_ptr<Backend> be_;
  // log.op_profile: the profile of be_ (a profiling wrapper), from step profile_from_ on.
  std::shared_ptr<OpProfile> op_profile_;
  std::optional<std::chrono::steady_clock::time_point> profile_start_;
  int64_t profile_from_ = 0;
  Status write_op_profile(double wall_ms);
  model::ModelCtx ctx_;
  std::vector<std::unique_ptr<model::Model>> chunks_;  // one per local pipeline chunk
  model::Model* model_ = nullptr;                      // chunks_[0]
  std::optional<parallel::Topology> topo_;
  parallel::CommSet* comms_ = nullptr;
  // parallel.comm_backend=nccl: NCCL mirrors of comms_ (device buffers) for the pipeline and
  // expert exchanges; everything else stays on comms_ (MPI, host memory).
  std::optional<parallel::CommSet> nccl_comms_;
  parallel::CommSet* exchange_comms() { return nccl_comms_ ? &*nccl_comms_ : comms_; }
  int world_rank_ = 0, world_size_ = 1;
  std::optional<parallel::Schedule> sched_;
  std::vector<model::ModelPart> parts_;
  std::unique_ptr<parallel::PipelineExecutor> exec_;
  std::unique_ptr<parallel::CommExpertComm> ep_comm_;  // ctx_.ep when parallel.ep > 1
  std::unique_ptr<parallel::NameSync> grad_sync_, load_sync_;
  std::vector<Owned> owned_;  // by global name
  std::unique_ptr<parallel::ShardGather> param_gather_;
  // optim.placement=device where a name has several copies (ranks or chunks): the gradient
  // reduce-scatter and weight all-gather on the backend's tensors (null: nothing to exchange).
  std::unique_ptr<parallel::DeviceNameSync> dev_grad_sync_, dev_param_sync_;
  std::unique_ptr<parallel::Tracer> tracer_;
  const std::atomic<bool>* stop_flag_ = nullptr;
  bool stopped_early_ = false;
  Result<bool> should_stop(double elapsed_s);
  std::vector<std::vector<double>> loads_;     // per local MoE: expert loads for the sync
  std::optional<optim::AdamW> opt_;            // host AdamW (also the checkpoint form of the state)
  std::optional<optim::DeviceAdamW> dev_opt_;  // optim.placement=device: the AdamW that steps
  // optim.ema_decay > 0: the moving average of this rank's optimizer groups (host memory).
  std::unique_ptr<optim::ParamEma> ema_;
  std::optional<optim::LrSchedule> lr_;
  std::shared_ptr<data::TokenSource> source_;
  std::shared_ptr<data::SyntheticMarkov> synthetic_;
  std::optional<data::Batcher> batcher_;
  int64_t step_ = 0, skipped_ = 0, tokens_seen_ = 0;
  double flops_per_token_ = 0;
  std::unique_ptr<ckpt::Checkpointer> ckpt_;
  ckpt::Collective ckpt_col_;  // N ranks: the checkpoint's collectives (world communicator)
  const ckpt::Collective* collective() const { return world_size_ > 1 ? &ckpt_col_ : nullptr; }
  int64_t last_checkpoint_step_ = -1;
};

// The precision/GEMM/FP8 settings of a config as a model context on `be`.
model::ModelCtx make_ctx(const config::Config& cfg, Backend* be);

}  // namespace fp8pipe
