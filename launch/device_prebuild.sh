#!/usr/bin/env bash
# Builds the three programs launch/device_check.sh runs on the GPU machine (cuda_tests, fp8pipe,
# gpu_bench) HERE, strips them into .devbin/ (git-ignored) with a manifest of the commit they were
# built from, so that a device call can carry them (`carry: [".devbin"]`) and spend its few
# minutes of GPU time testing instead of compiling. device_check.sh uses them only if the commit
# matches, the tree is unchanged since, and every shared library resolves there (`ldd`); otherwise
# it builds as before. DEVICE.md: a binary built on this Debian 12 machine ran on the GPU machine.
# Usage (repo root): bash launch/device_prebuild.sh   [BUILD_DIR=... JOBS=...]
# The build directory must build the CUDA targets (FP8PIPE_CUDA=AUTO or ON with the toolkit).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# Default: the README's build/ when it is a Ninja build with the CUDA targets (already mostly built:
# minutes saved here too), else a fresh Release build in build-devbin/.
BUILD=${BUILD_DIR:-}
if [[ -z $BUILD ]]; then
  BUILD=$ROOT/build-devbin
  if [[ -f $ROOT/build/build.ninja ]] && ninja -C "$ROOT/build" -t targets all 2>/dev/null |
    grep -q '^cuda_tests:'; then
    BUILD=$ROOT/build
  fi
fi
DEST=$ROOT/.devbin
JOBS=${JOBS:-$(nproc)}

if [[ ! -f $BUILD/build.ninja ]]; then
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DFP8PIPE_CUDA=ON -DCMAKE_BUILD_TYPE=Release
fi
grep -q "^FP8PIPE_CUDA:STRING=ON\|^FP8PIPE_CUDA:STRING=AUTO" "$BUILD/CMakeCache.txt" ||
  { echo "device_prebuild: $BUILD is not a CUDA build (FP8PIPE_CUDA)" >&2; exit 1; }
ninja -C "$BUILD" -j "$JOBS" cuda_tests fp8pipe gpu_bench

rm -rf "$DEST"
mkdir -p "$DEST"
for name in cuda_tests fp8pipe gpu_bench; do
  bin=$(find "$BUILD" -name "$name" -type f -perm -u+x -not -path "*/CMakeFiles/*" | head -n 1)
  [[ -n $bin ]] || { echo "device_prebuild: $name not found under $BUILD" >&2; exit 1; }
  strip -o "$DEST/$name" "$bin"
done
# The sources compiled into them (with uncommitted edits): device_check checks them with
# `sha1sum -c`, which needs no git there.
git ls-files -- '*.cc' '*.h' '*.cu' '*.cuh' '*.proto' '*CMakeLists.txt' '*.cmake' |
  xargs sha1sum >"$DEST/sources.sha1"
{
  echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' (with uncommitted edits)')"
  echo "build_type $(sed -n 's/^CMAKE_BUILD_TYPE:STRING=//p' "$BUILD/CMakeCache.txt")"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n)"
} >"$DEST/manifest"
cat "$DEST/manifest"
du -ch "$DEST"/* | tail -n 1
echo "carry it: device run with carry [\".devbin\"] and command 'bash launch/device_check.sh'"
