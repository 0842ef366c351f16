// validate_schedule: checks a Schedule by running all ranks' lists together on the CPU (STYLE.md
// 2) before any executor or simulator trusts it. Most pipeline hangs come from ranks that order
// sends and receives differently; this finds them, and every rule below, with no devices.
//
// Simulation: global steps; in each, every rank whose next instruction can run executes it (one
// per rank per step). A SEND is posted when reached; a RECV runs only once its matching SEND
// (same kind, micro-batch and stage pair, from the named peer to this rank) was posted in an
// earlier step. No rank able to move while some still have work = deadlock.
// Rules per (stream, micro-batch, stage): exactly one F and one B (FB counts as one of each), one
// W iff the B deferred it; F before B before W; placed on rank_of(dir, stage); F after the
// previous stage's F and B after the next stage's B (data dependencies); data from another rank
// received on this rank first; sends only of data this rank produced, to the right peer; every
// send received exactly once.
// A failure's message ends with a step x rank grid (columns = ranks, rows = global steps, cells
// from instr_label) around the failure, the offending cell marked *like this*.
#pragma once

#include "core/status.h"
#include "parallel/schedule.h"

namespace fp8pipe::parallel {

Status validate_schedule(const Schedule& s);

}  // namespace fp8pipe::parallel
