#!/usr/bin/env bash
# End-to-end test of `fp8pipe generate`: a tiny model trains for a few steps on byte-level text
# (prepare-data) and saves its model; generate then reads it back and
#  - prints the prompt followed by --max-new-tokens byte tokens (or fewer, ending at the
#    end-of-document id), the same text on every greedy run, from --prompt or --prompt-file;
#  - decodes several --prompt together, each sequence giving the text it gets alone;
#  - with --speculative mtp (MTP depth 1 drafts, verified by the main model) prints the same text
#    as plain greedy decoding and reports its drafts and acceptances; sampled, it repeats for a
#    seed;
#  - in FP32, the latent cache (MLA's absorbed form) and the per-head cache give the same text;
#  - sampling is reproducible for a seed and changes with it;
#  - bad options are refused naming the option, its value and the valid choices.
# Usage (CTest): bash generate_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail
# shellcheck source=tests/scripts/test_lib.sh
source "$(dirname "$0")/test_lib.sh"
test_init "$@"

python3 - "$TMP/corpus.txt" <<'PY' || { echo "FAIL: could not write the corpus"; exit 1; }
import random, sys
random.seed(5)
words = ["pipeline", "expert", "token", "scale", "block", "rank", "stage", "layer"]
with open(sys.argv[1], "w") as f:
    for _ in range(3000):
        f.write(" ".join(random.choice(words) for _ in range(8)) + ".\n")
PY
"$BIN" prepare-data "$TMP/data" "$TMP/corpus.txt" --format megatron >"$TMP/prep.out" 2>&1 ||
  bad "prepare-data: $(cat "$TMP/prep.out")"

cfg=("$SRC/configs/tiny.textproto" --data.source=megatron "--data.path=$TMP/data"
  --model.vocab_size=257 --train.seq_len=32)
for mode in FP8 FP32; do
  if "$BIN" train "${cfg[@]}" "--precision.mode=$mode" --train.steps=20 --optim.warmup_steps=1 \
    --train.eval_every=0 --checkpoint.every=0 --checkpoint.dir= --save "$TMP/$mode.safetensors" \
    >"$TMP/train_$mode.out" 2>&1; then
    ok "train $mode 20 steps and save"
  else
    bad "train $mode: $(tail -5 "$TMP/train_$mode.out")"
  fi
done

gen() {  # gen NAME MODE ARGS...: stdout to $TMP/NAME.txt, log to $TMP/NAME.log
  local name=$1 mode=$2
  shift 2
  "$BIN" generate "${cfg[@]}" "--precision.mode=$mode" --checkpoint "$TMP/$mode.safetensors" \
    "${PROMPT[@]}" "$@" >"$TMP/$name.txt" 2>"$TMP/$name.log"
}
PROMPT=(--prompt "stage rank ")

gen greedy FP8 --max-new-tokens 64 || bad "greedy: $(tail -3 "$TMP/greedy.log")"
printf 'stage rank ' >"$TMP/prompt.txt"
PROMPT=(--prompt-file "$TMP/prompt.txt")
gen greedy2 FP8 --max-new-tokens 64 ||
  bad "greedy again (--prompt-file): $(tail -3 "$TMP/greedy2.log")"
PROMPT=(--prompt "stage rank ")
text=$(cat "$TMP/greedy.txt")
case "$text" in
  "stage rank "*) ok "the output starts with the prompt" ;;
  *) bad "output does not start with the prompt: '$text'" ;;
esac
# the prompt (11 bytes) plus 64 one-byte tokens (the corpus is ASCII; fewer if it ended)
n=$(($(head -c -1 "$TMP/greedy.txt" | wc -c) - 11))
if [ "$n" -ge 1 ] && [ "$n" -le 64 ] && grep -q "generated $n tokens" "$TMP/greedy.log"; then
  ok "$n new tokens printed and reported"
else
  bad "$n new bytes; log: $(grep generated "$TMP/greedy.log")"
