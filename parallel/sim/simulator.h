// Discrete-event simulation of one training step: every pipeline rank's instruction list (the
// lists the executor runs) on two streams per rank — compute and comm — with per-op costs from
// cost_model.h (or given directly), then DP gradient sync, optimizer step and memory per GPU.
#pragma once

#include <string>
#include <vector>

#include "configs/fp8pipe.pb.h"
#include "core/status.h"
#include "parallel/p2p_plan.h"
#include "parallel/schedule.h"
#include "parallel/sim/cost_model.h"

namespace fp8pipe::parallel::sim {

struct MeasuredCosts;  // measured.h

// Per-op durations of the pipeline (seconds or any unit) and p2p message sizes. From a
// CostModel, or set directly (tests: Table 2 ratios). A deferred B costs b_input; a full B
// b_input + w; FB `fb` if >= 0, else max(F + full B, their exposed all-to-all) via the model.
struct OpCosts {
  // Either a cost model ...
  const CostModel* model = nullptr;
  // ... or uniform per-chunk costs (F, B = b_input + w, W, F&B) and p2p link parameters.
  double f = 1, b_input = 1, w = 1, fb = 3;
  double p2p_bytes = 0, p2p_latency = 0, p2p_bytes_per_s = 1;
  // ... or per-stage costs measured on a real run (measured.h): sends take no comm-stream time
  // (the message's whole cost is its latency) and comm ops hold the compute stream for their
  // measured host overhead.
  const MeasuredCosts* measured = nullptr;
  // Optional, [rank][dir]: no compute op of the chunk starts before it (optim.overlap_param_gather:
  // when its weights, posted after the last optimizer step, have landed).
  const std::vector<std::vector<double>>* release = nullptr;

  double op(const Instr& in) const;
  double overhead(const Instr& in) const;      // comm ops: compute-stream time (0 unless measured)
  double exposed_comm(const Instr& in) const;  // EP all-to-all time not hidden inside op()
  double send_bytes(int stage) const;
  double send_time(int stage) const;  // on the sender's comm stream (bytes / bandwidth)
  double latency() const;
};

struct TraceEvent {
  int rank = 0;
  bool comm = false;
  std::string name;
  double start = 0, dur = 0;
};

struct PipelineResult {
  double makespan = 0;                        // last compute op's end, every rank starting at 0
  std::vector<double> busy;                   // [rank] compute-stream busy time
  std::vector<double> exposed_a2a;            // [rank] EP all-to-all inside busy, not overlapped
  std::vector<double> recv_wait;              // [rank] compute idle waiting on a RECV
  std::vector<double> weight_wait;            // [rank] compute idle waiting on OpCosts::release
  std::vector<double> peak_act_units;         // [rank] peak held activations, in micro-batches
                                              //   of one chunk (weighted by the stage's bytes)
  std::vector<double> peak_act_bytes;         // [rank] same, bytes (model costs only)
  double bytes_sent = 0, bytes_received = 0;  // pipeline p2p, all ranks
  double op_cost_sum = 0;                     // sum of op() over every compute instruction
  std::vector<double> end;                    // [rank] its last op's end
  // [rank][dir] end of the chunk's last backward work (B, W, FB's backward half): where its
  // gradient sums are final (the ZeRO-1 overlap's start over MPI).
  std::vector<std::vector<double>> chunk_final;
  // Matched groups: [rank] (round, host time) of each group as the host posts it, in order.
  std::vector<std::vector<std::pair<int, double>>> group_posts;
  std::vector<TraceEvent> events;
  double bubble(int r) const { return makespan - busy[r]; }
};

// Runs all ranks' lists. Sends are posted on the comm stream when the compute stream reaches
// them (after the op that produced the data), serialise there, and arrive latency + bytes/bw
// later; a RECV blocks the compute stream until its message has arrived. With keep_events, the
// events are compute ops, sends (comm row) and receive waits (comm row, "R<..", maybe 0 long).
// With `groups` (the executor's matched groups over NCCL, p2p_plan.h) sends and receives move at
// their plan points instead: the host posts a point's groups when it reaches it, the comm stream
// runs a rank's groups one after another, a message moves once both its groups have started
// (rendezvous: NCCL's blocking sends), and the host waits at the point for the groups holding
// receives. Not modelled: an expert all-to-all queued behind an early send on a GPU that runs one
// NCCL kernel at a time. Events then are compute ops, each group on the comm row ("G<round>",
// from its start to its end) and the host's waits at points ("R"). simulate_step uses it when
// parallel.comm_backend is "nccl".
Result<PipelineResult> simulate_pipeline(const Schedule& s, const OpCosts& c,
                                         bool keep_events = false, const P2pPlan* groups = nullptr);

// Memory per GPU, bytes.
struct Memory {
  double params = 0, grads = 0, optimizer = 0, activations = 0, buffers = 0;
  double total() const { return params + grads + optimizer + activations + buffers; }
};

struct StepResult {
  PipelineResult pipe;
  // dp_sync_s: the DP exchange's time beyond the pipeline (exposed); dp_sync_total_s: all of it on
  // the worst rank (optim.overlap_grad_reduce hides the reduce-scatter under the pipeline,
  // optim.overlap_param_gather the all-gather under the next step's: what it does not hide shows
  // in pipe.weight_wait and the makespan).
  double step_s = 0, dp_sync_s = 0, dp_sync_total_s = 0, optimizer_s = 0;
  // The least share of a rank's NIC the DP exchange gets while the pipeline runs (the EP
  // all-to-all's IB traffic takes the rest; 1 when nothing of the exchange overlaps it).
  double dp_nic_share = 1;
  double bubble_s = 0, bubble_frac = 0;  // worst rank: makespan - busy, and / makespan
  double exposed_comm_s = 0;             // worst rank: exposed a2a + p2p waits + exposed DP sync
  Memory mem;                            // the rank with the largest total
  double params_per_gpu = 0;             // incl. DualPipe's second chunk
  std::vector<double> params_by_rank;    // [rank] parameters held
  double tokens_per_step = 0, tokens_per_s_per_gpu = 0;
  double model_flops_per_step = 0;  // all GPUs (F + B + W, recomputation excluded)
  double tflops_per_gpu = 0, mfu_bf16 = 0, mfu_fp8 = 0;
  double gpu_hours_per_trillion = 0;
  // EP all-to-all bytes one GPU sends per step (its F, B and FB instructions' chunks), the rank
  // sending the most: IB and NVLink (what the JSONL's a2a_bytes counts on a real run).
  double ep_ib_bytes = 0, ep_nvlink_bytes = 0;
};

// One representative pipeline (the pp ranks of one dp replica): dp replicas run the same lists
// on symmetric data, so every replica finishes at the same time (imbalance aside; see README).
Result<StepResult> simulate_step(const config::Config& cfg, const Schedule& s, const CostModel& cm,
                                 bool keep_events = false);

// Human-readable table of a StepResult (what `fp8pipe simulate` prints).
std::string format_step(const config::Config& cfg, const Schedule& s, const CostModel& cm,
                        const StepResult& r);

// Chrome trace (Perfetto): pid = rank, tid 0 = compute, 1 = comm; ts/dur in µs.
std::string chrome_trace(const PipelineResult& r, int ranks);

}  // namespace fp8pipe::parallel::sim
