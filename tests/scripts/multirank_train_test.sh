#!/usr/bin/env bash
# Multi-rank training under real mpirun against the single-process run of the same global batch:
# per-step losses and gradient norms of 1f1b, zb1p, dualpipe and dualpipev layouts (pp=2, pp=4,
# pp=2 x dp=2, with expert parallelism ep=2: flat, two-level over two 1-rank nodes, and pp=4 x
# dp=2 x ep=2 on two emulated 4-rank nodes) must match within 1e-5 relative, in FP32 and FP8 (the
# ep layouts with fp32 combine rows: precision.bf16_combine=false). The default bf16 combine
# must stay close to that and send fewer bytes. A batch ramp on pp=2 x dp=2 layouts must match its
# one-process run. Runs started from a sharded checkpoint of another layout (checkpoint.init_from)
# must train alike on one process and on pp=2 x dp=2. Then bad layouts must fail on every rank
# with one clear message and a non-zero exit, without hanging.
# Usage: multirank_train_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/test_lib.sh"  # test_init, ok, bad, test_summary
test_init "$@"
COMMON=(--train.steps=4 --log.every=1 --checkpoint.dir= --checkpoint.every=0 --train.eval_every=0
        --optim.warmup_steps=1 --train.seq_len=16)

run() {  # run NAME NP [overrides...]
  local name=$1 np=$2; shift 2
  timeout 300 mpirun -np "$np" "$BIN" train "$SRC/configs/tiny.textproto" "${COMMON[@]}" \
    --log.jsonl="$TMP/$name.r{rank}.jsonl" "$@" >"$TMP/$name.log" 2>&1
}

compare() {  # compare REF NAME [TOL]: rank-0 JSONL loss and grad_norm per step, relative TOL
  python3 - "$TMP/$1.r0.jsonl" "$TMP/$2.r0.jsonl" "${3:-1e-5}" <<'PY'
import json, sys
def load(p):
    return [json.loads(l) for l in open(p) if l.strip().startswith('{"step"')]
a, b, tol = load(sys.argv[1]), load(sys.argv[2]), float(sys.argv[3])
assert len(a) == len(b) == 4, (len(a), len(b))
for x, y in zip(a, b):
    for k in ("loss", "grad_norm", "mtp_loss"):
        rel = abs(x[k] - y[k]) / max(abs(x[k]), 1e-30)
        assert rel <= tol, f"step {x['step']} {k}: {x[k]} vs {y[k]} (rel {rel:.2e})"
PY
}

for mode in FP32 FP8; do
  # References: the same global batch on one process, with the same micro-batch size as each
  # layout (dp=2 splits each replica's 8 micro-batches of 2 rows; one process then runs 16).
  run "single_$mode" 1 --precision.mode=$mode || { bad "single $mode run"; cat "$TMP/single_$mode.log"; continue; }
  run "single16_$mode" 1 --precision.mode=$mode --parallel.microbatches=16 ||
    { bad "single $mode run (16 micro-batches)"; continue; }
  for layout in "2 1f1b --parallel.pp=2" "2 zb1p --parallel.pp=2" "4 dualpipe --parallel.pp=4" \
                "4 dualpipev --parallel.pp=2 --parallel.dp=2" "4 dualpipe --parallel.pp=2 --parallel.dp=2" \
                "4 dualpipe --parallel.pp=2 --parallel.dp=2 --parallel.ep=2" \
                "4 1f1b --parallel.pp=2 --parallel.dp=2 --parallel.ep=2 --parallel.ranks_per_node=1 --parallel.ep_dispatch=two_level" \
                "8 dualpipe --parallel.pp=4 --parallel.dp=2 --parallel.ep=2 --parallel.ranks_per_node=4"; do
    set -- $layout; np=$1; kind=$2; shift 2
    case "$*" in *ep=2*) set -- "$@" --precision.bf16_combine=false ;; esac
    name="${mode}_${kind}_np${np}_$(echo "$@" | tr -dc 'a-z0-9')"
    ref="single_$mode"
    case "$*" in *dp=2*) ref="single16_$mode" ;; esac
    if run "$name" "$np" --precision.mode=$mode --parallel.schedule=$kind "$@" && \
       compare "$ref" "$name" >"$TMP/$name.cmp" 2>&1; then
      ok "$mode $kind np=$np $*"
    else
      bad "$mode $kind np=$np $*"; tail -5 "$TMP/$name.log" "$TMP/$name.cmp" 2>/dev/null
    fi
  done
done

