#!/usr/bin/env bash
# optim.placement=device on several ranks (parallel::DeviceNameSync: ZeRO-1's gradient
# reduce-scatter and weight all-gather on the backend's tensors, the sharded device AdamW)
# against the host optimizer under real mpirun. On the CPU backend both placements must give the
# same bits: every rank's losses, gradient norms and evaluation losses of the weights' moving
# average, and every checkpoint shard (weights, Adam moments, the average) byte for byte, for
# DualPipe pp=2 x dp=2 x ep=2 (FP8) and DualPipeV pp=2 x dp=2 (two local copies of the embedding
# on ranks that also exchange it). A checkpoint written by the host placement resumes under the
# device placement to the host run's final shards.
# With PLACEMENT_CUDA=1 (the CUDA emulation's CTest mpi.placement_nccl, FP8PIPE_EMU_DEVICES=8),
# the same DualPipe layout runs on train.device=cuda over NCCL: device tensors on the wire. The
# device's squared norm is a tree sum (not the host's index order), so there the two placements
# agree within 1e-6 relative in loss and gradient norm instead of bitwise; a device-placement
# checkpoint resumes to the uninterrupted run's next step exactly.
# optim.overlap_grad_reduce (parallel::GradOverlap) and optim.overlap_param_gather
# (parallel::GatherOverlap): runs with the reduce-scatter started during the pipeline and the
# weight all-gather ended in the next step's give the bits of runs with both between the
# pipelines, over MPI (DualPipe), over matched groups on MPI (1F1B) and, on the emulation, over
# the serial NCCL (DualPipe at pp=2 and, on 8 emulated GPUs, at pp=4).
# Usage: multirank_placement_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"  # test_init, ok, bad, test_summary
test_init "$@"
COMMON=(--train.steps=4 --log.every=1 --optim.warmup_steps=1 --train.seq_len=16)

run() {  # run NAME NP [overrides...]
  local name=$1 np=$2; shift 2
  timeout 400 mpirun -np "$np" "$BIN" train "$SRC/configs/tiny.textproto" "${COMMON[@]}" \
    --log.jsonl="$TMP/$name.r{rank}.jsonl" "$@" >"$TMP/$name.log" 2>&1
}

same_logs() {  # same_logs A B NP [TOL]: every rank's step and eval records, exactly or within TOL
  python3 - "$TMP" "$1" "$2" "$3" "${4:-0}" <<'PY'
import json, sys
tmp, a, b, np, tol = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
keys = ("loss", "grad_norm", "mtp_loss", "eval_loss", "eval_ema_loss")
n = 0
for r in range(np):
    load = lambda name: [json.loads(l) for l in open(f"{tmp}/{name}.r{r}.jsonl") if l.startswith("{")]
    x, y = load(a), load(b)
    assert len(x) == len(y) and any("grad_norm" in e for e in x), (r, len(x), len(y))
    for ex, ey in zip(x, y):
        for k in keys:
            if k not in ex:
                continue
            if tol == 0:
                assert ex[k] == ey[k], f"rank {r} step {ex.get('step')} {k}: {ex[k]} vs {ey[k]}"
            else:
                rel = abs(ex[k] - ey[k]) / max(abs(ex[k]), 1e-30)
                assert rel <= tol, f"rank {r} step {ex.get('step')} {k}: {ex[k]} vs {ey[k]} ({rel:.1e})"
            n += 1
print(f"{n} values {'identical' if tol == 0 else f'within {tol:g}'} over {np} ranks")
PY
}

same_shards() {  # same_shards DIR_A DIR_B: every rank's shard byte for byte
  local f n=0
  for f in "$1"/rank_*.safetensors; do
    cmp -s "$f" "$2/$(basename "$f")" || { echo "$(basename "$f") differs"; return 1; }
    n=$((n + 1))
  done
  ((n > 0)) || { echo "no shards in $1"; return 1; }
  echo "$n shards identical"
}

