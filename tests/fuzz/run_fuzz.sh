#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz_config, fuzz_safetensors, fuzz_manifest) with clang++ and
# ASan+UBSan straight from the parser sources, seeds them, and runs each for a bounded time.
# Usage: run_fuzz.sh [BUILD_DIR] [SECONDS]; exits non-zero on a crash, leak, timeout or build error.
# BUILD_DIR supplies configs/fp8pipe.pb.{h,cc}; without it they are generated with protoc. Not
# part of the CMake build: CI's compiler is g++. Work dir: $FUZZ_WORK (default a fresh temp dir).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${1:-}"
SECS="${2:-20}"
WORK="${FUZZ_WORK:-$(mktemp -d /tmp/fp8pipe_fuzz.XXXXXX)}"
mkdir -p "$WORK"

fail() { echo "run_fuzz.sh: $*" >&2; exit 1; }

# clang >= 15 (std::source_location with libstdc++) plus libFuzzer's runtime, which Debian ships
# separately (libclang-rt-16-dev); launch/setup.sh installs clang-16 and it.
CXX="${FUZZ_CXX:-}"
if [[ -z "$CXX" ]]; then
  for c in clang++-16 clang++-17 clang++-18 clang++-15 clang++; do
    if command -v "$c" >/dev/null; then CXX="$c"; break; fi
  done
fi
[[ -n "$CXX" ]] || fail "no clang++ found: run launch/setup.sh (installs clang-16)"
cat >"$WORK/probe.cc" <<'CC'
#include <source_location>
extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) {
  return static_cast<int>(std::source_location::current().line()) * 0;
}
CC
"$CXX" -std=c++20 -fsanitize=fuzzer,address,undefined "$WORK/probe.cc" -o "$WORK/probe" \
  2>"$WORK/probe.log" ||
  fail "$CXX cannot build a C++20 libFuzzer target ($(head -c 300 "$WORK/probe.log")); run launch/setup.sh (clang-16, libclang-rt-16-dev)"
echo "run_fuzz.sh: using $("$CXX" --version | head -1)"

# Protobuf-generated config schema: from the build dir, else protoc.
GEN="$WORK/gen"
mkdir -p "$GEN/configs"
if [[ -n "$BUILD" && -f "$BUILD/configs/fp8pipe.pb.cc" ]]; then
  cp "$BUILD/configs/fp8pipe.pb.h" "$BUILD/configs/fp8pipe.pb.cc" "$GEN/configs/"
else
  command -v protoc >/dev/null || fail "no BUILD_DIR with configs/fp8pipe.pb.cc and no protoc"
  protoc -I"$ROOT" --cpp_out="$GEN" "$ROOT/configs/fp8pipe.proto"
fi

FLAGS=(-std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -I"$ROOT" -I"$GEN")
LIBS=(-lfmt -lz -lpthread)
COMMON=("$ROOT/core/status.cc" "$ROOT/core/json.cc")

build() {  # name, sources...
  local name="$1"; shift
  echo "== building $name"
  "$CXX" "${FLAGS[@]}" "$ROOT/tests/fuzz/$name.cc" "$@" "${COMMON[@]}" "${LIBS[@]}" \
    $([[ "$name" == fuzz_config ]] && echo -lprotobuf) -o "$WORK/$name" ||
    fail "building $name failed"
}
build fuzz_config "$ROOT/core/config.cc" "$ROOT/core/data.cc" "$ROOT/core/log.cc" \
  "$GEN/configs/fp8pipe.pb.cc"
build fuzz_safetensors "$ROOT/core/safetensors.cc"
build fuzz_manifest "$ROOT/core/checkpoint.cc" "$ROOT/core/safetensors.cc" "$ROOT/core/log.cc"

# Seed corpora: the repo's configs, a small valid safetensors file, a valid manifest.
mkdir -p "$WORK/seed/config" "$WORK/seed/safetensors" "$WORK/seed/manifest"
cp "$ROOT"/configs/*.textproto "$WORK/seed/config/"
python3 - "$WORK/seed" <<'PY'
import json, struct, sys
seed = sys.argv[1]
hdr = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
       "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
       "__metadata__": {"format": "pt"}}
h = json.dumps(hdr, separators=(",", ":")).encode()
h += b" " * (-len(h) % 8)
open(f"{seed}/safetensors/small.safetensors", "wb").write(
    struct.pack("<Q", len(h)) + h + bytes(range(22)))
shard = {"file": "rank_00000.safetensors", "rank": 0, "begin": 0, "end": 4, "replica": 0}
man = {"format": "fp8pipe-checkpoint", "version": 1, "step": 3, "tokens_seen": 96,
       "optimizer_step": 3, "skipped_steps": 0, "config": "model { hidden: 4 }\n",
       "topology": {"pp": 1, "dp": 1, "ep": 1, "world": 1},
       "ranks": [{"rank": 0, "pp_rank": 0, "dp_rank": 0, "data_step": 3,
                  "rng": {"seed": 1234, "counter": 7}, "skipped_steps": 0}],
       "files": [{"file": "rank_00000.safetensors", "rank": 0, "bytes": 1000, "crc32": 12345}],
       "tensors": [{"name": "norm.weight", "kind": "param", "dtype": "F32", "shape": [4],
                    "shards": [shard]}]}
open(f"{seed}/manifest/manifest.json", "w").write(json.dumps(man, indent=1))
PY

status=0
for t in config safetensors manifest; do
  echo "== fuzzing fuzz_$t for ${SECS}s"
  mkdir -p "$WORK/corpus/$t" "$WORK/artifacts/$t"
  if ! (cd "$WORK/artifacts/$t" &&
        ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
        "$WORK/fuzz_$t" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
          -print_final_stats=1 -artifact_prefix="$WORK/artifacts/$t/" \
          "$WORK/corpus/$t" "$WORK/seed/$t" >"$WORK/fuzz_$t.log" 2>&1); then
    status=1
    echo "FAIL fuzz_$t: see $WORK/fuzz_$t.log and $WORK/artifacts/$t/"
    grep -E "ERROR|runtime error|SUMMARY|Test unit written" "$WORK/fuzz_$t.log" | head -20
  fi
  grep -E "^stat::number_of_executed_units|^Done " "$WORK/fuzz_$t.log" || true
done
[[ $status == 0 ]] && echo "run_fuzz.sh: all targets ran ${SECS}s without a finding ($WORK)"
exit $status
