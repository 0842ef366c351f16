// The pipeline executor: runs one rank's instruction list (parallel/schedule.h) through a table of
// handlers over this rank's model chunks, moving activations and gradients between stages with
// point-to-point messages on the pipeline communicator. A world of one runs the same code with no
// communicator (DESIGN.md §1: "a single process runs the same executor on a world of one").
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/model/transformer.h"
#include "parallel/comm.h"
#include "parallel/expert_comm.h"
#include "parallel/p2p_plan.h"
#include "parallel/schedule.h"
#include "parallel/trace.h"

namespace fp8pipe::parallel {

// Blocks per stage for `stages` stages of an L-layer model: as even as possible, extra blocks to
// the earlier stages (the last stage also carries the head and MTP modules).
Result<std::vector<model::ModelPart>> partition_stages(const config::Model& m, int stages);

// The stage that local chunk `dir` of pipeline rank `rank` runs (the inverse of rank_of).
int stage_of(const Schedule& s, int rank, int dir);
// Number of local chunks per rank: 2 for dualpipe/dualpipev, else 1.
int chunks_per_rank(const Schedule& s);

struct ExecutorStats {
  model::LossParts loss;  // sums over the micro-batches whose loss this rank computed
  int64_t loss_microbatches = 0;
};

class PipelineExecutor {
 public:
  // Micro-batch `mb` of stream `stream` (global micro-batch stream * mb_per_stream + mb).
  using BatchFn = std::function<const model::MicroBatch&(int stream, int mb)>;

  // chunks[dir] runs this rank's ops of `dir`; pp may be null when the schedule has one rank.
  // fb_overlap (config parallel.fb_overlap): interleave the two halves of an FB instruction at
  // their all-to-all waits (see run_fb); false runs the forward, then the backward.
  PipelineExecutor(const Schedule& s, int pp_rank, Comm* pp, std::vector<model::Model*> chunks,
                   model::ModelCtx* ctx, int64_t hidden, bool fb_overlap = true);
  ~PipelineExecutor();

  // One step's instruction list. Gradients of loss_scale * (each micro-batch's loss) accumulate.
  Result<ExecutorStats> run(const BatchFn& batch, float loss_scale);
  // Record executed instructions and communication waits of the following runs (null: stop),
  // with the compute slices inside compute instructions and, when ctx->ep is a CommExpertComm,
  // every MoE all-to-all from post to completion (parallel/trace.h).
  void set_tracer(Tracer* t, int64_t step);
  // optim.placement=device with every parameter's gradient and fp64 sum as views of `grads` and
  // `accs` (launch/trainer.cc): one chunk's flush is one accumulate_grad over the buffers (one
  // backend call instead of one per tensor). Only with a single chunk: with several, flushing
  // all of them at one chunk's flush would split the others' fp32 sums.
  void set_flat_grads(Tensor grads, Tensor accs);
  // The instruction list of the following runs: the same layout (kind, ranks, stages) with
  // another micro-batch count (a batch ramp's steps). `s` must outlive those runs.
  Status set_schedule(const Schedule& s);
  // Matched point-to-point groups (parallel/p2p_plan.h): sends and receives are held until their
  // plan's points and posted there in groups that the peers post alike. Needed by a comm whose
  // point-to-point ops block until matched (Comm::p2p_matched_groups, NCCL), the default there;
  // off (MPI's default): sends go when produced and each receive is waited where it stands.
  // FP8PIPE_P2P_GROUPS=matched|eager overrides the default (eager over NCCL is a negative
  // control: DualPipe deadlocks).
  void set_matched_groups(bool on) { matched_ = on; }
  // The plan of the current schedule's matched groups (computed once per schedule), or null when
  // groups are off or there is no pipeline communicator.
  Result<const P2pPlan*> plan();
  // Calls into the gradient exchange while the pipeline runs (launch/trainer.cc, ZeRO-1 overlap):
  // chunk_final(dir, ...) after the flush of chunk dir's last B, W or FB backward instruction of
  // the run (its gradient sums are final on this rank); before_round(r, ...) before this rank
  // posts a matched group of round r (matched groups only). more_compute: compute instructions
  // follow on this rank (what is posted now can hide behind them). chunk_first(dir, computed)
  // before the first compute instruction of the run that uses chunk dir (ZeRO-1's weight
  // all-gather, overlapped, ends there); computed: this rank has run compute already. Empty
  // functions are skipped; {} clears them.
  struct GradHooks {
    std::function<Status(int dir, bool more_compute)> chunk_final;
    std::function<Status(int round, bool more_compute)> before_round;
    std::function<Status(int dir, bool computed)> chunk_first;
  };
  void set_grad_hooks(GradHooks h) { hooks_ = std::move(h); }
  // Index of chunk dir's last instruction that adds to its gradients (B, W, or FB's backward
  // half), or -1 when the list has none (a forward-only list).
  static int last_grad_instr(const Schedule& s, int rank, int dir);
  bool matched_groups() const { return matched_; }
  bool fb_overlap() const { return fb_overlap_; }
  void set_fb_overlap(bool on) { fb_overlap_ = on; }

