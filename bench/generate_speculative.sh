#!/usr/bin/env bash
# MTP speculative decoding (DeepSeek-V3 §5.4.3: the second token accepted 85-90% of the time,
# ~1.8x tokens/s) on a model of our own: configs/tiny trained on the repository's documentation
# as byte-level text, then `fp8pipe generate` greedy on a few prompts, plain against
# --speculative mtp, alternating, REPS runs each. Prints per prompt the median decode tokens/s of
# each (and of the per-head cache), their ratio, main-model steps and the drafts' acceptance, and
# checks that both texts are the same; the acceptance of speculative sampling at temperature 0.8
# (one seed a run); and the 4 prompts decoded as one batch against one at a time.
# Usage: bench/generate_speculative.sh [BUILD_DIR] [OUT_DIR]   (STEPS=600: ~10 min on 2 cores)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$root/build}/launch/fp8pipe
out=${2:-$root/runs/generate_speculative}
steps=${STEPS:-600}
reps=${REPS:-3}
new=${NEW_TOKENS:-200}
mkdir -p "$out"
cat "$root"/docs/*.md "$root/README.md" >"$out/corpus.txt"
"$bin" prepare-data "$out/data" "$out/corpus.txt" --format megatron >"$out/prepare.log" 2>&1
cfg=("$root/configs/tiny.textproto" --data.source=megatron "--data.path=$out/data"
  --model.vocab_size=257)
if [[ ! -f $out/model.safetensors ]]; then
  "$bin" train "${cfg[@]}" --train.steps="$steps" --checkpoint.dir= --checkpoint.every=0 \
    --train.eval_every=0 --log.jsonl="$out/train.jsonl" --save "$out/model.safetensors" \
    >"$out/train.log" 2>&1
fi
prompts=("The pipeline " "Each rank " "FP8 GEMMs " "## Checkpoints")
for i in "${!prompts[@]}"; do
  for r in $(seq 1 "$reps"); do
    for mode in plain spec heads sampled; do
      args=()
      [[ $mode == spec ]] && args=(--speculative mtp)
      [[ $mode == heads ]] && args=(--kv-cache heads)
      [[ $mode == sampled ]] && args=(--speculative mtp --temperature 0.8 --seed "$r")
      "$bin" generate "${cfg[@]}" --checkpoint "$out/model.safetensors" --prompt "${prompts[$i]}" \
        --max-new-tokens "$new" "${args[@]}" >"$out/p${i}_${mode}_$r.txt" 2>"$out/p${i}_${mode}_$r.log"
    done
  done
done
# the 4 prompts as one batch (greedy, plain): one forward a step over every sequence's row
batch=()
for p in "${prompts[@]}"; do batch+=(--prompt "$p"); done
for r in $(seq 1 "$reps"); do
  "$bin" generate "${cfg[@]}" --checkpoint "$out/model.safetensors" "${batch[@]}" \
    --max-new-tokens "$new" >"$out/batch_$r.txt" 2>"$out/batch_$r.log"
done
python3 - "$out" "$reps" "${prompts[@]}" <<'PY'
import re, statistics, sys
out, reps, prompts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
pat = re.compile(r"generated (\d+) tokens in \d+ sequence\(s\): .*decode ([\d.]+) s \(([\d.]+) tokens/s, (\d+) main steps\)"
                 r"(?:, MTP drafts accepted (\d+) of (\d+))?")
def runs(i, mode):
    rs = []
    for r in range(1, reps + 1):
        m = pat.search(open(f"{out}/p{i}_{mode}_{r}.log").read())
        rs.append(m.groups())
    return rs
print(f"| prompt | tokens | plain tok/s | MTP tok/s | ratio | heads tok/s | main steps plain / MTP | accepted | same text | sampled T=0.8: accepted |")
print("|---|---|---|---|---|---|---|---|---|---|")
tot_acc = tot_drafted = s_acc = s_drafted = 0
ratios = []
for i, p in enumerate(prompts):
    pl, sp, hd, sa = runs(i, "plain"), runs(i, "spec"), runs(i, "heads"), runs(i, "sampled")
    sacc, sdr = sum(int(r[4]) for r in sa), sum(int(r[5]) for r in sa)
    s_acc += sacc; s_drafted += sdr
    tp = statistics.median(float(r[2]) for r in pl)
    ts = statistics.median(float(r[2]) for r in sp)
    th = statistics.median(float(r[2]) for r in hd)
    acc, drafted = int(sp[0][4]), int(sp[0][5])
    tot_acc += acc; tot_drafted += drafted
    same = open(f"{out}/p{i}_plain_1.txt").read() == open(f"{out}/p{i}_spec_1.txt").read()
    ratios.append(ts / tp)
    print(f"| {p!r} | {pl[0][0]} | {tp:.0f} | {ts:.0f} | {ts / tp:.2f}x | {th:.0f} | {pl[0][3]} / {sp[0][3]} "
          f"| {acc}/{drafted} ({100 * acc / drafted:.1f}%) | {'yes' if same else 'NO'} "
          f"| {sacc}/{sdr} ({100 * sacc / sdr:.1f}%, {reps} seeds) |")
print(f"\nall prompts: {tot_acc}/{tot_drafted} drafts accepted ({100 * tot_acc / tot_drafted:.1f}%), "
      f"median speed-up {statistics.median(ratios):.2f}x; sampled at T=0.8: {s_acc}/{s_drafted} "
      f"({100 * s_acc / s_drafted:.1f}%)")
bt = statistics.median(float(pat.search(open(f"{out}/batch_{r}.log").read()).group(3))
                       for r in range(1, reps + 1))
single = statistics.median(statistics.median(float(r[2]) for r in runs(i, "plain"))
                           for i in range(len(prompts)))
texts = open(f"{out}/batch_1.txt").read()
same_batch = all(f"--- sequence {i} ---\n" + open(f"{out}/p{i}_plain_1.txt").read() in texts
                 for i in range(len(prompts)))
print(f"batch of {len(prompts)} (greedy, plain): {bt:.0f} tokens/s against {single:.0f} for one "
      f"sequence ({bt / single:.2f}x); each sequence's text as alone: {'yes' if same_batch else 'NO'}")
for i, p in enumerate(prompts):
    print(f"\n{p!r} ->", repr(open(f"{out}/p{i}_plain_1.txt").read()[:160]))
PY
