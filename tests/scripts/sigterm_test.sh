#!/usr/bin/env bash
# Clean stops: SIGTERM, or the fault.walltime_s budget, ends training after the current step with
# exit code 0 and a committed checkpoint at that step; under mpirun the decision is taken by all
# ranks together (every rank stops after the same step).
# Usage: sigterm_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"  # test_init, ok, bad, test_summary
test_init "$@"
ARGS=(--train.steps=1000 --train.eval_every=0 --optim.warmup_steps=1 --train.global_batch=8
      --log.every=1)
steps_logged() { if [ -f "$1" ]; then awk '/^\{"step"/ { n++ } END { print n + 0 }' "$1"; else echo 0; fi; }

# 1. SIGTERM after a few steps.
"$BIN" train "$SRC/configs/tiny.textproto" "${ARGS[@]}" --checkpoint.dir="$TMP/ck" \
  --checkpoint.every=0 --log.jsonl="$TMP/m.jsonl" >"$TMP/t.log" 2>&1 &
pid=$!
for _ in $(seq 600); do [ "$(steps_logged "$TMP/m.jsonl")" -ge 3 ] && break; sleep 0.1; done
kill -TERM $pid
wait $pid; rc=$?
last=$(steps_logged "$TMP/m.jsonl")
dir=$(printf "%s/ck/step_%08d" "$TMP" "$last")
if [ $rc -eq 0 ] && [ "$last" -ge 3 ] && [ "$last" -lt 1000 ] && [ -f "$dir/COMMITTED" ] &&
   grep -q "stopping after step $last" "$TMP/t.log"; then
  ok "SIGTERM: exit 0 after step $last with a committed checkpoint"
else
  bad "SIGTERM (rc $rc, last step $last)"; tail -5 "$TMP/t.log"; ls "$TMP/ck" 2>/dev/null
fi

# 2. Resuming from it continues at the next step.
"$BIN" train "$SRC/configs/tiny.textproto" "${ARGS[@]}" --train.steps=$((last + 2)) \
  --checkpoint.dir="$TMP/ck" --checkpoint.every=0 --log.jsonl="$TMP/m2.jsonl" >"$TMP/t2.log" 2>&1
first=$(grep -m1 -o '^{"step":[0-9]*' "$TMP/m2.jsonl" | grep -o '[0-9]*$')
if [ "${first:-0}" -eq $((last + 1)) ]; then ok "resume continues at step $first"
else bad "resume after SIGTERM starts at step ${first:-none}"; tail -3 "$TMP/t2.log"; fi

# 3. Wall-time budget, two ranks: both stop after the same step, exit 0.
start=$SECONDS
timeout 120 mpirun -np 2 "$BIN" train "$SRC/configs/tiny.textproto" "${ARGS[@]}" --parallel.pp=2 \
  --checkpoint.dir= --checkpoint.every=0 --fault.walltime_s=3 --log.jsonl="$TMP/w.r{rank}.jsonl" \
  >"$TMP/w.log" 2>&1
rc=$?
a=$(steps_logged "$TMP/w.r0.jsonl"); b=$(steps_logged "$TMP/w.r1.jsonl")
if [ $rc -eq 0 ] && [ "$a" -ge 1 ] && [ "$a" -lt 1000 ] && [ "$a" = "$b" ]; then
  ok "walltime: both ranks stopped after step $a, exit 0 ($((SECONDS - start)) s)"
else
  bad "walltime (rc $rc, steps $a / $b)"; tail -5 "$TMP/w.log"
fi

test_summary
