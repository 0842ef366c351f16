#!/usr/bin/env bash
# Configures and builds fp8pipe into ./build (CUDA backend when a toolkit is found).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-RelWithDebInfo} \
  -DFP8PIPE_CUDA=${FP8PIPE_CUDA:-AUTO} >/dev/null
cmake --build "$BUILD_DIR" -j "${JOBS:-$(nproc)}"
