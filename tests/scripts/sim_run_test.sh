#!/usr/bin/env bash
# `fp8pipe simulate`'s whole-run line (launch/cmd_simulate.cc run_line) for DeepSeek-V3's recipe:
# without a batch ramp the run is train.steps times the step; with the preset's ramp it must be
# the sum, over the batch sizes that `train --dry-run` lists with their first steps, of each
# size's steps times the step simulated for a constant batch of that size (an independent run of
# the simulator per size). Then the ramp's steps must be slower per sequence than the full
# batch's (DualPipe's bubble is a larger share of fewer micro-batches).
# Usage: sim_run_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"  # test_init, ok, bad, test_summary
test_init "$@"
CFG=$SRC/configs/dsv3-671b-2048.textproto

"$BIN" simulate "$CFG" --train.batch_ramp.start=0 --train.batch_ramp.increment=0 \
  --train.batch_ramp.tokens=0 >"$TMP/flat.txt" 2>&1 &&
  "$BIN" simulate "$CFG" >"$TMP/ramp.txt" 2>&1 &&
  "$BIN" train "$CFG" --dry-run >"$TMP/dry.txt" 2>&1 || {
  bad "simulate / dry-run failed"; tail -5 "$TMP"/*.txt; test_summary; exit 1
}
# Each size of the ramp as a constant batch: global_batch = b in b / 128 micro-batches.
grep -E '^  from step [0-9]+: [0-9]+ sequences' "$TMP/dry.txt" | while read -r _ _ step seqs _; do
  b=${seqs}
  "$BIN" simulate "$CFG" --train.batch_ramp.start=0 --train.batch_ramp.increment=0 \
    --train.batch_ramp.tokens=0 --train.global_batch="$b" --parallel.microbatches=$((b / 128)) |
    awk -v s="${step%:}" -v b="$b" '/^step /{print s, b, $2}'
done >"$TMP/sizes.txt"

if python3 - "$TMP/flat.txt" "$TMP/ramp.txt" "$TMP/sizes.txt" <<'PY'
import re, sys
flat, ramp, sizes = (open(p).read() for p in sys.argv[1:4])
def step_s(text):
    return float(re.search(r"^step\s+([0-9.]+) s", text, re.M).group(1))
def run(text):
    m = re.search(r"^run\s+train\.steps=(\d+): ([0-9.]+)T tokens in ([0-9.]+) days on (\d+) GPUs "
                  r"= (\d+)K GPU-hours", text, re.M)
    return int(m.group(1)), float(m.group(2)), float(m.group(3)), int(m.group(4)), int(m.group(5))
steps, _, days, gpus, kgh = run(flat)
want = steps * step_s(flat) / 86400
assert abs(days - want) < 0.05 + 1e-3 * want, (days, want)
assert abs(kgh - want * 24 * gpus / 1e3) <= 1, (kgh, want)
print(f"no ramp: {days} days = {steps} x {step_s(flat)} s")
rows = [tuple(float(x) for x in l.split()) for l in sizes.split("\n") if l.strip()]
assert len(rows) == 12, rows  # 4096 .. 15360 by 1024
steps, tokens, days, gpus, kgh = run(ramp)
total = 0.0
for i, (first, b, s) in enumerate(rows):
    last = rows[i + 1][0] - 1 if i + 1 < len(rows) else steps
    total += (last - first + 1) * s
assert abs(days - total / 86400) < 0.05, (days, total / 86400)
assert abs(tokens - 14.8) < 0.01, tokens
print(f"ramp: {days} days = sum over {len(rows)} sizes {total / 86400:.2f}; {kgh}K GPU-hours")
full = rows[-1]
for first, b, s in rows[:-1]:
    assert s / b > full[2] / full[1], (b, s, full)  # seconds per sequence
PY
then ok "run line: steps x step without a ramp, the sum over the ramp's sizes with it"
else bad "run line"; cat "$TMP/flat.txt" "$TMP/ramp.txt" "$TMP/sizes.txt" | grep -E "^(step|run)|^[0-9]"; fi

test_summary
