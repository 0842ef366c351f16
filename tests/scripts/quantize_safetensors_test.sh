#!/usr/bin/env bash
# End-to-end test of `fp8pipe quantize`: Python's standard safetensors package writes the inputs,
# the CLI quantizes them at every granularity x format x scale mode, and check_quantized.py loads
# the output with the standard package and checks every byte against an independent reference.
# Usage (CTest): bash quantize_safetensors_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail

BUILD=${1:?usage: $0 BUILD_DIR SOURCE_DIR}
SRC=${2:?usage: $0 BUILD_DIR SOURCE_DIR}
BIN=$BUILD/launch/fp8pipe
CHECK=$SRC/tests/scripts/check_quantized.py
passed=0
failed=0

die() {
  echo "FAIL: $*" >&2
  exit 1
}
ok() {
  passed=$((passed + 1))
}
bad() {
  echo "FAIL: $*" >&2
  failed=$((failed + 1))
}

[ -x "$BIN" ] || die "$BIN is not built (ninja -C $BUILD fp8pipe)"
command -v python3 >/dev/null || die "python3 not found: run launch/setup.sh"
python3 -c 'import numpy, safetensors' 2>/dev/null ||
  die "python packages missing: pip install -r $SRC/requirements-test.txt (launch/setup.sh does)"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 "$CHECK" make "$TMP" || die "could not make the inputs"

# Every granularity, format and scale mode, on both inputs; the check also loads the output.
for input in in_np in_bf16; do
  for g in 1x128 128x1 128x128 tensor; do
    for f in e4m3 e5m2; do
      for s in pow2 fp32; do
        out="$TMP/$input.$g.$f.$s.safetensors"
        if ! "$BIN" quantize "$TMP/$input.safetensors" "$out" --granularity "$g" --format "$f" \
          --scales="$s" --skip norm >"$out.log" 2>&1; then
          bad "quantize $input $g $f $s:"
          cat "$out.log" >&2
          continue
        fi
        grep -q "tensors quantized" "$out.log" || bad "no summary line in $out.log"
        if python3 "$CHECK" check "$TMP/$input.safetensors" "$out" --granularity "$g" \
          --format "$f" --scales "$s" --skip norm; then ok; else bad "check $input $g $f $s"; fi
      done
    done
  done
done
cat "$TMP/in_np.128x128.e4m3.pow2.safetensors.log"

# Errors: non-zero exit, a message naming what is wrong, and no output file (nor a .tmp).
expect_error() {  # expect_error NEEDLE OUT ARGS...
  local needle=$1 out=$2
  shift 2
  if "$BIN" quantize "$@" >"$TMP/err.log" 2>&1; then
    bad "quantize $* succeeded"
  elif ! grep -qF -- "$needle" "$TMP/err.log"; then
    bad "quantize $*: message lacks '$needle':"
    cat "$TMP/err.log" >&2
  elif [ -e "$out" ] || [ -e "$out.tmp" ]; then
    bad "quantize $*: left $out behind"
  else
    ok
  fi
}
IN=$TMP/in_np.safetensors
O=$TMP/err_out.safetensors
expect_error "valid: 1x128, 128x1, 128x128, tensor" "$O" "$IN" "$O" --granularity 64x64
expect_error "valid: e4m3, e5m2" "$O" "$IN" "$O" --format e3m4
expect_error "valid: pow2, fp32" "$O" "$IN" "$O" --scales=ue8m0
expect_error "unknown flag '--bogus'" "$O" "$IN" "$O" --bogus 1
expect_error "invalid regular expression" "$O" "$IN" "$O" --skip '('
expect_error "positional" "$O" "$IN"
expect_error "$TMP/absent.safetensors" "$O" "$TMP/absent.safetensors" "$O"
head -c 1000 "$IN" >"$TMP/trunc.safetensors"
expect_error "$TMP/trunc.safetensors" "$O" "$TMP/trunc.safetensors" "$O"
# An input that already holds NAME_scale_inv cannot be quantized without a collision.
python3 - "$TMP/clash.safetensors" <<'EOF' || die "could not make clash input"
import sys, numpy as np
from safetensors.numpy import save_file
save_file({"w": np.ones((2, 2), np.float32), "w_scale_inv": np.ones((2, 2), np.float32)}, sys.argv[1])
EOF
expect_error "'w_scale_inv'" "$O" "$TMP/clash.safetensors" "$O"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
