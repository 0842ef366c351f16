#!/usr/bin/env bash
# Exact resume (DESIGN.md §6, STYLE.md 9): the tiny config trained 12 steps straight must equal,
# bitwise, the same run stopped and resumed: after a clean stop at step 8, after kill -9 once the
# step-8 checkpoint is committed, after a crash in the middle of a checkpoint write (the test hook
# FP8PIPE_TEST_CRASH_IN_SAVE=1), from a corrupt newest checkpoint with --fallback, from a
# checkpoint of another recorded layout with --reshard, and with async writes. Also checks
# `fp8pipe ckpt verify/export` and that the export loads with Python's safetensors.numpy and
# equals the trainer's own parameters. Runtime ~20-60 s on 2 cores.
# Usage (CTest): bash resume_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail

BUILD=$(cd "${1:?usage: $0 BUILD_DIR SOURCE_DIR}" && pwd)
SRC=$(cd "${2:?usage: $0 BUILD_DIR SOURCE_DIR}" && pwd)
BIN=$BUILD/launch/fp8pipe
CFG=$SRC/configs/tiny.textproto
failed=0

die() {
  echo "FAIL: $*" >&2
  exit 1
}
bad() {
  echo "FAIL: $*" >&2
  failed=$((failed + 1))
}

[ -x "$BIN" ] || die "$BIN is not built (ninja -C $BUILD fp8pipe)"
python3 -c 'import numpy, safetensors' 2>/dev/null ||
  die "python packages missing: pip install -r $SRC/requirements-test.txt (launch/setup.sh does)"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cd "$TMP" || die "no temp dir"

# A shortened tiny run. The LR schedule is pinned by optim.decay_steps so that it does not depend
# on train.steps (an 8-step run and a 12-step run share it).
COMMON=(--train.eval_every=0 --train.global_batch=8 --parallel.microbatches=2
  --optim.warmup_steps=2 --optim.decay_steps=20 --checkpoint.every=4 --checkpoint.keep_last=0
  --log.every=100)
train() { # NAME STEPS [args...]: one process, checkpoints in NAME/, metrics appended to NAME.N.jsonl
  local name=$1 steps=$2
  shift 2
  local n
  n=$(find . -maxdepth 1 -name "$name.*.jsonl" | wc -l)
  "$BIN" train "$CFG" "${COMMON[@]}" --train.steps="$steps" --checkpoint.dir="$name" \
    --log.jsonl="$name.$n.jsonl" "$@" >>"$name.log" 2>&1
}

# The records of steps FROM..TO that must match (timings excluded), merged over a run's
# processes: a later process's record of a step replaces an earlier one.
records() { # FROM TO JSONL...
  python3 - "$@" <<'EOF'
import json, sys
lo, hi = int(sys.argv[1]), int(sys.argv[2])
keep = ("step", "loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "tokens", "skipped",
        "dropped", "a2a_bytes", "expert_overload", "expert_load")
recs = {}
for path in sys.argv[3:]:
    for line in open(path):
        r = json.loads(line)
        if "step" in r and "loss" in r and lo <= r["step"] <= hi:
            recs[r["step"]] = {k: r.get(k) for k in keep}
for s in sorted(recs):
    print(json.dumps(recs[s], sort_keys=True))
EOF
}

# Run NAME must equal the straight run: steps 9..12 of the metrics, the exported weights and the
# whole step-12 shard (weights, moments, router biases).
same_as_straight() {
  local name=$1
  records 9 12 "$name".*.jsonl >"$name.rec"
  records 9 12 straight.*.jsonl | cmp -s - "$name.rec" || bad "$name: steps 9..12 differ from the straight run"
  [ "$(wc -l <"$name.rec")" = 4 ] || bad "$name: expected records of steps 9..12"
  "$BIN" ckpt export "$name" "$name.export.safetensors" >/dev/null 2>>"$name.log" ||
    bad "$name: ckpt export failed"
  cmp -s straight.export.safetensors "$name.export.safetensors" ||
    bad "$name: exported step-12 weights differ from the straight run"
  cmp -s straight/step_00000012/rank_00000.safetensors "$name/step_00000012/rank_00000.safetensors" ||
    bad "$name: step-12 shard (weights, moments, biases) differs from the straight run"
}

SECONDS=0
# 1. Straight through, 12 steps.
train straight 12 --save straight.model.safetensors || die "straight run failed: $(cat straight.log)"
[ "$(records 1 12 straight.*.jsonl | wc -l)" = 12 ] || die "straight run: expected 12 step records"
"$BIN" ckpt verify straight >verify.out 2>&1 || bad "ckpt verify on a good checkpoint: $(cat verify.out)"
"$BIN" ckpt export straight straight.export.safetensors >/dev/null || die "ckpt export failed"
cmp -s straight.export.safetensors straight.model.safetensors ||
  bad "ckpt export differs from the trainer's own --save output"
python3 - <<'EOF' || bad "export does not load with safetensors.numpy or differs from the trainer's"
import numpy as np
from safetensors.numpy import load_file
exp = load_file("straight.export.safetensors")
ref = load_file("straight.model.safetensors")   # written by the trainer's save_model
assert exp.keys() == ref.keys() and len(exp) > 0, (len(exp), len(ref))
for k in ref:
    assert exp[k].dtype == np.float32 and exp[k].shape == ref[k].shape, k
    assert np.array_equal(exp[k].view(np.uint32), ref[k].view(np.uint32)), k
