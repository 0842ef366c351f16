#!/usr/bin/env bash
# launch/device_check.sh on a CPU machine with VALIDATE_ONLY=1: every training run it would make
# on the GPU has its configuration validated by `fp8pipe config` (train.device=cuda checked as
# cpu), so a bad override is found here, not in a GPU lease. A broken override must fail it.
# Usage (CTest): bash device_check_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"  # test_init, ok, bad, test_summary
test_init "$@"
check() { # check OUTDIR [env...]: runs the validation; its output in OUTDIR.log
  local out=$1
  shift
  env VALIDATE_ONLY=1 BIN_DIR="$BUILD/launch" PREBUILT=none OUT="$TMP/$out" \
    SKIP="env cuda_tests sanitize_failed gpu_bench" "$@" bash "$SRC/launch/device_check.sh" >"$TMP/$out.log" 2>&1
}
if check good; then
  n=$(cat "$TMP"/good/train_*.log "$TMP"/good/small_*.log 2>/dev/null | grep -c "^validate: config ")
  if [ "$n" -ge 7 ]; then
    ok "all $n training runs of device_check.sh have valid configurations"
  else
    bad "expected >= 7 validated runs, got $n"
    tail -20 "$TMP/good.log"
  fi
else
  bad "device_check.sh VALIDATE_ONLY=1 failed"
  tail -30 "$TMP/good.log"
fi
if check broken SMALL_STEPS=0; then
  bad "train.steps=0 was not refused"
elif grep -q "train.steps=0 must be > 0" "$TMP"/broken/small_fp8_vs_bf16.log; then
  ok "a broken override (train.steps=0) fails the check with the config's message"
else
  bad "broken override: no config message"
  tail -20 "$TMP/broken.log"
fi
test_summary