# The default bf16 combine (bf16 rows back from the experts, both passes): FP8 pp=2 x dp=2 x ep=2
# stays within 1e-3 relative of the fp32-row run above in loss and MTP loss and within 3e-2 in
# gradient norm over the 4 steps (tiny FP8 runs are that noisy: FP8 itself departs from FP32 by
# about 3e-4 and 1e-2 here; EpWire.EachLegCarriesItsFormat compares the two in one step), and each
# rank's all-to-all bytes per step are the fp32 rows' times (2 x 1.03 + 2 x 2) / (2 x 1.03 +
# 2 x 4) = 0.602 (FP8 toward the experts in both passes, 1.03 bytes an element; 2 bytes instead
# of 4 back), within 0.05: the two runs route tokens differently once their weights differ,
# and a step's bytes vary by 5% with the routing (EpWire checks each leg's bytes exactly).
wide="FP8_dualpipe_np4_parallelpp2paralleldp2parallelep2precisionbf16combinefalse"
if run bf16_combine 4 --parallel.pp=2 --parallel.dp=2 --parallel.ep=2 --parallel.schedule=dualpipe &&
   python3 - "$TMP/single16_FP32.r0.jsonl" "$TMP/$wide.r0.jsonl" "$TMP/bf16_combine.r0.jsonl" \
     >"$TMP/bf16_combine.cmp" 2>&1 <<'PY'
import json, sys
def load(p):
    return [json.loads(l) for l in open(p) if l.startswith('{"step"')]
fp32, wide, narrow = (load(p) for p in sys.argv[1:4])
assert len(fp32) == len(wide) == len(narrow) == 4
def worst(a, b, k):
    return max(abs(x[k] - y[k]) / abs(x[k]) for x, y in zip(a, b))
for k, tol in (("loss", 1e-3), ("mtp_loss", 1e-3), ("grad_norm", 3e-2)):
    w, m = worst(wide, narrow, k), worst(fp32, wide, k)
    print(f"{k}: bf16 combine {w:.2e} (tolerance {tol:g}); FP8 vs FP32 {m:.2e}")
    assert 0 < w < tol, k
for w, n in zip((r["a2a_bytes"] for r in wide), (r["a2a_bytes"] for r in narrow)):
    assert w > 0 and abs(n / w - 6.0625 / 10.0625) < 0.05, (w, n)
    print(f"a2a bytes {n} / {w} = {n / w:.3f}")
PY
then ok "FP8 ep=2 bf16 combine: within 1e-3 (loss) and 3e-2 (gradient norm), 0.60 of the a2a bytes"
else bad "FP8 ep=2 bf16 combine: within 1e-3 (loss) and 3e-2 (gradient norm), 0.60 of the a2a bytes"; fi
cat "$TMP/bf16_combine.cmp"

# The simulator's EP traffic model (parallel/sim/cost_model.cc: a row once per rank its experts
# reach, uniform node-limited routing) against the bytes those two runs sent: the simulated bytes
# per GPU per step within 15% of the measured mean over ranks and steps, for fp32 and bf16
# combine rows. (The cluster figures only set speeds; bytes do not depend on them.)
CLUSTER=(--cluster.gpus_per_node=8 --cluster.peak_fp8_tflops=1979 --cluster.peak_bf16_tflops=989
         --cluster.hbm_gbps=3350 --cluster.nvlink_gbps=160 --cluster.net_gbps_per_gpu=40
         --cluster.total_sms=132)
for combine in false true; do
  if [ $combine = false ]; then name=$wide; else name=bf16_combine; fi
  sim=$("$BIN" simulate "$SRC/configs/tiny.textproto" --train.seq_len=16 --parallel.pp=2 \
          --parallel.dp=2 --parallel.ep=2 --parallel.schedule=dualpipe \
          --precision.bf16_combine=$combine "${CLUSTER[@]}" 2>&1 |
        sed -n 's/^ep a2a *\([0-9.e+]*\) bytes.*/\1/p')
  if python3 - "$sim" "$TMP/$name".r*.jsonl <<'PY'
import json, sys
sim = float(sys.argv[1])
got = [json.loads(l)["a2a_bytes"] for p in sys.argv[2:] for l in open(p) if l.startswith('{"step"')]
mean = sum(got) / len(got)
print(f"simulated {sim:.4g} bytes/GPU/step, measured mean {mean:.4g} over {len(got)} rank-steps: "
      f"{sim / mean - 1:+.1%}")