fi
cmp -s "$TMP/greedy.txt" "$TMP/greedy2.txt" && ok "greedy decoding repeats (prompt from a file)" ||
  bad "two greedy runs differ"
# 11 + 64 positions past train.seq_len 32: a warning says so
grep -q "past the 32 the model trained on" "$TMP/greedy.log" && ok "warns past train.seq_len" ||
  bad "no warning past train.seq_len: $(grep -i warn "$TMP/greedy.log")"

# a batch: --prompt twice, each sequence printed under a header, each the text it gets alone
PROMPT=(--prompt "expert " --prompt "stage rank ")
gen batch FP8 --max-new-tokens 64 || bad "batch: $(tail -3 "$TMP/batch.log")"
PROMPT=(--prompt "expert ")
gen alone FP8 --max-new-tokens 64 || bad "expert alone"
PROMPT=(--prompt "stage rank ")
python3 - "$TMP" <<'PY' && ok "a batch of 2 prompts: each sequence's text as alone" || bad "batch text"
import sys
t = sys.argv[1]
out = open(f"{t}/batch.txt").read()
parts = out.split("--- sequence 1 ---\n")
assert parts[0].startswith("--- sequence 0 ---\n"), out[:80]
assert parts[0][len("--- sequence 0 ---\n"):] == open(f"{t}/alone.txt").read(), parts[0]
assert parts[1] == open(f"{t}/greedy.txt").read(), parts[1]
PY
grep -q "in 2 sequence(s)" "$TMP/batch.log" || bad "batch log: $(grep generated "$TMP/batch.log")"

gen spec FP8 --max-new-tokens 64 --speculative mtp || bad "speculative: $(tail -3 "$TMP/spec.log")"
cmp -s "$TMP/greedy.txt" "$TMP/spec.txt" && ok "MTP speculative decoding gives greedy's text" ||
  bad "speculative text differs: '$(cat "$TMP/spec.txt")' vs '$text'"
if grep -Eq "MTP drafts accepted [0-9]+ of [1-9][0-9]* \([0-9.]+%\)" "$TMP/spec.log"; then
  ok "speculative run reports $(grep -Eo "accepted [0-9]+ of [0-9]+" "$TMP/spec.log")"
else
  bad "no acceptance line: $(grep generated "$TMP/spec.log")"
fi

gen latent32 FP32 --max-new-tokens 48 --kv-cache latent || bad "latent FP32"
gen heads32 FP32 --max-new-tokens 48 --kv-cache heads || bad "heads FP32"
cmp -s "$TMP/latent32.txt" "$TMP/heads32.txt" && ok "FP32: latent and per-head caches agree" ||
  bad "FP32 caches differ: '$(cat "$TMP/latent32.txt")' vs '$(cat "$TMP/heads32.txt")'"
grep -q "cache 640 B a position (latent cache, fp32)" "$TMP/latent32.log" &&
  grep -q "cache 2560 B a position (heads cache, fp32)" "$TMP/heads32.log" &&
  ok "latent cache: 640 B a position (4 layers x (32 + 8) floats), heads: 2560 (x 4 heads x 40)" ||
  bad "cache sizes: $(grep -ho "cache [0-9]* B.*" "$TMP/latent32.log" "$TMP/heads32.log")"

# FP8 caches bf16 by default (half the bytes); FP32 can ask for it, and greedy text then moves
# by bf16 rounding at most
grep -q "cache 320 B a position (latent cache, bf16)" "$TMP/greedy.log" &&
  ok "FP8: a bf16 latent cache, 320 B a position" ||
  bad "FP8 cache: $(grep -o "cache [0-9]* B.*" "$TMP/greedy.log")"
gen latent32b FP32 --max-new-tokens 48 --kv-cache-dtype bf16 || bad "latent FP32 bf16 cache"
grep -q "cache 320 B a position (latent cache, bf16)" "$TMP/latent32b.log" &&
  ok "FP32 with --kv-cache-dtype bf16: 320 B a position" ||
  bad "bf16 cache: $(grep -o "cache [0-9]* B.*" "$TMP/latent32b.log")"

