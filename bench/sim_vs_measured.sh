#!/usr/bin/env bash
# Simulated vs measured step time of a real multi-rank CPU run (issue 6): trains the tiny config
# under `mpirun -np 2` with pp=2 for each schedule, calibrates the step simulator on the per-rank
# traces of steps 2..4 (`fp8pipe simulate --calibrate-from`, parallel/sim/measured.h), simulates
# the step and compares it with the measured mean step time of steps 2..N (rank 0's JSONL; step 1
# is warm-up). Prints a table; exits 1 if a deviation exceeds the tolerance, 2 on a failed run.
# An extra row, for information only (not held to the tolerance): 1F1B predicted from the costs of
# the ZB1P run, a schedule they were not measured on; on a shared machine it also carries the load
# difference between the two runs.
#
# Usage: bench/sim_vs_measured.sh [FP8PIPE_BIN] [--tolerance PCT] [--steps N]
#                                 [--kinds "1f1b zb1p dualpipev"] [--keep DIR | --from DIR]
#   FP8PIPE_BIN  default: build/launch/fp8pipe next to this script's repository
#   --tolerance  largest |simulated - measured| / measured, percent (default 25, see
#                docs/BENCHMARKS.md "Simulator vs a measured CPU run")
#   --keep DIR   keep traces, metrics, calibrations and logs in DIR
#   --from DIR   no training: calibrate and compare the runs kept in DIR by --keep
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$ROOT/build/launch/fp8pipe
TOL=25 STEPS=8 KINDS="1f1b zb1p dualpipev" KEEP="" FROM=""
while [ $# -gt 0 ]; do
  case $1 in
    --tolerance) TOL=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --kinds) KINDS=$2; shift 2 ;;
    --keep) KEEP=$2; shift 2 ;;
    --from) FROM=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) BIN=$1; shift ;;
  esac
done
[ -x "$BIN" ] || { echo "no fp8pipe binary at $BIN (build first, or pass its path)" >&2; exit 2; }
[ "$STEPS" -ge 5 ] || { echo "--steps must be >= 5 (steps 2..4 are traced)" >&2; exit 2; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
if [ -n "$FROM" ]; then
  DIR=$(cd "$FROM" && pwd) || exit 2
elif [ -n "$KEEP" ]; then
  mkdir -p "$KEEP" && DIR=$(cd "$KEEP" && pwd)
else
  DIR=$(mktemp -d) && trap 'rm -rf "$DIR"' EXIT
fi
CONFIG=$ROOT/configs/tiny.textproto
COMMON=(--parallel.pp=2 --train.steps="$STEPS" --optim.warmup_steps=1 --checkpoint.every=0
        --checkpoint.dir= --train.eval_every=0 --log.every=1)

# mean_ms JSONL: mean of "ms" over steps >= 2 of one rank's metrics.
mean_ms() {
  awk 'match($0, /^\{"step":[0-9]+/) { s = substr($0, 9, RLENGTH - 8) + 0
         if (s >= 2 && match($0, /"ms":[-0-9.e+]+/)) { t += substr($0, RSTART + 5, RLENGTH - 5); n++ } }
       END { if (n) printf "%.1f", t / n; else print "nan" }' "$1"
}
# result KEY FILE: a key=value of the simulator's `result` line.
result() { sed -n "s/^result .*\b$1=\([-0-9.]*\).*/\1/p" "$2"; }

rows=() worst=0 failed=0
row() {  # row NAME MEASURED TRACED SIM_PIPE SIM_STEP [info]
  local dev
  dev=$(awk -v s="$5" -v m="$2" 'BEGIN { printf "%+.1f", 100 * (s - m) / m }')
  local ok
  ok=$(awk -v d="$dev" -v t="$TOL" 'BEGIN { print (d < 0 ? -d : d) <= t ? "ok" : "OVER" }')
  if [ "${6:-}" = info ]; then ok=info; elif [ "$ok" != ok ]; then failed=1; fi
  rows+=("$(printf '| %-28s | %8s | %8s | %8s | %8s | %6s%% | %-4s |' "$1" "$2" "$3" "$4" "$5" "$dev" "$ok")")
}

for kind in $KINDS; do
  start=$SECONDS
  if [ -z "$FROM" ] && ! timeout 300 mpirun -np 2 "$BIN" train "$CONFIG" "${COMMON[@]}" --parallel.schedule="$kind" \
       --log.jsonl="$DIR/$kind.metrics.r{rank}.jsonl" --log.trace="$DIR/$kind.trace.r{rank}.json" \
       --log.trace_start=2 --log.trace_steps=3 >"$DIR/$kind.train.log" 2>&1; then
    echo "FAIL: training $kind (log: $DIR/$kind.train.log)"; tail -5 "$DIR/$kind.train.log"; exit 2
  fi
  if ! "$BIN" simulate "$CONFIG" --parallel.pp=2 --parallel.schedule="$kind" \
       --calibrate-from "$DIR/$kind.trace.r{rank}.json" --write-calibration "$DIR/$kind.cal.json" \
       --trace "$DIR/$kind.sim_trace.json" >"$DIR/$kind.sim.txt" 2>&1; then
    echo "FAIL: simulate $kind"; cat "$DIR/$kind.sim.txt"; exit 2
  fi
  measured=$(mean_ms "$DIR/$kind.metrics.r0.jsonl")
  row "$kind" "$measured" "$(result trace_pipeline_ms "$DIR/$kind.sim.txt" | xargs printf '%.1f')" \
      "$(result sim_pipeline_ms "$DIR/$kind.sim.txt" | xargs printf '%.1f')" \
      "$(result sim_step_ms "$DIR/$kind.sim.txt" | xargs printf '%.1f')"
  echo "$kind: $((SECONDS - start)) s, measured $measured ms/step" >&2
done

# Out of sample: 1F1B's step from the costs of the ZB1P run (B = input + weight gradient).
if [[ " $KINDS " == *" zb1p "* && " $KINDS " == *" 1f1b "* ]]; then
  if "$BIN" simulate "$CONFIG" --parallel.pp=2 --parallel.schedule=1f1b \
       --measured-costs "$DIR/zb1p.cal.json" >"$DIR/1f1b_from_zb1p.sim.txt" 2>&1; then
    row "1f1b (costs of the zb1p run)" "$(mean_ms "$DIR/1f1b.metrics.r0.jsonl")" "-" \
        "$(result sim_pipeline_ms "$DIR/1f1b_from_zb1p.sim.txt" | xargs printf '%.1f')" \
        "$(result sim_step_ms "$DIR/1f1b_from_zb1p.sim.txt" | xargs printf '%.1f')" info
  else
    echo "FAIL: simulate 1f1b from zb1p costs"; cat "$DIR/1f1b_from_zb1p.sim.txt"; exit 2
  fi
fi

echo "tiny config, pp=2 on 2 ranks; ms per step; tolerance ${TOL}%"
echo "| schedule                     | measured |   traced | sim pipe | sim step | deviation | |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo "measured: mean over steps >= 2 (JSONL, rank 0); traced: the pipeline span in the traces"
echo "of steps 2..4 (mean); sim: the simulator with costs calibrated on those traces"
if [ $failed -ne 0 ]; then
  echo "FAIL: a deviation exceeds ${TOL}%"; exit 1
fi
echo "ok: every deviation within ${TOL}%"
