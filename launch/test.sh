#!/usr/bin/env bash
# The README's test command: set up, build, run every CPU test (CUDA tests are labelled "cuda"
# and run on a GPU machine through launch/device_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
bash launch/build.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -LE cuda -j "${CTEST_JOBS:-2}"