assert len(got) == 16 and abs(sim / mean - 1) <= 0.15
PY
  then ok "simulated EP bytes within 15% of the measured (bf16_combine=$combine)"
  else bad "simulated EP bytes within 15% of the measured (bf16_combine=$combine): sim '$sim'"; fi
done

# log.trace: one Chrome-trace JSON per rank for step 2, with compute ops and comm waits.
if run trace 4 --parallel.pp=4 --parallel.schedule=dualpipe --log.trace="$TMP/trace_r{rank}.json" &&
   python3 - "$TMP" <<'PY'
import json, sys
for r in range(4):
    ev = json.load(open(f"{sys.argv[1]}/trace_r{r}.json"))["traceEvents"]
    x = [e for e in ev if e.get("ph") == "X"]
    assert all(e["pid"] == r and e["args"]["step"] == 2 and e["dur"] >= 0 for e in x), r
    assert any(e["tid"] == 0 and e["name"].startswith(("F", "B", "W")) for e in x), r  # compute
    assert any(e["tid"] == 1 and e["name"].startswith("R<") for e in x), r              # comm waits
PY
then ok "per-rank Chrome traces"; else bad "per-rank Chrome traces"; fi

# DualPipe with ep=2 (parallel.fb_overlap on by default): every MoE all-to-all is an "a2a" phase
# from post to completion on a row per model chunk, compute slices are "compute" phases (B/E
# pairs: readers of the X/i instruction events are unaffected), and on every rank the
# all-to-alls inside FB instructions overlap the OTHER chunk's compute (bench/a2a_overlap.py;
# zero by construction when FB runs its halves one after the other).
if run trace_ep 4 --parallel.pp=2 --parallel.dp=2 --parallel.ep=2 --parallel.schedule=dualpipe \
     --train.steps=2 --log.trace="$TMP/ep_trace_r{rank}.json" &&
   python3 - "$TMP" <<'PY' && python3 "$SRC/bench/a2a_overlap.py" --min-fb-cross 0 "$TMP"/ep_trace_r*.json