# overlap_same LABEL ON OFF NP MODE [SHARDS_ON SHARDS_OFF]: run ON (optim.overlap_grad_reduce and
# optim.overlap_param_gather on) logged sets started during the pipeline, MODE "when final" or "at
# matched-group rounds", and weight sets ended at their chunk's first use in the next step; run
# OFF (both exchanges between the pipelines) logged neither; both give the same bits: every
# rank's records and, given two checkpoint directories, every shard.
overlap_same() {
  local early gathered
  early=$(sed -n "s/.*ZeRO-1 overlap: \([0-9]*\) of \([0-9]*\) gradient exchanges.*started during the pipeline.*($5).*/\1 of \2/p" "$TMP/$2.log")
  gathered=$(sed -n "s/.*ZeRO-1 overlap: \([0-9]*\) of \([0-9]*\) weight all-gathers.*ended at their chunk's first use.*/\1 of \2/p" "$TMP/$2.log")
  if [ -n "$early" ] && [ "${early%% *}" -gt 0 ] && [ -n "$gathered" ] &&
     [ "${gathered%% *}" -gt 0 ] && ! grep -q "ZeRO-1 overlap" "$TMP/$3.log" &&
     same_logs "$2" "$3" "$4" >"$TMP/$2.cmp" 2>&1 &&
     { [ $# -lt 7 ] || same_shards "$6" "$7" >>"$TMP/$2.cmp"; }; then
    ok "$1: $early sets started during the pipeline ($5), $gathered weight sets ended at their chunk's first use in the next step, the bits of both exchanges outside the pipeline ($(tr '\n' ';' <"$TMP/$2.cmp"))"
  else
    bad "$1: overlapped vs outside the pipeline (started: '${early}', gathered: '${gathered}')"
    cat "$TMP/$2.cmp" 2>/dev/null
  fi
}

if [[ ${PLACEMENT_CUDA:-0} != 1 ]]; then
  # DualPipe pp=2 x dp=2 x ep=2 (FP8), checkpoints at steps 2 and 4, the moving average evaluated.
  DP=(--parallel.pp=2 --parallel.dp=2 --parallel.ep=2 --parallel.schedule=dualpipe
      --precision.mode=FP8 --checkpoint.every=2 --train.eval_every=2 --train.eval_batches=1
      --optim.ema_decay=0.9)
  for place in host device; do
    run "dp_$place" 4 "${DP[@]}" --optim.placement=$place --checkpoint.dir="$TMP/ck_$place" ||
      { bad "DualPipe pp=2 x dp=2 x ep=2, optim.placement=$place"; tail -5 "$TMP/dp_$place.log"; }
  done
  if grep -q "AdamW on cpu (optim.placement=device), ZeRO-1 exchanges over MPI" "$TMP/dp_device.log" &&
     same_logs dp_host dp_device 4 >"$TMP/dp.cmp" 2>&1 &&
     same_shards "$TMP/ck_host/step_00000002" "$TMP/ck_device/step_00000002" >>"$TMP/dp.cmp" &&
     same_shards "$TMP/ck_host/step_00000004" "$TMP/ck_device/step_00000004" >>"$TMP/dp.cmp"; then
    ok "DualPipe pp=2 x dp=2 x ep=2 FP8: device placement gives the host bits ($(tr '\n' ';' <"$TMP/dp.cmp"))"
  else
    bad "DualPipe pp=2 x dp=2 x ep=2 FP8: device vs host placement"; cat "$TMP/dp.cmp"
  fi

  # The host placement's step-2 checkpoint, resumed under the device placement, ends at the host
  # run's step-4 shards.
  if run resume 4 "${DP[@]}" --optim.placement=device --checkpoint.dir="$TMP/ck_resume" \
       --checkpoint.resume="$TMP/ck_host/step_00000002" &&
     grep -q "resumed from $TMP/ck_host/step_00000002" "$TMP/resume.log" &&
     same_shards "$TMP/ck_host/step_00000004" "$TMP/ck_resume/step_00000004" >"$TMP/resume.cmp"; then
    ok "host checkpoint resumed on the device placement: $(cat "$TMP/resume.cmp") at step 4"
  else
    bad "host checkpoint resumed on the device placement"; tail -5 "$TMP/resume.log"
    cat "$TMP/resume.cmp" 2>/dev/null
  fi

  # optim.overlap_grad_reduce (default true: every run above starts each set's exchange during the
  # pipeline, once its chunks are final): the same DualPipe run with the exchange after the
  # pipeline gives the same bits, and the overlapped run started its exchanges early.
  run dp_after 4 "${DP[@]}" --optim.placement=host --optim.overlap_grad_reduce=false \
    --optim.overlap_param_gather=false --checkpoint.dir="$TMP/ck_after" ||
    { bad "DualPipe, optim.overlap_grad_reduce=false"; tail -5 "$TMP/dp_after.log"; }
  overlap_same "DualPipe over MPI" dp_host dp_after 4 "when final" \
    "$TMP/ck_host/step_00000004" "$TMP/ck_after/step_00000004"
  # Matched point-to-point groups (NCCL's mode, forced on MPI): sets start at the rounds of
  # parallel::GradOverlap. 1F1B pp=2: the last stage's sets start before its last group.
  M=(--parallel.pp=2 --parallel.dp=2 --parallel.ep=2 --parallel.schedule=1f1b --train.steps=3
     --checkpoint.every=3 --train.eval_every=0)
  FP8PIPE_P2P_GROUPS=matched run m_on 4 "${M[@]}" --optim.placement=device \
    --checkpoint.dir="$TMP/ck_m_on" || { bad "1F1B matched groups, overlap"; tail -5 "$TMP/m_on.log"; }
  FP8PIPE_P2P_GROUPS=matched run m_off 4 "${M[@]}" --optim.placement=host \
    --optim.overlap_grad_reduce=false --optim.overlap_param_gather=false \
    --checkpoint.dir="$TMP/ck_m_off" ||
    { bad "1F1B matched groups, no overlap"; tail -5 "$TMP/m_off.log"; }
  overlap_same "1F1B, matched groups on MPI" m_on m_off 4 "at matched-group rounds" \
    "$TMP/ck_m_on/step_00000003" "$TMP/ck_m_off/step_00000003"

  # DualPipeV pp=2 x dp=2: each rank holds "embed.weight" twice and shares it with its replica.
  # The device run cuts its exchanges into 20 KB buckets (FP8PIPE_ZERO1_BUCKET_MB), one after
  # another: the same bits.
  for place in host device; do
    FP8PIPE_ZERO1_BUCKET_MB=$([ $place = device ] && echo 0.02 || echo 256) run "dv_$place" 4 --parallel.pp=2 --parallel.dp=2 --parallel.schedule=dualpipev \
      --precision.mode=FP32 --checkpoint.dir="$TMP/dv_$place" --checkpoint.every=4 \
      --train.eval_every=0 --optim.placement=$place ||
      { bad "DualPipeV pp=2 x dp=2, optim.placement=$place"; tail -5 "$TMP/dv_$place.log"; }
  done
  buckets=$(sed -n 's/.*ZeRO-1 exchanges over MPI in \([0-9]*\) buckets.*/\1/p' "$TMP/dv_device.log" | head -n 1)
  echo "DualPipeV device run: ${buckets:-?} buckets of 20 KB"
  if [ "${buckets:-0}" -gt 10 ] && same_logs dv_host dv_device 4 >"$TMP/dv.cmp" 2>&1 &&
     same_shards "$TMP/dv_host/step_00000004" "$TMP/dv_device/step_00000004" >>"$TMP/dv.cmp"; then
    ok "DualPipeV pp=2 x dp=2, $buckets buckets: device placement gives the host bits ($(tr '\n' ';' <"$TMP/dv.cmp"))"
  else
    bad "DualPipeV pp=2 x dp=2: device vs host placement"; cat "$TMP/dv.cmp"
  fi

  # A bucket size that is not a positive number stops the run at start-up, naming the variable.
  if FP8PIPE_ZERO1_BUCKET_MB=lots run bad_bucket 2 --parallel.pp=2 --optim.placement=device \
       --checkpoint.dir= --checkpoint.every=0 --train.eval_every=0; then
    bad "FP8PIPE_ZERO1_BUCKET_MB=lots was accepted"
  elif grep -q "FP8PIPE_ZERO1_BUCKET_MB='lots': expected a positive number of MB" "$TMP/bad_bucket.log"; then
    ok "FP8PIPE_ZERO1_BUCKET_MB=lots: refused, naming it"
  else
    bad "FP8PIPE_ZERO1_BUCKET_MB=lots: no clear error"; tail -5 "$TMP/bad_bucket.log"
  fi
else
  # The CUDA emulation: train.device=cuda, one emulated GPU per rank, NCCL on device tensors.
  CU=(--train.steps=3 --parallel.pp=2 --parallel.dp=2 --parallel.ep=2 --parallel.schedule=dualpipe
      --precision.mode=FP8 --train.device=cuda --parallel.comm_backend=nccl --checkpoint.every=2
      --train.eval_every=0)
  # The device run in 50 KB buckets: sets exchanged one after another on the serial NCCL.
  for place in host device; do
    FP8PIPE_ZERO1_BUCKET_MB=$([ $place = device ] && echo 0.05 || echo 256) \
      run "cu_$place" 4 "${CU[@]}" --optim.placement=$place --checkpoint.dir="$TMP/cu_ck_$place" ||
      { bad "CUDA emulation over NCCL, optim.placement=$place"; tail -5 "$TMP/cu_$place.log"; }
  done
  # The same device run with the exchange after the pipeline: the overlapped run above started
  # some sets at their matched-group rounds, in the middle of the pipeline's NCCL operations on
  # the serial NCCL (a wrong place would hang there), with the same bits.
  FP8PIPE_ZERO1_BUCKET_MB=0.05 run cu_after 4 "${CU[@]}" --optim.placement=device \
    --optim.overlap_grad_reduce=false --optim.overlap_param_gather=false \
    --checkpoint.dir="$TMP/cu_ck_after" ||
    { bad "CUDA emulation over NCCL, no overlap"; tail -5 "$TMP/cu_after.log"; }
  overlap_same "CUDA emulation, DualPipe over NCCL" cu_device cu_after 4 "at matched-group rounds"
  # DualPipe pp=4 x dp=2 x ep=2 on 8 emulated GPUs: sets start at their rounds among four pipeline
  # ranks' groups and the expert all-to-alls of the serial NCCL; the bits of the exchange after.
  P4=(--train.steps=2 --parallel.pp=4 --parallel.dp=2 --parallel.ep=2 --parallel.schedule=dualpipe
      --train.device=cuda --parallel.comm_backend=nccl --optim.placement=device --checkpoint.dir=
      --checkpoint.every=0 --train.eval_every=0)
  run p4_on 8 "${P4[@]}" || { bad "CUDA emulation pp=4 over NCCL, overlap"; tail -5 "$TMP/p4_on.log"; }
  run p4_off 8 "${P4[@]}" --optim.overlap_grad_reduce=false --optim.overlap_param_gather=false ||
    { bad "CUDA emulation pp=4 over NCCL, no overlap"; tail -5 "$TMP/p4_off.log"; }
  overlap_same "CUDA emulation, DualPipe pp=4 x dp=2 x ep=2 over NCCL" p4_on p4_off 8 \
    "at matched-group rounds"
  # The device run's step-2 checkpoint (device weights and sharded moments through the host
  # copies) resumed on the device: step 3 as in the uninterrupted run, bit for bit.
  if run cu_resume 4 "${CU[@]}" --optim.placement=device --checkpoint.dir="$TMP/cu_ck_resume" \
       --checkpoint.resume="$TMP/cu_ck_device/step_00000002" &&
     python3 - "$TMP/cu_device.r0.jsonl" "$TMP/cu_resume.r0.jsonl" >"$TMP/cu_resume.cmp" 2>&1 <<'PY'
import json, sys
a, b = ([json.loads(l) for l in open(p) if l.startswith('{"step"')] for p in sys.argv[1:3])
assert len(a) == 3 and len(b) == 1 and b[0]["step"] == 3, (len(a), len(b))
for k in ("loss", "grad_norm", "mtp_loss"):
    assert a[2][k] == b[0][k], (k, a[2][k], b[0][k])
print(f"step 3 loss {b[0]['loss']}, norm {b[0]['grad_norm']} as uninterrupted")
PY
  then
    ok "CUDA emulation: a device-placement checkpoint resumes exactly ($(cat "$TMP/cu_resume.cmp"))"
  else
    bad "CUDA emulation: device-placement resume"; tail -5 "$TMP/cu_resume.log"
    cat "$TMP/cu_resume.cmp" 2>/dev/null
  fi
  if grep -Eq "ZeRO-1 exchanges over NCCL on device tensors in [0-9]{2,} buckets" "$TMP/cu_device.log" &&
     same_logs cu_host cu_device 4 1e-6 >"$TMP/cu.cmp" 2>&1; then
    ok "CUDA emulation, DualPipe pp=2 x dp=2 x ep=2 over NCCL: device placement matches host ($(cat "$TMP/cu.cmp"))"
  else
    bad "CUDA emulation over NCCL: device vs host placement"; cat "$TMP/cu.cmp" 2>/dev/null
    grep -h "optimizer" "$TMP/cu_device.log" | head -2
  fi
fi
test_summary
