#!/usr/bin/env bash
# Accuracy of precision.attn_out_cache (FP8.md §7 question 5: is DeepSeek-V3's E5M6 cache, or
# plain E4M3, within the loss of the bf16 cache and of BF16 training?). Trains configs/tiny for
# 300 steps per setting, two runs at a time (CPU), for the preset's attention (4 heads x 16: one
# partial 1x128 group per token) and a wider one (8 heads x 32: two full groups), then prints a
# table: losses at steps 100/200/300, the mean of the last 50 steps and its change against the
# FP8 bf16-cache run and the BF16 run, and the held-out evals.
# Usage: bench/attn_out_cache_accuracy.sh [BUILD_DIR] [OUT_DIR]   (about 20 min on 2 cores)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$root/build}/launch/fp8pipe
out=${2:-$root/runs/attn_out_cache}
mkdir -p "$out"
run() { # name, overrides...
  local name=$1
  shift
  "$bin" train "$root/configs/tiny.textproto" --checkpoint.dir= --checkpoint.every=0 \
    --log.every=50 --log.jsonl="$out/$name.jsonl" "$@" >"$out/$name.log" 2>&1
}
for shape in preset wide; do
  extra=()
  [[ $shape == wide ]] && extra=(--model.heads=8 --model.mla.v_head_dim=32)
  run "${shape}_BF16" --precision.mode=BF16 "${extra[@]}" &
  run "${shape}_bf16" --precision.attn_out_cache=bf16 "${extra[@]}" &
  wait
  run "${shape}_e5m6" --precision.attn_out_cache=e5m6 "${extra[@]}" &
  run "${shape}_e4m3" --precision.attn_out_cache=e4m3 "${extra[@]}" &
  wait
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
def load(name):
    rows = [json.loads(l) for l in open(f"{out}/{name}.jsonl")]
    loss = {r["step"]: r["loss"] for r in rows}
    evals = {r["step"]: r["eval_loss"] for r in rows if r.get("eval_loss", -1) >= 0}
    last = max(loss)
    tail = sum(loss[s] for s in range(last - 49, last + 1)) / 50
    return loss, evals, tail, max(r["tensor_gib"] for r in rows)
for shape in ("preset", "wide"):
    runs = {k: load(f"{shape}_{k}") for k in ("BF16", "bf16", "e5m6", "e4m3")}
    print(f"\n{shape}: | BF16 training | FP8, bf16 cache | FP8, e5m6 | FP8, e4m3 |")
    print("|---|---|---|---|---|")
    row = lambda f: "| " + " | ".join(f(runs[k]) for k in ("BF16", "bf16", "e5m6", "e4m3")) + " |"
    print("| loss 100/200/300 " + row(lambda r: " / ".join(f"{r[0][s]:.4f}" for s in (100, 200, 300))))
    print("| mean of last 50 " + row(lambda r: f"{r[2]:.5f}"))
    base, bf = runs["bf16"][2], runs["BF16"][2]
    print("| vs FP8 bf16 cache " + row(lambda r: f"{100 * (r[2] / base - 1):+.3f}%"))
    print("| vs BF16 training " + row(lambda r: f"{100 * (r[2] / bf - 1):+.3f}%"))
    print("| eval 100/200/300 " + row(lambda r: " / ".join(f"{r[1][s]:.4f}" for s in sorted(r[1]))))
    print("| peak tensor GiB " + row(lambda r: f"{r[3]:.5f}"))
PY
