#!/usr/bin/env bash
# `fp8pipe bench` end to end on the CPU: a filtered quick run writes its JSONL rows (backend cpu,
# positive throughput, a ratio that is value/baseline for the GEMM row); --device=cuda without a
# usable GPU (or without CUDA in the build) fails at once naming why, before any training step;
# an unknown --device, or a --reps / --peak-tflops that is not a positive number, is a usage
# error naming the flag and value.
# Usage: bench_cli_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"  # test_init, ok, bad, test_summary
test_init "$@"
cd "$SRC" || exit 1

"$BIN" bench --quick --reps 2 --filter="fp8 gemm exact" --json "$TMP/b.jsonl" >"$TMP/b.log" 2>&1
rc=$?
if [ $rc -eq 0 ] && python3 - "$TMP/b.jsonl" <<'PY'; then
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
assert len(rows) == 1, rows
r = rows[0]
assert r["bench"] == "fp8 gemm exact" and r["backend"] == "cpu", r
assert r["value"] > 0 and r["baseline"] > 0, r
PY
  ok "bench --filter writes one cpu row: $(head -c 200 "$TMP/b.jsonl")"
else
  bad "bench --quick --filter (rc $rc)"; cat "$TMP/b.log"
fi

if nvidia-smi -L >/dev/null 2>&1; then
  echo "skip: a GPU is present; the no-device path is not exercised here"
else
  start=$EPOCHREALTIME
  "$BIN" bench --device=cuda --quick >"$TMP/c.log" 2>&1
  rc=$?
  secs=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  if [ $rc -ne 0 ] && grep -Eq "no CUDA device|built without CUDA" "$TMP/c.log" &&
     ! grep -q "train tiny" "$TMP/c.log" && awk -v s="$secs" 'BEGIN { exit !(s < 10) }'; then
    ok "bench --device=cuda without a GPU fails in ${secs} s: $(head -n 1 "$TMP/c.log")"
  else
    bad "bench --device=cuda without a GPU (rc $rc, ${secs} s)"; cat "$TMP/c.log"
  fi
fi

for bad_arg in --peak-tflops=fast --reps=0 --reps=2.5; do
  "$BIN" bench "$bad_arg" >"$TMP/e.log" 2>&1
  rc=$?
  if [ $rc -eq 2 ] && grep -q "fp8pipe bench: ${bad_arg}: expected" "$TMP/e.log"; then
    ok "bench $bad_arg is a usage error naming the flag and value"
  else
    bad "bench $bad_arg (rc $rc)"; cat "$TMP/e.log"
  fi
done

"$BIN" bench --device=tpu >"$TMP/d.log" 2>&1
rc=$?
if [ $rc -eq 2 ] && grep -q "valid: cpu, cuda" "$TMP/d.log"; then
  ok "bench --device=tpu is a usage error naming the choices"
else
  bad "bench --device=tpu (rc $rc)"; cat "$TMP/d.log"
fi

test_summary
