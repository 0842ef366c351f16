#!/usr/bin/env bash
# `fp8pipe train CONFIG --dry-run`: one process, no MPI, no device; prints every rank's layout and
# the validated schedule, exit 0; a layout that does not fit --world-size, or a bad override, exits
# 2 with the config's message.
# Usage (CTest): bash dry_run_cli_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"  # test_init, ok, bad, test_summary
test_init "$@"
CFG=$SRC/configs/tiny.textproto
if "$BIN" train "$CFG" --dry-run --parallel.pp=4 --parallel.dp=2 --parallel.schedule=dualpipe \
  --parallel.ranks_per_node=4 >"$TMP/out" 2>&1 &&
  grep -q "8 ranks = pp 4 x dp 2" "$TMP/out" && grep -q "(2 node(s))" "$TMP/out" &&
  [ "$(grep -c "^  rank [0-9]*: stage" "$TMP/out")" = 8 ] &&
  grep -q "no device was touched" "$TMP/out"; then
  ok "dry run of 8 ranks on 2 nodes: 8 rank lines, schedule validated"
else
  bad "dry run output"
  cat "$TMP/out"
fi
# Over NCCL the dry run also plans the pipeline's matched send/receive groups (p2p_plan.h): ZB1P
# at pp=4 has early sends (its W-only stretches), DualPipe none. Needs a CUDA build (NCCL needs
# train.device=cuda); a CPU-only build refuses it with that reason, and the check says so.
for spec in "zb1p 9 [1-9][0-9]*" "dualpipe 8 0"; do
  read -r kind mb early <<<"$spec"
  if "$BIN" train "$CFG" --dry-run --parallel.pp=4 --parallel.schedule="$kind" \
    --parallel.microbatches="$mb" --train.global_batch=$((2 * mb)) --train.device=cuda \
    --parallel.comm_backend=nccl >"$TMP/nccl" 2>&1 &&
    grep -Eq "pipeline messages over NCCL .*: [0-9]+ matched send/receive groups in [0-9]+ rounds, $early of them early sends" "$TMP/nccl"; then
    ok "dry run over NCCL ($kind): matched groups planned"
  elif grep -q 'train.device="cuda" needs a build with CUDA' "$TMP/nccl"; then
    echo "skip: dry run over NCCL ($kind): this fp8pipe was built without CUDA"
  else
    bad "dry run over NCCL ($kind)"
    cat "$TMP/nccl"
  fi
done
if "$BIN" train "$CFG" --dry-run --world-size 3 >"$TMP/w3" 2>&1; then
  bad "--world-size 3 was accepted for pp=1 dp=1"
elif grep -q "must equal the world size 3 (valid: pp=1 dp=3; pp=3 dp=1)" "$TMP/w3"; then
  ok "--world-size 3: refused, naming the valid layouts"
else
  bad "--world-size 3 message"
  cat "$TMP/w3"
fi
if "$BIN" train "$CFG" --dry-run --parallel.schedule=zigzag >"$TMP/bad" 2>&1; then
  bad "a bad schedule name was accepted"
elif grep -q "parallel.schedule" "$TMP/bad"; then
  ok "a bad override fails the dry run with the field's name"
else
  bad "bad override message"
  cat "$TMP/bad"
fi
test_summary
