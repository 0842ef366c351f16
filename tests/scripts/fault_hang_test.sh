#!/usr/bin/env bash
# A rank that hangs (SIGSTOP) in the middle of training: mpirun cannot see it, so fp8pipe's own
# watchdog must end the job. The other rank fails after fault.timeout_s (not before, not much
# after) with the comm timeout naming the op it waited on and its group; abort_all ends every
# rank, the stopped one included, and the job exits non-zero without hanging.
#  1. pp=2 1f1b: the survivor usually waits in a pipeline receive; its message names the hung peer
#     rank and the pipeline instruction it was on. When the stop lands after the last stage's
#     pipeline work, the survivor waits in a world collective instead; then the census (comm.h)
#     must name the rank that did not answer.
#  2. dp=2: the survivor waits in a world collective (loss or gradient sums, or a ZeRO exchange);
#     the first line of its error names the collective, its group and (census) the hung rank.
# Usage: fault_hang_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"  # test_init, ok, bad, test_summary
test_init "$@"
SLACK_S=8  # the abort, mpirun's teardown, a loaded machine
ARGS=(--train.steps=100000 --log.every=1 --checkpoint.dir= --checkpoint.every=0
      --train.eval_every=0 --optim.warmup_steps=1 --train.seq_len=16)

source "$(dirname "${BASH_SOURCE[0]}")/fault_lib.sh"  # signal_case, cleanup (trap), leftovers, now, secs

# in_window TIMEOUT_S: the job ended after the watchdog's timeout, within the slack.
in_window() { awk -v e="$ELAPSED" -v t="$1" -v s=$SLACK_S 'BEGIN { exit !(e >= t - 1 && e <= t + s) }'; }
first_abort() { grep -m1 "aborting all ranks" "$1"; }

# 1. Pipeline: rank 1 stops; rank 0 times out in a receive from it.
signal_case pp 1 STOP -- --fault.timeout_s=10 --parallel.pp=2 --parallel.schedule=1f1b
pat="^\[fp8pipe r0 .*aborting all ranks: .*pipeline rank 0 at [A-Za-z]+<[^:]*: comm timeout: "
pat+="(recv|send)\((from|to) 1 \[world 1\].* on pp.* not done after 10 s"
pat+="|^\[fp8pipe r0 .*aborting all ranks: .*comm timeout: .* on world .* not done after 10 s; "
pat+="no answer from rank 1 \[world 1\]"
if [ $RC -ne 0 ] && [ $RC -ne 124 ] && in_window 10 && [ -z "$LEFT" ] &&
   first_abort "$TMP/pp.log" | grep -Eq "$pat" && grep -q "last comm ops of this rank" "$TMP/pp.log"; then
  ok "SIGSTOP of rank 1 (pp=2): rank 0's watchdog ended the job in ${ELAPSED} s (rc $RC): $(
    first_abort "$TMP/pp.log" | grep -Eo '(pipeline rank 0 at .*)?comm timeout: .*')"
else
  bad "SIGSTOP of rank 1 (pp=2) (rc $RC, ${ELAPSED} s, left:${LEFT:- none})"
  grep -v '^    #' "$TMP/pp.log" | tail -8
fi

# 2. Data parallel: rank 1 stops; rank 0 times out in a collective on the world group.
signal_case dp 1 STOP -- --fault.timeout_s=5 --parallel.dp=2
pat="^\[fp8pipe r0 .*aborting all ranks: .*comm timeout: .*on world .* not done after 5 s; "
pat+="no answer from rank 1 \[world 1\]"
if [ $RC -ne 0 ] && [ $RC -ne 124 ] && in_window 5 && [ -z "$LEFT" ] &&
   first_abort "$TMP/dp.log" | grep -Eq "$pat"; then
  ok "SIGSTOP of rank 1 (dp=2): rank 0's watchdog ended the job in ${ELAPSED} s (rc $RC): $(
    first_abort "$TMP/dp.log" | grep -Eo 'comm timeout: .*')"
else
  bad "SIGSTOP of rank 1 (dp=2) (rc $RC, ${ELAPSED} s, left:${LEFT:- none})"
  grep -v '^    #' "$TMP/dp.log" | tail -8
fi

test_summary