 private:
  using Key = std::pair<int, int>;  // (dir, mb)
  class Baton;
  // One half of a compute instruction: the work on chunk `dir`, run with its own copy of the
  // context (see run_half); `label` names its compute slices in the trace.
  struct Half {
    int dir = 0;
    std::string label;
    std::function<Status(model::ModelCtx&)> work;
  };
  Status forward(model::ModelCtx& c, const BatchFn& batch, int mb, int dir, int stage);
  Status backward(model::ModelCtx& c, int mb, int dir, int stage, bool defer_w, float loss_scale);
  Status weight(model::ModelCtx& c, int mb, int dir, int stage);
  Status compute(const Instr& in, const BatchFn& batch, float loss_scale);
  // Runs h on this thread. With a baton, h is fiber `me` of an overlapped FB: each all-to-all wait
  // first passes the baton to the other fiber. Adds h's non-finite FP8 group count to *nonfinite.
  Status run_half(const Half& h, Baton* baton, int me, int64_t* nonfinite);
  // FB with overlap: the forward and backward halves as two fibers (threads taking turns).
  Status run_fb(const Half& f, const Half& b);
  // Moves chunk `dir`'s fp32 gradients into their fp64 accumulators (Param::grad_acc): each
  // instruction's contribution is summed in fp64, so any schedule's order rounds alike in fp32.
  // On a device the gradients are downloaded first (one copy per parameter per instruction),
  // unless Param::grad_acc_dev is set (optim.placement=device): then the sum stays there.
  Status flush_grads(int dir);
  Status send(const Instr& in, int index);
  Status recv(const Instr& in, const BatchFn& batch);
  // A receive posted into a new tensor (through a host tensor on a host-only comm).
  struct Posted {
    int index = 0;
    Work work;
    Tensor dst, host;
    bool staged = false;  // received into host, copied to dst when done
  };
  Result<Posted> post_recv(const Instr& in, int index, const BatchFn& batch);
  Status finish_recv(const Instr& in, Posted p);
  // Matched groups: posts the groups of plan point `pt`, then waits for their receives.
  Status run_point(const P2pPoint& pt, const BatchFn& batch);
  Result<int> tag_of(const Instr& in) const;
  bool is_last(int stage) const { return stage == sched_->stages() - 1; }
  // Where the output of (stream, stage) goes when the next stage is on this rank: its dir.
  int local_next_dir(int stream, int stage, int step) const;

  const Schedule* sched_;
  int rank_;
  Comm* pp_;
  std::vector<model::Model*> chunks_;
  Tensor flat_grads_, flat_accs_;  // set_flat_grads
  model::ModelCtx* ctx_;
  int64_t hidden_;
  std::map<Key, Tensor> act_in_, act_out_, grad_in_, grad_out_;
  std::vector<std::pair<Work, Tensor>> pending_;  // sends in flight and their buffers
  bool matched_ = false;
  Status env_error_;  // a bad FP8PIPE_P2P_GROUPS, returned by run()
  P2pPlan plan_;      // for plan_sched_
  const Schedule* plan_sched_ = nullptr;
  std::map<int, Tensor> outbox_;  // matched groups: sends produced, not posted yet (by index)
  // Matched groups under a tracer: the comm instructions passed since the last point (index,
  // time) and the receives' wait ends, recorded at the point in instruction order (trace.h: the
  // calibration reads the instruction level in that order); a send's instant is when produced.
  std::vector<std::pair<int, double>> trace_run_;
  std::map<int, double> trace_recv_end_;
  void trace_comm_run();
  ExecutorStats stats_;
  bool fb_overlap_ = true;
  GradHooks hooks_;
  int last_compute_ = -1;  // this run's last compute instruction
  Tracer* tracer_ = nullptr;
  int64_t trace_step_ = 0;
  std::unique_ptr<CompletionClock> clock_;  // while tracing all-to-alls
  std::vector<CommExpertComm> traced_ep_;   // per chunk: ctx->ep recording into tracer_
};

}  // namespace fp8pipe::parallel
