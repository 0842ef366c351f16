#!/usr/bin/env bash
# A NaN injected into ONE rank's gradient (FP8PIPE_TEST_NAN_GRAD=RANK:STEP, launch/fault_inject.h)
# is caught on every rank (pp=2 x dp=2, four processes: the global gradient norm is summed over
# all ranks):
#  1. fault.on_nonfinite=halt (default): every rank logs the non-finite step, none records it, the
#     job exits non-zero;
#  2. fault.on_nonfinite=skip: the run completes; every rank's JSONL counts the skipped step
#     ("skipped" 0, 1, 1) and shows the non-finite norm; the parameters are unchanged by the
#     skipped step: the held-out loss after it equals the one before it, to the last printed digit,
#     while in the same run without the NaN that step changes it; the training losses up to the
#     poisoned step equal the clean run's; on one process (where the model can be saved) every
#     parameter and router bias after the skipped step is bitwise the one before it, with the
#     optimizer on the host and on the backend (optim.placement=device: the NaN goes into the
#     backend's fp64 sum);
#  3. skip with fault.max_skips=0 halts like 1; a malformed FP8PIPE_TEST_NAN_GRAD is refused.
# Usage: fault_nan_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"  # test_init, ok, bad, test_summary
test_init "$@"
NP=4
ARGS=(--train.steps=3 --log.every=1 --checkpoint.dir= --checkpoint.every=0 --optim.warmup_steps=1
      --train.seq_len=16 --parallel.pp=2 --parallel.dp=2 --parallel.schedule=1f1b
      --train.eval_every=1 --train.eval_batches=1 --fault.timeout_s=60)

run() {  # run NAME NAN_SPEC [overrides...]: sets RC
  local name=$1 spec=$2; shift 2
  FP8PIPE_TEST_NAN_GRAD=$spec timeout -k 5 30 mpirun -np $NP -x FP8PIPE_TEST_NAN_GRAD "$BIN" train \
    "$SRC/configs/tiny.textproto" "${ARGS[@]}" --log.jsonl="$TMP/$name.r{rank}.jsonl" "$@" \
    >"$TMP/$name.log" 2>&1
  RC=$?
}
all_ranks_log() {  # all_ranks_log LOG PATTERN: every rank r logs a line "[fp8pipe rR ...] PATTERN"
  local r
  for r in $(seq 0 $((NP - 1))); do grep -Eq "^\[fp8pipe r$r [^]]*\] .*$2" "$1" || return 1; done
}
steps_logged() { if [ -f "$1" ]; then awk '/^\{"step"/ { n++ } END { print n + 0 }' "$1"; else echo 0; fi; }
halted() {  # halted NAME STEP PATTERN: non-zero exit, every rank reports, no rank recorded STEP
  local r
  [ $RC -ne 0 ] && [ $RC -ne 124 ] && all_ranks_log "$TMP/$1.log" "$3" || return 1
  for r in $(seq 0 $((NP - 1))); do [ "$(steps_logged "$TMP/$1.r$r.jsonl")" -eq $(($2 - 1)) ] || return 1; done
}

# 1. halt: NaN on rank 3 (last stage of the second replica) at step 2.
run halt 3:2
if halted halt 2 "step 2: non-finite loss \(.*\) or gradient norm \(nan\); fault.on_nonfinite=halt" &&
   grep -Eq "^\[fp8pipe r3 .*FP8PIPE_TEST_NAN_GRAD: injected NaN into the gradient of .* at step 2" \
     "$TMP/halt.log"; then
  ok "halt: NaN in rank 3's gradient at step 2 reported by all $NP ranks, exit $RC"
else
  bad "halt (rc $RC)"; grep -E "non-finite|NAN" "$TMP/halt.log" | cut -c1-200; tail -3 "$TMP/halt.log"
fi

# 2. skip: NaN on rank 0 (first stage of the first replica) at step 2, against the clean run.
run clean ""
run skip 0:2 --fault.on_nonfinite=skip
if [ $RC -eq 0 ] && python3 - "$TMP" $NP >"$TMP/skip.cmp" 2>&1 <<'PY'
import json, math, re, sys
tmp, np_ = sys.argv[1], int(sys.argv[2])
def load(name, r):
    out = []
    for line in open(f"{tmp}/{name}.r{r}.jsonl"):
        if line.startswith('{"step"'):  # strict JSON: non-finite values are null
            out.append(json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(
                ValueError(f"{name}.r{r}.jsonl: non-JSON constant {c}"))))
    return out
