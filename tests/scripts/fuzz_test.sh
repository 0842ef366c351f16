#!/usr/bin/env bash
# CTest entry for the parser fuzzers: runs tests/fuzz/run_fuzz.sh for 10 s per target (config
# text, safetensors header, checkpoint manifest). Fails, naming launch/setup.sh, when clang or its
# libFuzzer runtime is missing. Usage (CTest): bash fuzz_test.sh BUILD_DIR SOURCE_DIR [SECONDS]
set -uo pipefail

BUILD=${1:?usage: $0 BUILD_DIR SOURCE_DIR [SECONDS]}
SRC=${2:?usage: $0 BUILD_DIR SOURCE_DIR [SECONDS]}
SECS=${3:-10}

WORK=$(mktemp -d /tmp/fp8pipe_fuzz_test.XXXXXX)
if FUZZ_WORK="$WORK" bash "$SRC/tests/fuzz/run_fuzz.sh" "$BUILD" "$SECS"; then
  rm -rf "$WORK"
  echo "PASS: fuzz_test"
  exit 0
fi
echo "FAIL: fuzz_test (logs, crashing inputs and binaries kept in $WORK; if clang or libFuzzer" \
  "is missing, run launch/setup.sh)" >&2
exit 1
