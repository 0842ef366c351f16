// Matched point-to-point groups for a pipeline schedule (the executor's mode for NCCL).
//
// Why: NCCL's send and receive are blocking for the GPU. Ops issued in one ncclGroupStart/End
// progress together, but a group ends only when all of its ops have matched, and a rank's next
// group waits for it on the stream. So a group that holds a send whose receive is in the peer's
// NEXT group deadlocks as soon as the peer's current group holds a send of the same kind (each
// waits on the other's next group). The schedule's issue order (sends posted when produced,
// receives waited where needed) is MPI's nonblocking semantics and gives such groups: DualPipe
// at pp=2 does. MPI hides it; NCCL completes a send early only while it fits the peer's buffer.
//
// What: plan_p2p_groups() splits every rank's sends and receives into groups, each issued at a
// "point" of its rank's list (right before the first compute after a run of comm instructions,
// or at the end of the list), such that every group is matched: the receive of each send of a
// group is in the peer's group of the same round, and the reverse. Ranks issue their groups in
// increasing round, and between two groups run only local compute; so, by induction over the
// rounds, every group's peers reach their matching group and no rank waits on a group that
// another rank has not issued. Within a group, the ops to and from each peer are ordered by their
// message (Transfer), identically on both sides, so NCCL's in-order matching per pair (it has no
// tags) pairs each send with its receive.
//
// How: a lock-step run of all ranks (every rank moves to its next point each round unless it
// still waits there for a receive). In each round, every receive that a rank waits on at its
// point and whose send has been posted (its sender has passed the send's instruction) is issued
// together with that send, in the receiver's and the sender's groups of this round. A send whose
// receiver is not waiting yet stays posted and goes later, at the sender's point in the round the
// receiver asks for it. A round that issues nothing and moves no rank is a deadlock (also one
// under MPI's semantics; validate_schedule reports those with a grid).
#pragma once

#include <vector>

#include "core/status.h"
#include "parallel/schedule.h"

namespace fp8pipe::parallel {

struct P2pGroup {
  int round = 0;
  // Indices into Schedule::rank_instrs[rank], ordered by (the point their message's send is
  // issued at, transfer_of): a pair's messages alike on both sides.
  std::vector<int> ops;
  bool early = false;  // sends only, placed where produced, before their receiver waits
};

struct P2pPoint {
  int at = 0;  // issued before instruction `at` (== the list's size: after the last one)
  std::vector<P2pGroup> groups;  // in increasing round; the receives all complete here
};

struct P2pPlan {
  std::vector<std::vector<P2pPoint>> ranks;  // [rank] -> its points with groups, in list order
  int rounds = 0;
  int groups = 0, early_groups = 0;  // over all ranks
  // Sends issued at a later point than the first one after their instruction (their receiver was
  // not waiting yet in the lock-step run): each waits for more of its sender's compute.
  int late_sends = 0;
};

// early_sends: a send whose receiver is not waiting yet when its sender passes it may still go at
// that point, in a group of its own after the point's others (P2pGroup::early), when the sender
// issues nothing between then and the round its receiver asks for it, so that the rounds stay in
// order on the sender's stream. The group holds the sender's comm stream, not its compute, until
// the receiver comes. Without early sends such a send goes at the sender's point of that round (a
// late send: the receiver then waits for the sender's compute in between). The executor plans
// early sends. Expert all-to-alls do not break the induction even where a GPU runs one NCCL
// kernel at a time and one queues behind an early send: they run among the dp replicas of one
// pipeline rank, which post the same operations in the same order, so they act as local steps of
// that rank's stream, which the rounds already order (the all-to-all, and the compute after it,
// then waits for the early send's receiver; a stall, not a deadlock).
Result<P2pPlan> plan_p2p_groups(const Schedule& s, bool early_sends);

}  // namespace fp8pipe::parallel
