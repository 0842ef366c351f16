#!/usr/bin/env bash
# One-shot check for the lent GPU machine (DEVICE.md): versions, configure + build the CUDA
# backend, run the CUDA tests and the GPU benchmark, then print a short table LAST. Every step is
# logged to $OUT (or ./device_logs); a failing step does not stop the later ones; exit code != 0
# if any step failed. Whole run bounded to ~8 minutes (each step gets at most what is left).
# Usage (from the repo root): bash launch/device_check.sh [extra gpu_bench args]
# SKIP="gpu_bench cuda_tests" skips the named steps (e.g. to spend the budget on the training
# steps); BUDGET_S raises the whole-run bound.
# Prebuilt programs: if .devbin/ (launch/device_prebuild.sh, carried with the call) holds them,
# built from these very sources (its sources.sha1 checks out) and every library they need resolves
# here, they are used and the configure and build steps are skipped (minutes of GPU time saved).
# Otherwise, or with PREBUILT=none, everything is built here as before. BIN_DIR=DIR: use the
# programs in DIR. VALIDATE_ONLY=1: check every training run's configuration, train nothing (fp8).
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
LOG=${OUT:-$ROOT/device_logs}
BUILD=${BUILD_DIR:-$ROOT/build-device}
JOBS=${JOBS:-$(nproc)}
BUDGET_S=${BUDGET_S:-470}
mkdir -p "$LOG"
START=$(date +%s)
NAMES=() RCS=() SECS=()
FAILED=0
SKIP=${SKIP:-}
PREBUILT=${PREBUILT:-$ROOT/.devbin}
BIN_DIR=${BIN_DIR:-} # set: the programs are there (no configure or build)
[[ -n $BIN_DIR ]] && SKIP="$SKIP configure build"

remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }

# step NAME CAP_SECONDS CMD...: runs CMD with a timeout of min(CAP, time left), logs to $LOG/NAME.log
step() {
  local name=$1 cap=$2
  shift 2
  if [[ " $SKIP " == *" $name "* ]]; then
    echo "=== [$name] skipped (SKIP)"
    return 0
  fi
  local left
  left=$(remaining)
  ((left < cap)) && cap=$left
  local t0 rc
  t0=$(date +%s)
  if ((cap <= 5)); then
    echo "[$name] skipped: time budget exhausted" >"$LOG/$name.log"
    rc=124
  else
    echo "=== [$name] (timeout ${cap}s) $*"
    timeout --kill-after=10 "$cap" bash -c '"$@"' _ "$@" >"$LOG/$name.log" 2>&1
    rc=$?
  fi
  local dt=$(($(date +%s) - t0))
  NAMES+=("$name") RCS+=("$rc") SECS+=("$dt")
  if ((rc != 0)); then
    FAILED=1
    echo "--- [$name] FAILED rc=$rc after ${dt}s; last lines of $LOG/$name.log:"
    tail -n 25 "$LOG/$name.log"
  else
    echo "--- [$name] ok (${dt}s)"
  fi
  return 0
}

env_info() {
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv
  nvcc --version | tail -n 2
  cmake --version | head -n 1
  echo "ninja $(ninja --version)"
  g++ --version | head -n 1
  grep -h "define CUBLAS_VER_\(MAJOR\|MINOR\|PATCH\|BUILD\)" /usr/local/cuda/include/cublas_api.h 2>/dev/null
  echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) changed files"
}

build_targets() {
  local targets=(cuda_tests fp8pipe)
  if ninja -C "$BUILD" -t targets all 2>/dev/null | grep -q '^gpu_bench:'; then targets+=(gpu_bench); fi
  echo "targets: ${targets[*]}"
  ninja -C "$BUILD" -j "$JOBS" "${targets[@]}"
}

