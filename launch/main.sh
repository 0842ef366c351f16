#!/usr/bin/env bash
# The README's main command: set up, build, then train the tiny config under mpirun (CPU; the
# CUDA backend is used when a GPU is present and the build has it). Extra arguments are passed to
# `fp8pipe train` as overrides, e.g. --train.steps=50.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
bash launch/build.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
# OpenBLAS 0.3.21 does not recognise some virtual CPUs and falls back to its Prescott (SSE3)
# kernels, 3-4x slower; when the CPU has AVX2+FMA and nothing is set, use the Haswell kernels.
if [ -z "${OPENBLAS_CORETYPE:-}" ] && grep -q avx2 /proc/cpuinfo && grep -q fma /proc/cpuinfo; then
  export OPENBLAS_CORETYPE=Haswell
fi
NP=${NP:-1}
exec mpirun -np "$NP" "${BUILD_DIR:-build}/launch/fp8pipe" train configs/tiny.textproto "$@"