import json, sys
for r in range(4):
    ev = json.load(open(f"{sys.argv[1]}/ep_trace_r{r}.json"))["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in ev if e.get("name") == "thread_name"}
    assert names[0] == "compute" and names[1] == "comm", names
    cats = {e.get("cat") for e in ev if e.get("ph") in ("B", "E")}
    assert cats == {"compute", "a2a"}, (r, cats)
    assert any(names[e["tid"]].startswith("a2a d") for e in ev if e.get("cat") == "a2a"), r
    x = [e for e in ev if e.get("ph") == "X"]
    assert any(e["name"].startswith("FB") for e in x), r
    assert sum(e.get("ph") == "B" for e in ev) == sum(e.get("ph") == "E" for e in ev), r
PY
then ok "DualPipe ep=2 trace: all-to-alls overlap compute in FB"
else bad "DualPipe ep=2 trace: all-to-alls overlap compute in FB"; fi

# A batch ramp (train.batch_ramp) on pipelines: 16 -> 32 sequences by 8 over 48 sequences of 16
# tokens gives steps of 16, 16, 24 and 32 sequences (Megatron's rule). Each pp=2 x dp=2 layout
# runs them as 4, 4, 6 and 8 micro-batches of 2 per pipeline, each step with its own instruction
# list, and must match the one-process run of the same ramp within 1e-5 (FP32).
RAMP=(--precision.mode=FP32 --train.batch_ramp.start=16 --train.batch_ramp.increment=8
      --train.batch_ramp.tokens=768)
if run ramp_single 1 "${RAMP[@]}" --parallel.microbatches=16 &&
   python3 - "$TMP/ramp_single.r0.jsonl" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{"step"')]
assert [s["batch"] for s in steps] == [16, 16, 24, 32], [s["batch"] for s in steps]
assert [s["tokens"] for s in steps] == [256, 512, 896, 1408], [s["tokens"] for s in steps]
PY
then
  ok "ramp on one process: batches 16, 16, 24, 32"
  for layout in "dualpipev --parallel.pp=2 --parallel.dp=2" \
                "dualpipe --parallel.pp=2 --parallel.dp=2 --parallel.ep=2 --precision.bf16_combine=false"; do
    set -- $layout; kind=$1; shift
    name="ramp_${kind}_$(echo "$@" | tr -dc 'a-z0-9')"
    if run "$name" 4 "${RAMP[@]}" --parallel.schedule=$kind "$@" &&
       compare ramp_single "$name" >"$TMP/$name.cmp" 2>&1; then
      ok "ramp $kind $*: matches one process"
    else
      bad "ramp $kind $*"; tail -5 "$TMP/$name.log" "$TMP/$name.cmp" 2>/dev/null
    fi
  done
else
  bad "ramp on one process"; tail -5 "$TMP/ramp_single.log"
fi

# checkpoint.init_from across layouts: a 4-rank dualpipe pp=2 x dp=2 x ep=2 run writes a sharded
# checkpoint; a one-process run and a 4-rank dualpipev run both start from it (re-sliced by global
# name, fresh optimizer, step 0) and must then train alike within 1e-5 (FP32, fp32 combine).
INIT=(--precision.mode=FP32 --precision.bf16_combine=false --parallel.microbatches=8)
if run init_src 4 "${INIT[@]}" --parallel.schedule=dualpipe --parallel.pp=2 --parallel.dp=2 \
     --parallel.ep=2 --checkpoint.dir="$TMP/init_src" &&
   run init_single 1 "${INIT[@]}" --checkpoint.init_from="$TMP/init_src" &&
   grep -q "initialized the weights from $TMP/init_src/step_00000004" "$TMP/init_single.log" &&
   run init_dualpipev 4 "${INIT[@]}" --parallel.schedule=dualpipev --parallel.pp=2 \
     --parallel.dp=2 --checkpoint.init_from="$TMP/init_src" &&
   grep -q "initialized the weights from $TMP/init_src/step_00000004" "$TMP/init_dualpipev.log" &&
   compare init_single init_dualpipev >"$TMP/init.cmp" 2>&1 &&
   python3 - "$TMP/init_src.r0.jsonl" "$TMP/init_single.r0.jsonl" <<'PY'; then
import json, sys
src, init = ([json.loads(l) for l in open(p) if l.startswith('{"step"')] for p in sys.argv[1:])
# the loaded weights, not the seed's random init (which both layouts share): the first step
# starts from the source's 4 trained steps
assert init[0]["loss"] < src[0]["loss"] - 0.05, (init[0]["loss"], src[0]["loss"])
PY
  ok "init_from a sharded 4-rank checkpoint: one process and dualpipev pp=2 x dp=2 train alike"
else
  bad "init_from across layouts"; tail -5 "$TMP"/init_*.log "$TMP/init.cmp" 2>/dev/null
fi
# The same weights through a Hugging Face folder (fp32 export: exact), read by every rank of a
# pp=2 x dp=2 x ep=2 dualpipe layout for the tensors it holds: trains as the one process did.
if "$BIN" ckpt export "$TMP/init_src" "$TMP/init_hf" --format hf --dtype fp32 >/dev/null &&
   run init_hf_ep 4 "${INIT[@]}" --parallel.schedule=dualpipe --parallel.pp=2 --parallel.dp=2 \
     --parallel.ep=2 --checkpoint.init_from="$TMP/init_hf" &&
   grep -q "from the Hugging Face folder" "$TMP/init_hf_ep.log" &&
   compare init_single init_hf_ep >"$TMP/init_hf.cmp" 2>&1; then
  ok "init_from a Hugging Face folder on pp=2 x dp=2 x ep=2: trains as one process from the checkpoint"
else
  bad "init_from a Hugging Face folder"; tail -5 "$TMP/init_hf_ep.log" "$TMP/init_hf.cmp" 2>/dev/null
fi

expect_fail() {  # expect_fail DESCRIPTION NP PATTERN [overrides...]
  local what=$1 np=$2 pat=$3; shift 3
  local start=$SECONDS
  timeout 120 mpirun -np "$np" "$BIN" train "$SRC/configs/tiny.textproto" "${COMMON[@]}" "$@" \
    >"$TMP/err.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q -- "$pat" "$TMP/err.log"; then
    ok "$what fails cleanly (rc $rc, $((SECONDS - start)) s)"
  else
    bad "$what (rc $rc)"; tail -5 "$TMP/err.log"
  fi
}
expect_fail "dp not divisible by ep" 3 "parallel.dp=3 must be divisible by parallel.ep=2" \
  --parallel.dp=3 --parallel.ep=2 --train.global_batch=48
expect_fail "odd pp for dualpipe" 3 "must be even for schedule dualpipe" \
  --parallel.pp=3 --parallel.schedule=dualpipe --parallel.microbatches=6 --train.global_batch=36
expect_fail "too few micro-batches" 4 "parallel.microbatches=4 must be >= 2" \
  --parallel.pp=4 --parallel.schedule=dualpipe --parallel.microbatches=4
expect_fail "world size mismatch" 3 "parallel.pp" --parallel.pp=2

test_summary