# fp8 BIN train ARGS...: runs fp8pipe. With VALIDATE_ONLY=1 (tests/scripts/device_check_test.sh,
# on a CPU machine) `train` becomes `config` (validation only, nothing trains) and device cuda
# becomes cpu, so every run's configuration is checked before GPU time is spent on it.
# FP8_NP=N: the run is N ranks under mpirun (validated with --world-size N).
fp8() {
  local bin=$1
  shift
  if [[ -z ${VALIDATE_ONLY:-} ]]; then
    if [[ ${FP8_NP:-0} -gt 1 ]]; then
      mpirun -np "$FP8_NP" --allow-run-as-root --oversubscribe "$bin" "$@"
    else
      "$bin" "$@"
    fi
    return
  fi
  local a out=() skip=0
  for a in "$@"; do
    ((skip)) && { skip=0; continue; }
    case $a in
      train) out+=(config) ;;
      --save) skip=1 ;; # train's output path: not a config field
      --train.device=cuda) out+=(--train.device=cpu) ;;
      --log.*) ;; # outputs: not validated
      *) out+=("$a") ;;
    esac
  done
  [[ ${FP8_NP:-0} -gt 1 ]] && out+=(--world-size "$FP8_NP")
  echo "validate: ${out[*]}"
  "$bin" "${out[@]}" >/dev/null
}

find_bin() {
  if [[ -n $BIN_DIR ]]; then
    [[ -x $BIN_DIR/$1 ]] && echo "$BIN_DIR/$1"
    return 0
  fi
  find "$BUILD" -name "$1" -type f -perm -u+x -not -path "*/CMakeFiles/*" 2>/dev/null | head -n 1
}

# Checks .devbin: the manifest, the sources it was built from, the libraries, one start of each.
check_prebuilt() {
  local dir=$1 name
  cat "$dir/manifest" || return 1
  for name in cuda_tests fp8pipe gpu_bench; do
    [[ -x $dir/$name ]] || { echo "missing $dir/$name"; return 1; }
  done
  (cd "$ROOT" && sha1sum --quiet -c "$dir/sources.sha1") || { echo "sources changed since the prebuild"; return 1; }
  for name in cuda_tests fp8pipe gpu_bench; do
    if ldd "$dir/$name" | grep "not found"; then
      echo "$name: unresolved libraries"
      return 1
    fi
  done
  "$dir/cuda_tests" --gtest_list_tests >/dev/null || return 1
  "$dir/fp8pipe" --help >/dev/null || return 1
  echo "prebuilt programs usable"
}

run_tests() {
  local bin
  bin=$(find_bin cuda_tests)
  [[ -n $bin ]] || { echo "cuda_tests binary not found under $BUILD"; return 127; }
  "$bin" --gtest_output="xml:$LOG/cuda_tests.xml"
  local rc=$?
  # 0: all passed, 1: some failed; anything else is a crash (a signal, or an abort on a sticky CUDA
  # error such as an illegal address, which also poisons every later test of that process). Then
  # every test that has not passed runs again alone, each in its own process with its own timeout,
  # so one bad kernel costs one test's result, not the rest of the run's.
  ((rc == 0 || rc == 1)) && return $rc
  echo "=== cuda_tests ended abnormally (rc=$rc): each test not yet passed runs alone"
  local t passed_list rc_one worst=1
  passed_list=$(sed -n 's/^\[       OK \] \([A-Za-z0-9_./]*\) (.*/\1/p' "$LOG/cuda_tests.log" 2>/dev/null)
  for t in $("$bin" --gtest_list_tests | awk '/^[^ ]/{s=$1} /^  /{print s $1}'); do
    grep -qxF "$t" <<<"$passed_list" && continue
    echo "=== alone: $t"
    timeout --kill-after=5 "${TEST_TIMEOUT_S:-90}" "$bin" --gtest_filter="$t"
    rc_one=$?
    ((rc_one != 0)) && echo "=== alone: $t rc=$rc_one" && worst=2
  done
  return $worst
}

# After failures: up to 3 failed CUDA tests again under compute-sanitizer memcheck (out-of-bounds
# and misaligned accesses, named by kernel and address), so a wrong kernel is located in the same
# lease. Nothing to do when every test passed or the sanitizer is missing (gVisor machines).
sanitize_failed() {
  local bin t n=0 failed
  failed=$(grep -E "^\[  FAILED  \] [A-Za-z0-9_./]+$" "$LOG/cuda_tests.log" 2>/dev/null |
    awk '{print $4}' | sort -u)
  [[ -n $failed ]] || { echo "no failed CUDA test"; return 0; }
  bin=$(find_bin cuda_tests)
  [[ -n $bin ]] || { echo "cuda_tests binary not found"; return 127; }
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; return 0; }
  for t in $failed; do
    ((n++ >= 3)) && break
    echo "=== memcheck: $t"
    timeout --kill-after=5 60 compute-sanitizer --tool memcheck --print-limit 10 "$bin" \
      --gtest_filter="$t" 2>&1 | grep -E "^=========|\[  (FAILED|PASSED)" | head -n 40
  done
  return 0
}