gen s1 FP8 --max-new-tokens 40 --temperature 1.0 --seed 1 || bad "sample seed 1"
gen s1b FP8 --max-new-tokens 40 --temperature 1.0 --seed 1 || bad "sample seed 1 again"
gen s2 FP8 --max-new-tokens 40 --temperature 1.0 --seed 2 || bad "sample seed 2"
cmp -s "$TMP/s1.txt" "$TMP/s1b.txt" && ok "sampling repeats for a seed" || bad "seed 1 twice differs"
cmp -s "$TMP/s1.txt" "$TMP/s2.txt" && bad "seeds 1 and 2 gave the same text" ||
  ok "another seed samples other text"
# speculative sampling (drafts kept by p/q, else a token from the residual) repeats for a seed
gen ss1 FP8 --max-new-tokens 40 --temperature 0.8 --top-p 0.9 --seed 1 --speculative mtp ||
  bad "speculative sampling: $(tail -3 "$TMP/ss1.log")"
gen ss1b FP8 --max-new-tokens 40 --temperature 0.8 --top-p 0.9 --seed 1 --speculative mtp ||
  bad "speculative sampling again"
cmp -s "$TMP/ss1.txt" "$TMP/ss1b.txt" && grep -q "MTP drafts accepted" "$TMP/ss1.log" &&
  ok "speculative sampling repeats for a seed ($(grep -Eo "accepted [0-9]+ of [0-9]+" "$TMP/ss1.log"))" ||
  bad "speculative sampling: $(cat "$TMP/ss1.txt") / $(cat "$TMP/ss1b.txt")"

refuse() {  # refuse PATTERN ARGS...: generate must fail and print PATTERN
  local pat=$1
  shift
  if "$BIN" generate "${cfg[@]}" "$@" >"$TMP/refuse.out" 2>&1; then
    bad "accepted: $*"
  elif grep -q -- "$pat" "$TMP/refuse.out"; then
    ok "refused $* ($pat)"
  else
    bad "refusal of $* does not say '$pat': $(cat "$TMP/refuse.out")"
  fi
}
"$BIN" generate --help >"$TMP/help.out" 2>&1 && grep -q "^usage: fp8pipe generate CONFIG" "$TMP/help.out" &&
  grep -q -- "--kv-cache-dtype" "$TMP/help.out" && ok "generate --help prints its options" ||
  bad "generate --help: $(head -3 "$TMP/help.out")"
# a config of another layout (the run's) runs on one process with pp=dp=ep=1: the same text
gen layout FP8 --max-new-tokens 64 --parallel.pp=2 --parallel.dp=2 --parallel.ep=2 \
  --parallel.schedule=dualpipev || bad "layout: $(tail -3 "$TMP/layout.log")"
cmp -s "$TMP/greedy.txt" "$TMP/layout.txt" && grep -q "becomes pp=1 dp=1 ep=1" "$TMP/layout.log" &&
  ok "a pp=2 dp=2 ep=2 config generates on one process, the same text" ||
  bad "layout: $(cat "$TMP/layout.txt"); $(grep becomes "$TMP/layout.log")"
refuse "needs --checkpoint PATH"
refuse "'beam' is not one of: none, mtp" --checkpoint "$TMP/FP8.safetensors" --speculative beam
refuse "'paged' is not one of: latent, heads" --checkpoint "$TMP/FP8.safetensors" --kv-cache paged
refuse "cannot read --prompt-file" --checkpoint "$TMP/FP8.safetensors" --prompt-file "$TMP/none"
refuse "'fp16' is not one of: auto, fp32, bf16" --checkpoint "$TMP/FP8.safetensors" \
  --kv-cache-dtype fp16
refuse "--top-p 1.5 must be in (0, 1]" --checkpoint "$TMP/FP8.safetensors" --top-p 1.5
refuse "needs an MTP module" --checkpoint "$TMP/FP32.safetensors" --precision.mode=FP32 \
  --model.mtp_depth=0 --speculative=mtp

test_summary
