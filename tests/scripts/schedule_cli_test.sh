#!/usr/bin/env bash
# `fp8pipe schedule --groups`: the matched point-to-point groups the executor posts over NCCL
# (parallel/p2p_plan.h). For every kind, each rank's groups hold each of its sends and receives
# exactly once (counted against `--instrs`); with DeepSeek's figure ratios DualPipe's makespan
# under the groups is its eager one (no send waits for more compute: dualpipe.py's batches are
# matched); ZB1P keeps it with early sends, not with late ones. A bad flag names the valid ones.
# Usage: schedule_cli_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"  # test_init, ok, bad, test_summary
test_init "$@"

for spec in "1f1b 4 9" "zb1p 4 9" "dualpipe 4 8" "dualpipev 4 8" "dualpipe 8 20"; do
  read -r kind pp m <<<"$spec"
  if ! "$BIN" schedule --kind "$kind" --stages "$pp" --microbatches "$m" --instrs --groups \
    >"$TMP/out.txt" 2>"$TMP/err.txt"; then
    bad "$kind pp=$pp: schedule --groups failed: $(tail -2 "$TMP/err.txt")"
    continue
  fi
  if python3 - "$TMP/out.txt" "$pp" <<'PY'; then
import re, sys
lines = open(sys.argv[1]).read().splitlines()
pp = int(sys.argv[2])
want = {r: {"S": 0, "R": 0} for r in range(pp)}
for l in lines:
    m = re.match(r"rank=(\d+) (SEND|RECV)_", l)
    if m:
        want[int(m.group(1))]["S" if m.group(2) == "SEND" else "R"] += 1
got = {r: {"S": 0, "R": 0} for r in range(pp)}
for l in lines:
    m = re.match(r"rank (\d+):(.*)", l)
    if not m:
        continue
    for grp in re.findall(r"\[([^\]]*)\]#\d+e?", m.group(2)):
        for op in grp.split():
            got[int(m.group(1))][op[0]] += 1
assert want == got, (want, got)
assert sum(v["S"] for v in want.values()) > 0
PY
    ok "$kind pp=$pp M=$m: every send and receive in one group"
  else
    bad "$kind pp=$pp M=$m: the groups do not hold every send and receive once"
  fi
  grep -q "matched groups (NCCL): [0-9]* groups in [0-9]* rounds" "$TMP/err.txt" ||
    bad "$kind: no summary line"
done

span() { sed -n 's/.*makespan \([0-9.]*\) eager (MPI), \([0-9.]*\) matched, \([0-9.]*\) with late.*/\1 \2 \3/p' "$1"; }
"$BIN" schedule --kind dualpipe --stages 8 --microbatches 20 --groups --cost 1,2,1,3 \
  >/dev/null 2>"$TMP/dp.txt"
read -r e m h <<<"$(span "$TMP/dp.txt")"
if [[ -n $e && $e == "$m" && $e == "$h" ]]; then
  ok "dualpipe pp=8: makespan $e eager = matched = with late sends"
else
  bad "dualpipe pp=8: makespans eager/matched/late '$e' '$m' '$h'"
fi
"$BIN" schedule --kind zb1p --stages 8 --microbatches 25 --groups --cost 1,2,1,3 \
  >/dev/null 2>"$TMP/zb.txt"
read -r e m h <<<"$(span "$TMP/zb.txt")"
if [[ -n $e && $e == "$m" ]] && python3 -c "import sys; sys.exit(not float('$h') > float('$e'))"; then
  ok "zb1p pp=8: makespan $e eager = matched, $h with late sends"
else
  bad "zb1p pp=8: makespans eager/matched/late '$e' '$m' '$h'"
fi

if "$BIN" schedule --kind dualpipe --stages 4 --microbatches 8 --group x 2>"$TMP/bad.txt"; then
  bad "a bad flag was accepted"
elif grep -q "valid: .*--groups" "$TMP/bad.txt"; then
  ok "a bad flag names the valid ones"
else
  bad "bad flag message: $(cat "$TMP/bad.txt")"
fi
test_summary
