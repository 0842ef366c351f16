// NCCL backend of Comm (parallel/comm.h), built when CUDA and NCCL are found (FP8PIPE_HAVE_CUDA).
// One GPU per local rank; each communicator mirrors an MPI one (same group, same ranks): rank 0
// of the group makes the ncclUniqueId and broadcasts it over the MPI comm (so every MPI call
// still goes through the MPI comm thread), then every member calls ncclCommInitRank.
//
// Execution: each NcclComm owns one CUDA stream (non-blocking) and one issue/poll thread. Ops are
// queued by the caller and issued by that thread in issue order on the comm stream; each op
// records a cudaEvent, and the thread polls the events (and ncclCommGetAsyncError) to complete
// the ops' Work. Buffers may be device or host memory: host buffers are staged through device
// memory (copied in at issue, out when the op's event has completed), so code written for the MPI
// comm (agree(), host-side counts) works unchanged, only slower.
//
// Ordering with compute: with `order_after` set (the Backend's compute stream), every op first
// records an event on that stream when it is issued by the caller, and the comm thread waits for
// it before enqueuing the op: an op never reads a buffer before the kernels that were enqueued to
// produce it have finished. A completed Work means the data is in place for any later work.
//
// Differences from the MPI comm (documented limits):
//   - NCCL has no message tags: point-to-point messages between two ranks match in issue order
//     (`tag` is only checked >= 0). The schedule validator's matching of sends and receives per
//     pair in order is what makes this safe for the pipeline executor.
//   - Point-to-point ops are deferred and grouped. An NCCL send or recv blocks the comm stream
//     until its peer posts the match, unless it is issued inside one ncclGroupStart/End with the
//     ops it must run concurrently with. So a posted send / recv is not issued at once: it joins
//     the comm's pending batch (in issue order), and the batch is issued as ONE group, every op
//     of it after its `order_after` event, when the first of these happens:
//       (a) a wait or a test on any Work of this comm (WorkState's kick hook, parallel/comm.h);
//       (b) any other op (a collective, barrier, counts, all-to-all) is posted on this comm: the
//           batch posted before it is issued first, then that op (issue order is kept);
//       (c) the comm is destroyed (the batch is issued, then drained or aborted as any op).
//     A trigger closes the batch: ops posted after it form the next group, even when the comm
//     thread takes both at once (the pipeline executor's matched groups rely on it:
//     parallel/p2p_plan.h; it posts each group and then tests one of its Works).
//     Within a batch the semantics are MPI's nonblocking ones: a program that posts every send it
//     owes before it waits on a receive (grad_sync: recv(j), send(j) for every j, then wait_all)
//     cannot deadlock, since NCCL progresses a group's ops together, and a send to self is valid
//     when its receive is in the same batch. Unlike MPI, a send completes only once the peer has
//     issued its receive, and the comm's later groups wait behind it on the stream: a batch whose
//     send is received only in the peer's NEXT batch, while the peer's batch holds such a send
//     too, deadlocks (p2p_matched_groups(); the pipeline executor therefore issues matched
//     groups, parallel/p2p_plan.h). An op that is never waited on or tested is not issued until
//     (b) or (c).
//   - Issue order. Each comm has its own thread and stream, so without a rule the device would
//     receive the ops of different comms in whatever order those threads run, which may differ
//     between ranks; NCCL requires ranks that use communicators concurrently to launch in a
//     matching order (a GPU may run one NCCL kernel at a time). So every op of every NcclComm in
//     the process takes a ticket when it is posted, and is enqueued on the device only when all
//     ops posted before it, on any comm, have been (a point-to-point batch takes the turn of its
//     first op; a two-phase op holds the turn until its last phase is enqueued). Ranks that post
//     alike then launch alike, whatever the timing. Trigger (a) therefore flushes the pending
//     batches of every comm of the process. Checked by MpiComm.TwoCommsKeepPostingOrderWhatever-
//     TheTiming on the CUDA emulation's serial NCCL (CTest mpi.comm_nccl; it deadlocks with
//     FP8PIPE_NCCL_ISSUE_ORDER=per_comm, CTest mpi.comm_nccl_per_comm_order).
//   - No census on timeout: a timed-out wait names the op and this comm's last ops only.
//   - all_to_all_v_counted holds later ops of the same comm until its counts phase has completed
//     and its data phase is issued (the same collective order on every rank, as the MPI comm).
#pragma once

#include <memory>

#include "core/backend.h"
#include "parallel/comm.h"

namespace fp8pipe::parallel {

struct NcclOptions {
  double timeout_s = 600;         // config fault.timeout_s: the default timeout of every wait
  int device = 0;                 // this rank's CUDA device (its position on its node)
  Stream* order_after = nullptr;  // producer stream (the compute stream), or null for none
};

// The NCCL communicator of `mpi`'s group. Collective over the group (every member calls it).
Result<std::unique_ptr<Comm>> create_nccl_comm(Comm& mpi, const NcclOptions& opts);

// An NCCL CommSet mirroring every communicator of an MPI CommSet, in the same fixed order.
Result<CommSet> create_nccl_comms(CommSet& mpi, const NcclOptions& opts);

}  // namespace fp8pipe::parallel
