#!/usr/bin/env bash
# The README's main command: set up, build, then train the tiny config under mpirun (CPU; the
# CUDA backend is used when a GPU is present and the build has it). Extra arguments are passed to
# `fp8pipe train` as overrides, e.g. --train.steps=50.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
bash launch/build.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
NP=${NP:-1}
exec mpirun -np "$NP" "${BUILD_DIR:-build}/launch/fp8pipe" train configs/tiny.textproto "$@"