run_bench() {
  local bin
  bin=$(find_bin gpu_bench)
  [[ -n $bin ]] || { echo "gpu_bench binary not found under $BUILD (CMake target missing?)"; return 127; }
  "$bin" --json "$LOG/gpu_bench.jsonl" "$@"
}

# gpu_vs_cpu LABEL DIR NP STEPS ARGS...: `fp8pipe train ARGS` with train.device=cuda, then =cpu
# (NP ranks under mpirun when NP > 1), then the largest relative difference of rank 0's per-step
# main loss (fails above TRAIN_TOL, default 1e-2: GEMM and attention accumulation orders differ,
# the GPU's attention GEMMs are bf16, and FP8 rounding amplifies that over steps).
gpu_vs_cpu() {
  local label=$1 dir=$2 np=$3 steps=$4 bin dev t0
  shift 4
  bin=$(find_bin fp8pipe)
  [[ -n $bin ]] || { echo "fp8pipe binary not found under $BUILD"; return 127; }
  mkdir -p "$dir"
  for dev in cuda cpu; do
    echo "--- $dev x $np rank(s)"
    t0=$(date +%s)
    FP8_NP=$((np > 1 ? np : 0)) fp8 "$bin" train "$@" "--train.steps=$steps" \
      --train.device=$dev --log.jsonl="$dir/$dev.r{rank}.jsonl" || return $?
    echo "$dev: $(($(date +%s) - t0))s"
  done
  [[ -n ${VALIDATE_ONLY:-} ]] && return 0
  python3 - "$dir/cuda.r0.jsonl" "$dir/cpu.r0.jsonl" "${TRAIN_TOL:-1e-2}" "$steps" "$label" <<'PY'
import json, sys
gpu, cpu = ([json.loads(l) for l in open(p) if l.startswith('{"step"')] for p in sys.argv[1:3])
tol, n, label = float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
assert len(gpu) == len(cpu) == n, (len(gpu), len(cpu))
rel = [abs(g["loss"] - c["loss"]) / abs(c["loss"]) for g, c in zip(gpu, cpu)]
for i in sorted({i for i in (0, 9, n // 2 - 1, n - 1) if 0 <= i < n}):
    print(f"step {i + 1:2d}: loss cuda {gpu[i]['loss']:.6f} cpu {cpu[i]['loss']:.6f} rel {rel[i]:.2e}")
worst = max(range(n), key=lambda i: rel[i])
print(f"{label} max relative loss difference {rel[worst]:.3e} at step {worst + 1} (tol {tol:g})")
sys.exit(0 if rel[worst] <= tol else 1)
PY
}

# 50 steps of configs/tiny.textproto (FP8, one process) on the GPU next to the CPU. TINY_STEPS=N
# runs N instead (the CPU emulation of CUDA is ~100x slower than a GPU); below 40 steps the
# warm-up is 1 step, so the schedule stays valid.
train_tiny_gpu_vs_cpu() {
  local n=${TINY_STEPS:-50}
  gpu_vs_cpu train_tiny "$LOG/train_tiny" 1 "$n" configs/tiny.textproto --train.eval_every=0 \
    --checkpoint.dir= --checkpoint.every=0 --log.every=10 \
    "--optim.warmup_steps=$((n >= 40 ? 20 : 1))"
}

# Two ranks (pp=2, DualPipe: both directions' sends and receives, which over NCCL need the
# executor's matched groups) on the GPU, both on GPU 0 (parallel.comm_backend=mpi stages the
# pipeline's device tensors through host memory), next to the same two ranks on the CPU.
two_rank_args() {
  local n=${TWO_RANK_STEPS:-20}
  echo configs/tiny.textproto --train.eval_every=0 --checkpoint.dir= --checkpoint.every=0 \
    --log.every=10 "--optim.warmup_steps=$((n >= 10 ? 5 : 1))" --parallel.pp=2 \
    --parallel.schedule=dualpipe
}
train_tiny_2rank_gpu_vs_cpu() {
  # shellcheck disable=SC2046 # the arguments have no spaces
  gpu_vs_cpu train_2rank "$LOG/train_2rank" 2 "${TWO_RANK_STEPS:-20}" $(two_rank_args) \
    --parallel.comm_backend=mpi
}

# Two ranks with expert parallelism (dp=2 x ep=2, FP8) on GPU 0 next to the CPU: the MoE's
# all-to-all on device tensors (staged through host memory by parallel.comm_backend=mpi) in its
# DeepSeek-V3 formats, FP8 codes and scales toward the experts and bf16 rows back; with
# DeepSeek-V3's memory measures on both sides (recomputed MLA up-projections, the experts'
# SwiGLU inputs held in FP8, the attention output held in E5M6, the weights' moving average in
# host memory).
ep_args() {
  echo configs/tiny.textproto --train.eval_every=0 --checkpoint.dir= --checkpoint.every=0 \
    --log.every=10 --optim.warmup_steps=1 --parallel.dp=2 --parallel.ep=2 --parallel.schedule=1f1b \
    --train.recompute=mla_up_proj --precision.fp8_swiglu_cache=true --optim.ema_decay=0.9 \
    --precision.attn_out_cache=e5m6
}
train_tiny_ep_gpu_vs_cpu() {
  # shellcheck disable=SC2046
  gpu_vs_cpu train_ep "$LOG/train_ep" 2 "${EP_STEPS:-10}" $(ep_args) --parallel.comm_backend=mpi
}

# The two 2-rank runs above again with parallel.comm_backend=nccl (the pipeline's sends and the
# MoE's all-to-all on NCCL, device buffers, one GPU per rank): the bytes moved are the same, so
# every logged loss and gradient norm must equal the MPI-staged GPU run's. Needs 2 GPUs
# (FP8PIPE_EMU_DEVICES on the CUDA emulation, whose NCCL runs between processes).
train_nccl_vs_mpi() {
  local bin gpus=${FP8PIPE_EMU_DEVICES:-} label dir steps args
  bin=$(find_bin fp8pipe)
  [[ -n $bin ]] || { echo "fp8pipe binary not found under $BUILD"; return 127; }
  [[ -n $gpus ]] || gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  if ((gpus < 2)); then
    echo "skipped: NCCL needs one GPU per rank, $gpus visible"
    return 0
  fi
  for label in train_2rank train_ep; do
    dir=$LOG/$label
    if [[ $label == train_2rank ]]; then
      steps=${TWO_RANK_STEPS:-20} args=$(two_rank_args)
    else
      steps=${EP_STEPS:-10} args=$(ep_args)
    fi
    [[ -f $dir/cuda.r0.jsonl ]] || { echo "$label: no MPI-staged GPU run to compare with"; return 1; }
    # shellcheck disable=SC2086
    FP8_NP=2 fp8 "$bin" train $args "--train.steps=$steps" --train.device=cuda \
      --parallel.comm_backend=nccl --log.jsonl="$dir/nccl.r{rank}.jsonl" || return $?
    [[ -n ${VALIDATE_ONLY:-} ]] && continue
    python3 - "$dir/nccl.r0.jsonl" "$dir/cuda.r0.jsonl" "$label" <<'PY' || return 1
import json, sys
a, b = ([json.loads(l) for l in open(p) if l.startswith('{"step"')] for p in sys.argv[1:3])
assert len(a) == len(b) > 0, (len(a), len(b))
same = all(x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"] for x, y in zip(a, b))
print(f"nccl {sys.argv[3]}: {len(a)} steps, losses and grad norms "
      f"{'identical to' if same else 'DIFFER from'} the MPI-staged run (last loss {a[-1]['loss']})")
sys.exit(0 if same else 1)
PY
  done
}

# `fp8pipe generate` on the GPU next to the CPU (Backend::attention_cached, the latent cache's
# absorbed GEMMs, MTP speculative decoding): a model of configs/tiny at init_std 0.1 (saved after
# one CPU step), greedy 64 tokens on each device in FP32 with the latent cache, plain and with
# --speculative mtp, then FP8 plain. FP32 texts must be the same on both devices (logits differ by
# summation order only, far below the gaps between this model's top logits); FP8 is reported.
generate_gpu_vs_cpu() {
  local bin dir=$LOG/generate dev mode text
  bin=$(find_bin fp8pipe)
  [[ -n $bin ]] || { echo "fp8pipe binary not found under $BUILD"; return 127; }
  mkdir -p "$dir"
  local cfg=(configs/tiny.textproto --model.init_std=0.1 --train.eval_every=0 --checkpoint.dir=
    --checkpoint.every=0 --optim.warmup_steps=1)
  fp8 "$bin" train "${cfg[@]}" --precision.mode=FP32 --train.steps=1 --train.device=cpu \
    --save "$dir/model.safetensors" || return $?
  [[ -n ${VALIDATE_ONLY:-} ]] && return 0
  local fail=0
  for mode in FP32:none FP32:mtp FP8:none; do
    for dev in cuda cpu; do
      "$bin" generate "${cfg[@]}" "--precision.mode=${mode%:*}" --train.device=$dev \
        --checkpoint "$dir/model.safetensors" --prompt "fp8pipe " --max-new-tokens 64 \
        "--speculative=${mode#*:}" >"$dir/${mode/:/_}_$dev.txt" 2>"$dir/${mode/:/_}_$dev.log" || return $?
      echo "generate ${mode/:/ speculative=} $dev: $(grep -o 'decode .*' "$dir/${mode/:/_}_$dev.log")"
    done
    if cmp -s "$dir/${mode/:/_}_cuda.txt" "$dir/${mode/:/_}_cpu.txt"; then
      text=same
    else
      text=different
      [[ ${mode%:*} == FP32 ]] && fail=1
    fi
    echo "generate ${mode/:/ speculative=}: cuda and cpu text $text"
  done
  return $fail
}

# configs/small.textproto on the GPU, FP8 then BF16 with the optimizer on the GPU
# (optim.placement=auto), then FP8 with the host optimizer (placement=host: gradient downloads,
# fp64 sums and AdamW on the host, weight uploads): a few steps each (shrunk batch), tokens/s from
# the JSONL (median over steps 3..6).
small_fp8_vs_bf16() {
  local bin dir=$LOG/train_small
  bin=$(find_bin fp8pipe)
  [[ -n $bin ]] || { echo "fp8pipe binary not found under $BUILD"; return 127; }
  mkdir -p "$dir"
  local args=(configs/small.textproto --train.device=cuda "--train.steps=${SMALL_STEPS:-6}"
    --train.seq_len=1024 --train.global_batch=8 --parallel.microbatches=1 --train.eval_every=0
    --optim.warmup_steps=1 --checkpoint.dir= --checkpoint.every=0 --log.every=1
    --precision.fp8_swiglu_cache=false)  # plain FP8; the fourth run turns the cache back on
  local mode
  for mode in FP8 BF16; do
    echo "--- $mode"
    fp8 "$bin" train "${args[@]}" --precision.mode=$mode --log.jsonl="$dir/$mode.jsonl" || return $?
  done
  echo "--- FP8, optim.placement=host"
  fp8 "$bin" train "${args[@]}" --precision.mode=FP8 --optim.placement=host \
    --log.jsonl="$dir/FP8host.jsonl" || return $?
  echo "--- FP8, train.recompute=mla_up_proj, precision.fp8_swiglu_cache"
  fp8 "$bin" train "${args[@]}" --precision.mode=FP8 --train.recompute=mla_up_proj \
    --precision.fp8_swiglu_cache=true --log.jsonl="$dir/FP8recompute.jsonl" || return $?
  [[ -n ${VALIDATE_ONLY:-} ]] && return 0
  python3 - "$dir/FP8.jsonl" "$dir/BF16.jsonl" "$dir/FP8host.jsonl" "$dir/FP8recompute.jsonl" <<'PY'
import json, statistics, sys
tps = []
for name, p in zip(("FP8", "BF16", "FP8 host-optim", "FP8 mem-saving"), sys.argv[1:5]):
    rows = [json.loads(l) for l in open(p) if l.strip()]
    # the median of steps 3.. (steps 1-2 create cuBLASLt plans for new expert row counts)
    timed = rows[2:] or rows
    t = statistics.median(r["tokens_per_s"] for r in timed)
    ms = statistics.median(r["ms"] for r in timed)
    gib = max(r.get("tensor_gib", 0) for r in rows)  # peak device tensors over the run's steps
    print(f"small {name:14s}: {t:10.1f} tokens/s  {ms:9.1f} ms/step  ({len(timed)} steps)  "
          f"peak tensors {gib:.2f} GiB")
    tps.append(t)
print(f"small FP8/BF16 tokens/s ratio {tps[0] / tps[1]:.3f} (optimizer on the GPU)")
print(f"small FP8 optimizer on GPU / on host tokens/s ratio {tps[0] / tps[2]:.3f}")
print(f"small FP8 recompute+swiglu cache / plain tokens/s ratio {tps[3] / tps[0]:.3f}")
PY
}

# Where the small config's step time goes, FP8 and BF16: log.op_profile (core/op_profile.h) over
# steps 2..3, each operator timed on the GPU and on the host (launch cost); the tables are the
# next optimization's starting point. Profiled runs are slower: their tokens/s are not the figure.
small_op_profile() {
  local bin dir=$LOG/train_small
  bin=$(find_bin fp8pipe)
  [[ -n $bin ]] || { echo "fp8pipe binary not found under $BUILD"; return 127; }
  mkdir -p "$dir"
  local mode
  for mode in FP8 BF16; do
    echo "--- $mode op profile"
    fp8 "$bin" train configs/small.textproto --train.device=cuda --train.steps=3 --train.seq_len=1024 \
      --train.global_batch=8 --parallel.microbatches=1 --train.eval_every=0 --optim.warmup_steps=1 \
      --checkpoint.dir= \
      --checkpoint.every=0 --log.every=1 --precision.mode=$mode \
      --log.op_profile="$dir/profile_$mode.json" || return $?
  done
}

# The host's share of one MoE layer (fp8pipe bench's "moe layer host" row: the wall time outside
# every backend call, i.e. the routing bookkeeping), FP8, 8192 tokens, 64 experts, top 8.
moe_host() {
  [[ -n ${VALIDATE_ONLY:-} ]] && return 0
  local bin
  bin=$(find_bin fp8pipe)
  [[ -n $bin ]] || { echo "fp8pipe binary not found under $BUILD"; return 127; }
  "$bin" bench --device=cuda --filter "moe layer" --reps 5
}

# The MoE's per-expert GEMMs (64 x 1024x384x1024, FP8 and BF16) as one grouped call spread over
# FP8PIPE_GEMM_STREAMS streams against the same GEMMs one after another on one stream.
expert_gemms() {
  [[ -n ${VALIDATE_ONLY:-} ]] && return 0
  local bin lanes
  bin=$(find_bin fp8pipe)
  [[ -n $bin ]] || { echo "fp8pipe binary not found under $BUILD"; return 127; }
  for lanes in 4 8; do
    FP8PIPE_GEMM_STREAMS=$lanes "$bin" bench --device=cuda --filter "expert gemms" --reps 5 || return $?
  done
}

export ROOT LOG BUILD JOBS BIN_DIR
export -f two_rank_args ep_args train_nccl_vs_mpi env_info build_targets fp8 gpu_vs_cpu find_bin check_prebuilt small_op_profile train_tiny_2rank_gpu_vs_cpu train_tiny_ep_gpu_vs_cpu sanitize_failed run_tests run_bench train_tiny_gpu_vs_cpu small_fp8_vs_bf16 moe_host expert_gemms generate_gpu_vs_cpu

step env 30 env_info
[[ -f $LOG/env.log ]] && cat "$LOG/env.log"
# CMake < 3.26 does not know nvcc's C++20 flag (CMAKE_CUDA_STANDARD 20): supply it.
CUDA20_FLAGS=()
if printf '%s\n3.26\n' "$(cmake --version | head -n 1 | awk '{print $3}')" | sort -V -C; then
  CUDA20_FLAGS=(-DCMAKE_CUDA20_STANDARD_COMPILE_OPTION=-std=c++20
    -DCMAKE_CUDA20_EXTENSION_COMPILE_OPTION=-std=c++20)
fi
if [[ -z $BIN_DIR && $PREBUILT != none && -d $PREBUILT ]]; then
  failed_before=$FAILED
  step prebuilt 60 check_prebuilt "$PREBUILT"
  if [[ ${RCS[-1]} == 0 ]]; then
    BIN_DIR=$PREBUILT
    export BIN_DIR
    SKIP="$SKIP configure build"
  else
    FAILED=$failed_before # unusable prebuilt programs are not a failure: build instead
  fi
fi
step configure 120 cmake -S "$ROOT" -B "$BUILD" -G Ninja -DFP8PIPE_CUDA=ON \
  -DCMAKE_BUILD_TYPE=Release "${CUDA20_FLAGS[@]}"
step build 330 build_targets
step cuda_tests 240 run_tests
step sanitize_failed 150 sanitize_failed
step gpu_bench 150 run_bench "$@"
step train_tiny_gpu_vs_cpu 180 train_tiny_gpu_vs_cpu
step train_tiny_2rank_gpu_vs_cpu 120 train_tiny_2rank_gpu_vs_cpu
step small_fp8_vs_bf16 240 small_fp8_vs_bf16
step small_op_profile 150 small_op_profile
step moe_host 60 moe_host
step expert_gemms 60 expert_gemms
step train_tiny_ep_gpu_vs_cpu 60 train_tiny_ep_gpu_vs_cpu
step train_nccl_vs_mpi 240 train_nccl_vs_mpi
step generate_gpu_vs_cpu 60 generate_gpu_vs_cpu

# ---- summary (last) ----
echo
echo "================ summary ================"
if [[ -f $LOG/cuda_tests.log ]]; then
  grep -E "^\[  (PASSED|FAILED) |^\[==========\] [0-9]+ tests? from .* ran" "$LOG/cuda_tests.log" | tail -n 12
  grep -E "splitK1 algo" "$LOG/cuda_tests.log" | head -n 6
  # one line per test suite of the CUDA backend adapter (op-by-op parity with the CPU backend)
  for suite in CudaBackendTest CudaAdamW NcclComm; do
    pass=$(grep -c "^\[       OK \] $suite\." "$LOG/cuda_tests.log")
    fail=$(grep -c "^\[  FAILED  \] $suite\.[A-Za-z0-9_]* (" "$LOG/cuda_tests.log")
    printf '%-16s passed %3s failed %3s\n' "$suite" "$pass" "$fail"
  done
  grep -E "^\[  FAILED  \] [A-Za-z0-9_./]+$" "$LOG/cuda_tests.log" | sort -u | head -n 20
fi
if [[ -f $LOG/sanitize_failed.log ]] && grep -q "^=== memcheck" "$LOG/sanitize_failed.log"; then
  grep -E "^=== memcheck|^========= (Invalid|Program hit|  at |ERROR SUMMARY)" \
    "$LOG/sanitize_failed.log" | head -n 20
fi
if [[ -f $LOG/gpu_bench.log ]]; then
  sed -n '/^quantize (/,$p' "$LOG/gpu_bench.log"
fi
for f in train_tiny_gpu_vs_cpu train_tiny_2rank_gpu_vs_cpu train_tiny_ep_gpu_vs_cpu small_fp8_vs_bf16 \
  generate_gpu_vs_cpu train_nccl_vs_mpi; do
  [[ -f $LOG/$f.log ]] && grep -E "^(step |train_tiny |train_2rank |train_ep |small |generate |nccl |skipped)" "$LOG/$f.log"
done
# FP8 GEMM shapes off cuBLASLt's rules (logged once per shape and run): zero-padded onto it, or on
# the dequantize + fp32 fallback (which should stay at 0).
for f in train_tiny_gpu_vs_cpu small_fp8_vs_bf16; do
  [[ -f $LOG/$f.log ]] || continue
  printf '%s gemm_fp8 shapes: %s zero-padded, %s on the fp32 fallback\n' "$f" \
    "$(grep -c 'zero-padded to' "$LOG/$f.log")" "$(grep -c 'using dequantize + fp32 GEMM' "$LOG/$f.log")"
done
[[ -f $LOG/moe_host.log ]] && grep -E "^(bench |moe layer host)" "$LOG/moe_host.log"
[[ -f $LOG/expert_gemms.log ]] && grep -E "^expert gemms" "$LOG/expert_gemms.log"
if [[ -f $LOG/small_op_profile.log ]]; then  # the first rows of each table
  grep -E -A 10 "^--- |^operator " "$LOG/small_op_profile.log" | grep -E "^(--- |operator|[a-z_0-9]+ +[0-9]+ )" | head -n 26
  grep -E "busy" "$LOG/small_op_profile.log"
fi
printf '\n%-28s %6s %6s\n' step rc secs
for i in "${!NAMES[@]}"; do
  printf '%-28s %6s %6s\n' "${NAMES[$i]}" "${RCS[$i]}" "${SECS[$i]}"
done
echo "total $(($(date +%s) - START))s; logs in $LOG; $([[ $FAILED == 0 ]] && echo ALL OK || echo SOME STEPS FAILED)"
exit $FAILED