assert exp["embed.weight"].shape == (256, 64)
EOF

# 2. Stop cleanly at step 8, resume to 12 in a new process.
train stopped 8 || die "8-step run failed: $(cat stopped.log)"
train stopped 12 || die "resume failed: $(cat stopped.log)"
grep -q "resumed from stopped/step_00000008" stopped.log || bad "stopped: did not resume from step 8"
same_as_straight stopped

# 3. kill -9 once step 8 is committed, then resume.
"$BIN" train "$CFG" "${COMMON[@]}" --train.steps=12 --checkpoint.dir=killed \
  --log.jsonl=killed.0.jsonl >killed.log 2>&1 &
pid=$!
for _ in $(seq 1 1200); do
  [ -e killed/step_00000008/COMMITTED ] && break
  sleep 0.05
done
[ -e killed/step_00000008/COMMITTED ] || bad "killed: step 8 was never committed"
if kill -9 "$pid" 2>/dev/null; then echo "killed: SIGKILL sent after step 8 was committed"; else
  echo "killed: note: the run had already finished before SIGKILL"
fi
wait "$pid" 2>/dev/null
train killed 12 || die "resume after kill -9 failed: $(cat killed.log)"
same_as_straight killed

# 4. A crash in the middle of the step-8 checkpoint write leaves step 4 intact and used.
train crashed 4 || die "4-step run failed"
export FP8PIPE_TEST_CRASH_IN_SAVE=1
train crashed 12 && bad "crashed: the test hook did not exit"
unset FP8PIPE_TEST_CRASH_IN_SAVE
{ [ -e crashed/step_00000008/rank_00000.safetensors ] && [ ! -e crashed/step_00000008/COMMITTED ]; } ||
  bad "crashed: expected an uncommitted step_00000008 with its shard written"
[ "$(cat crashed/latest)" = step_00000004 ] || bad "crashed: latest moved past step 4"
"$BIN" ckpt verify crashed >crashed.verify 2>&1 || bad "crashed: verify failed: $(cat crashed.verify)"
grep -q "SKIP step_00000008: not committed" crashed.verify || bad "crashed: verify did not skip 8"
train crashed 12 || die "resume after the crash failed: $(cat crashed.log)"
grep -q "resumed from crashed/step_00000004" crashed.log || bad "crashed: did not resume from step 4"
same_as_straight crashed

# 5. A corrupt newest checkpoint is refused by name; --fallback resumes from the previous one.
cp -r stopped corrupt
python3 - <<'EOF'
p = "corrupt/step_00000012/rank_00000.safetensors"
b = bytearray(open(p, "rb").read()); b[len(b) // 2] ^= 1; open(p, "wb").write(b)
EOF
"$BIN" ckpt verify corrupt --step 12 >corrupt.verify 2>&1 && bad "corrupt: verify exit 0"
{ grep -q "FAIL step_00000012" corrupt.verify && grep -q "rank_00000.safetensors: crc32" corrupt.verify; } ||
  bad "corrupt: verify did not name the file: $(cat corrupt.verify)"
train corrupt 12 && bad "corrupt: resumed from a corrupt checkpoint"
{ grep -q "rank_00000.safetensors: crc32 .* manifest says" corrupt.log && grep -q -- "--fallback" corrupt.log; } ||
  bad "corrupt: the error does not name the shard or suggest --fallback: $(tail -5 corrupt.log)"
train corrupt 12 --fallback || die "--fallback resume failed: $(cat corrupt.log)"
grep -q "resumed from corrupt/step_00000008" corrupt.log || bad "corrupt: --fallback did not use step 8"
same_as_straight corrupt

# 6. A checkpoint recorded with another layout is refused unless --reshard (re-slice by name).
cp -r stopped reshard
rm -rf reshard/step_00000012 reshard/latest && echo step_00000008 >reshard/latest
python3 - <<'EOF'
import json, zlib
d = "reshard/step_00000008/"
m = json.load(open(d + "manifest.json"))
m["topology"] = {"pp": 1, "dp": 2, "ep": 1, "world": 2}
text = json.dumps(m, indent=1) + "\n"
open(d + "manifest.json", "w").write(text)
c = {"step": 8, "manifest_bytes": len(text.encode()), "manifest_crc32": zlib.crc32(text.encode())}
open(d + "COMMITTED", "w").write(json.dumps(c) + "\n")
EOF
train reshard 12 && bad "reshard: another layout was accepted without --reshard"
grep -q "pp=1 dp=2 ep=1 world=2; this run is pp=1 dp=1 ep=1 world=1" reshard.log ||
  bad "reshard: no layout message: $(tail -3 reshard.log)"
train reshard 12 --reshard || die "--reshard resume failed: $(cat reshard.log)"
same_as_straight reshard

# 7. Async checkpoint writes (background thread) give the same files and the same resume.
train async 8 --checkpoint.async=true || die "async 8-step run failed: $(cat async.log)"
train async 12 --checkpoint.async=true || die "async resume failed: $(cat async.log)"
grep -q "resumed from async/step_00000008" async.log || bad "async: did not resume from step 8"
same_as_straight async

echo "resume_test: $failed failure(s), ${SECONDS}s"
[ "$failed" = 0 ]
