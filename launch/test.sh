#!/usr/bin/env bash
# The README's test command: set up, build, run every CPU test (CUDA tests are labelled "cuda"
# and run on a GPU machine through launch/device_check.sh), then the CUDA backend on the CPU
# emulation of CUDA (kernels/cuda_emu; EMU=0 skips it): the CUDA tests with blocks and threads in
# reverse and shuffled order (races), the NCCL comm over 4 processes (the emulation's NCCL), the
# pipeline executor and the device optimizer's ZeRO-1 exchanges over it, then, through
# launch/device_check.sh's own steps, the CUDA tests, gpu_bench and short GPU-vs-CPU training runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
bash launch/build.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
ctest --test-dir "${BUILD_DIR:-build}" --output-on-failure -LE cuda -j "${CTEST_JOBS:-2}"

if [[ ${EMU:-1} != 0 ]]; then
  emu=${EMU_BUILD_DIR:-build-emu}
  cmake -S . -B "$emu" -G Ninja -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-RelWithDebInfo} \
    -DFP8PIPE_CUDA=EMULATE >/dev/null
  cmake --build "$emu" -j "${JOBS:-$(nproc)}" --target cuda_tests cuda_emu_tests fp8pipe gpu_bench \
    parallel_mpi_tests pipeline_mpi_tests
  ctest --test-dir "$emu" --output-on-failure \
    -R "cuda_emu_tests|cuda_tests_order_|mpi.comm_nccl$|mpi.pipeline_nccl_np|mpi.placement_nccl"
  mkdir -p "$emu/bin"
  emu_abs=$(cd "$emu" && pwd)
  ln -sf "$emu_abs/tests/cuda_tests" "$emu_abs/launch/fp8pipe" "$emu_abs/launch/gpu_bench" \
    "$emu/bin/"
  # ~40 s a tiny step on the emulation (2 cores): 2 steps on 1 rank, on 2 (pp=2, DualPipe) and on 2 with
  # ep=2, next to the CPU, and the 2-rank runs again over NCCL;
  # gpu_bench on one small shape of each kind (--smoke: its code paths, not speed).
  # Two emulated GPUs, so that the NCCL step (train_nccl_vs_mpi) can give each rank its own.
  FP8PIPE_EMU_DEVICES=2 BIN_DIR=$emu/bin OUT=$emu/device_logs TINY_STEPS=${EMU_TINY_STEPS:-2} \
    TWO_RANK_STEPS=${EMU_TWO_RANK_STEPS:-2} EP_STEPS=${EMU_EP_STEPS:-2} SKIP="env small_fp8_vs_bf16 small_op_profile moe_host expert_gemms" \
    bash launch/device_check.sh --smoke --reps 2 --warmup 1
fi
