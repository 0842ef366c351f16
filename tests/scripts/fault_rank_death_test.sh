#!/usr/bin/env bash
# A rank killed with SIGKILL in the middle of training (pp=2, 1f1b, two processes) ends the job on
# every rank, well within fault.timeout_s, with a non-zero exit and a message naming the dead rank:
#  1. under plain mpirun, the launcher sees the death and ends the job ("process rank 1 ... exited
#     on signal 9");
#  2. with the launcher told not to react (--mca orte_abort_on_non_zero_status 0), fp8pipe's own
#     watchdog does: the survivor fails after fault.timeout_s naming the dead peer, its group and
#     the pipeline instruction it was waiting in, and abort_all ends the job.
# In both cases no process of the job may be left behind.
# Usage: fault_rank_death_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"  # test_init, ok, bad, test_summary
test_init "$@"
TIMEOUT_S=10  # fault.timeout_s
SLACK_S=15    # start-up of the abort, mpirun's teardown, a loaded machine
ARGS=(--train.steps=100000 --log.every=1 --checkpoint.dir= --checkpoint.every=0
      --train.eval_every=0 --optim.warmup_steps=1 --train.seq_len=16 --parallel.pp=2
      --parallel.schedule=1f1b --fault.timeout_s=$TIMEOUT_S)

source "$(dirname "${BASH_SOURCE[0]}")/fault_lib.sh"  # signal_case, cleanup (trap), leftovers, now, secs

in_time() { awk -v e="$1" -v l=$((TIMEOUT_S + SLACK_S)) 'BEGIN { exit !(e <= l) }'; }

# 1. Plain mpirun: the launcher notices the death.
signal_case launcher 1 KILL
if [ $RC -ne 0 ] && [ $RC -ne 124 ] && in_time "$ELAPSED" && [ -z "$LEFT" ] &&
   grep -Eq "rank 1 .*(signal 9|Killed)" "$TMP/launcher.log"; then
  ok "SIGKILL of rank 1: job ended in ${ELAPSED} s (rc $RC), mpirun names rank 1"
else
  bad "SIGKILL of rank 1 under plain mpirun (rc $RC, ${ELAPSED} s, left:${LEFT:- none})"
  tail -8 "$TMP/launcher.log"
fi

# 2. mpirun does not react: fp8pipe's watchdog on the survivor ends the job.
signal_case watchdog 1 KILL --mca orte_abort_on_non_zero_status 0
# The survivor waits either on a pipeline message from rank 1 (named, with the instruction) or,
# if the kill lands between the pipeline and the step's collectives, on a world collective.
pat="^\[fp8pipe r0 .*aborting all ranks: .*(pipeline rank 0 at [A-Za-z]+<[^:]*: comm timeout: "
pat+="(recv|send)\((from|to) 1 \[world 1\].* on pp|comm timeout: [a-z_]+\(.*\) on world)"
pat+=".* not done after $TIMEOUT_S s"
if [ $RC -ne 0 ] && [ $RC -ne 124 ] && in_time "$ELAPSED" && [ -z "$LEFT" ] &&
   awk -v e="$ELAPSED" -v t=$TIMEOUT_S 'BEGIN { exit !(e >= t - 1) }' &&
   grep -Eq "$pat" "$TMP/watchdog.log"; then
  ok "SIGKILL of rank 1, launcher passive: rank 0's watchdog ended the job in ${ELAPSED} s (rc $RC): $(
    grep -Eo 'pipeline rank 0 at [^ ]* comm timeout: [^)]*\)' "$TMP/watchdog.log" | head -1)"
else
  bad "SIGKILL of rank 1 with a passive launcher (rc $RC, ${ELAPSED} s, left:${LEFT:- none})"
  grep -v '^    #' "$TMP/watchdog.log" | tail -8
fi

test_summary