for r in range(np_):
    s, c = load("skip", r), load("clean", r)
    assert [x["step"] for x in s] == [1, 2, 3] and len(c) == 3, (r, s, c)
    assert [x["skipped"] for x in s] == [0, 1, 1], (r, [x["skipped"] for x in s])
    assert [x["skipped"] for x in c] == [0, 0, 0], (r, [x["skipped"] for x in c])
    assert s[1]["grad_norm"] is None, (r, s[1]["grad_norm"])  # NaN, written as null
    assert math.isfinite(s[2]["grad_norm"]), (r, s[2]["grad_norm"])
    for k in ("loss", "grad_norm", "eval_loss"):  # step 1 is untouched by the injection
        assert s[0][k] == c[0][k], (r, k, s[0][k], c[0][k])
    assert s[1]["loss"] == c[1]["loss"], (r, s[1]["loss"], c[1]["loss"])  # forward before the NaN
    # the skipped step left the parameters (and router biases) as they were ...
    assert s[1]["eval_loss"] == s[0]["eval_loss"], (r, s[0]["eval_loss"], s[1]["eval_loss"])
    # ... while applying it changes the held-out loss, so the check above can fail
    assert c[1]["eval_loss"] != c[0]["eval_loss"], (r, c[0]["eval_loss"], c[1]["eval_loss"])
    assert s[2]["eval_loss"] != s[1]["eval_loss"], (r, "step 3 not applied")
print("eval losses (skip run):", [x["eval_loss"] for x in load("skip", 0)])
PY
then
  ok "skip: step 2 skipped on all $NP ranks, parameters unchanged by it ($(grep -o 'eval losses.*' "$TMP/skip.cmp"))"
else
  bad "skip (rc $RC)"; tail -5 "$TMP/skip.cmp"; tail -3 "$TMP/skip.log"
fi

# 2b. The same on one process, where the model can be saved: after the skipped step 2 every
# parameter and router bias is bitwise the one after step 1, while the clean step 2 changes them.
ONE=("$SRC/configs/tiny.textproto" --log.every=1 --checkpoint.dir= --checkpoint.every=0
     --train.eval_every=0 --optim.warmup_steps=1 --optim.schedule=constant --train.seq_len=16)
one() {  # one NAME [overrides...]: a single-process run saving its model
  local name=$1; shift
  timeout -k 5 30 mpirun -np 1 -x FP8PIPE_TEST_NAN_GRAD "$BIN" train "${ONE[@]}" "$@" \
    --save "$TMP/one_$name.safetensors" >>"$TMP/one.log" 2>&1
}
for place in host device; do  # the fp64 sums in host vectors, or in backend tensors
: >"$TMP/one.log"
P=--optim.placement=$place
FP8PIPE_TEST_NAN_GRAD= one step1 --train.steps=1 $P && FP8PIPE_TEST_NAN_GRAD= one clean2 --train.steps=2 $P &&
  FP8PIPE_TEST_NAN_GRAD=0:2 one skip2 --train.steps=2 --fault.on_nonfinite=skip $P
RC=$?
if [ $RC -eq 0 ] && grep -q "injected NaN" "$TMP/one.log" && python3 - "$TMP" >"$TMP/one.cmp" 2>&1 <<'PY'
import json, struct, sys
def tensors(path):  # name -> raw bytes (the safetensors layout: u64 header size, JSON, data)
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    return {k: b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]
            for k, v in h.items() if k != "__metadata__"}
one, skip, clean = (tensors(f"{sys.argv[1]}/one_{x}.safetensors") for x in ("step1", "skip2", "clean2"))
assert one.keys() == skip.keys() == clean.keys() and any("bias" in k for k in one), sorted(one)
changed = [k for k in one if one[k] != skip[k]]
assert not changed, f"the skipped step changed {changed}"
assert sum(one[k] != clean[k] for k in one) > len(one) // 2, "the clean step 2 changed too little"
print(f"{len(one)} tensors")
PY
then
  ok "skip on one process, optim.placement=$place: all $(grep -o '[0-9]* tensors' "$TMP/one.cmp") bitwise unchanged by the skipped step"
else
  bad "skip on one process, optim.placement=$place (rc $RC)"; tail -5 "$TMP/one.cmp" "$TMP/one.log" 2>/dev/null
fi
done

# 3. The skip cap, and a malformed hook.
run cap 1:2 --fault.on_nonfinite=skip --fault.max_skips=0
if halted cap 2 "step 2: non-finite .*fault.on_nonfinite=skip, 0 steps skipped of fault.max_skips=0"; then
  ok "skip with fault.max_skips=0 halts on all $NP ranks, exit $RC"
else
  bad "skip cap (rc $RC)"; tail -3 "$TMP/cap.log"
fi
run malformed 1-2
if [ $RC -ne 0 ] && [ $RC -ne 124 ] && grep -q "FP8PIPE_TEST_NAN_GRAD='1-2': expected RANK:STEP" \
     "$TMP/malformed.log"; then
  ok "malformed FP8PIPE_TEST_NAN_GRAD refused"
else
  bad "malformed FP8PIPE_TEST_NAN_GRAD (rc $RC)"; tail -3 "$TMP/malformed.log"
fi

test_summary
