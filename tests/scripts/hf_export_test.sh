#!/usr/bin/env bash
# End-to-end test of `fp8pipe ckpt export --format hf`: trains the tiny config 3 steps with a
# checkpoint, exports it as a DeepseekV3 folder (bf16 single file, fp32 sharded) and checks both
# with check_hf_export.py (schema from config.json, values vs the consolidated fp8pipe export),
# then, where torch and transformers are installed, with check_hf_transformers.py. The run keeps
# a moving average of its weights (optim.ema_decay): `--ema` exports it in both formats.
# Usage (CTest): bash hf_export_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail

BUILD=${1:?usage: $0 BUILD_DIR SOURCE_DIR}
SRC=${2:?usage: $0 BUILD_DIR SOURCE_DIR}
BIN=$BUILD/launch/fp8pipe
CHECK=$SRC/tests/scripts/check_hf_export.py

die() {
  echo "FAIL: $*" >&2
  exit 1
}

[ -x "$BIN" ] || die "$BIN is not built (ninja -C $BUILD fp8pipe)"
command -v python3 >/dev/null || die "python3 not found: run launch/setup.sh"
python3 -c 'import numpy, safetensors' 2>/dev/null ||
  die "python packages missing: pip install -r $SRC/requirements-test.txt (launch/setup.sh does)"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$BIN" train "$SRC/configs/tiny.textproto" --train.steps=3 --optim.warmup_steps=1 \
  --train.eval_every=0 --checkpoint.dir="$TMP/ck" --checkpoint.every=3 --log.jsonl= \
  --optim.ema_decay=0.9 \
  >"$TMP/train.log" 2>&1 || { tail -5 "$TMP/train.log"; die "training the tiny config failed"; }
"$BIN" ckpt export "$TMP/ck" "$TMP/model.safetensors" || die "consolidated export failed"

"$BIN" ckpt export "$TMP/ck" "$TMP/hf_bf16" --format hf --step 3 || die "hf export (bf16) failed"
python3 "$CHECK" "$TMP/hf_bf16" "$TMP/model.safetensors" || die "bf16 folder check"

"$BIN" ckpt export "$TMP/ck" "$TMP/hf_fp32" --format hf --dtype fp32 --max-shard-mb 1 ||
  die "hf export (fp32, sharded) failed"
[ -f "$TMP/hf_fp32/model.safetensors.index.json" ] || die "fp32 export was not sharded"
python3 "$CHECK" "$TMP/hf_fp32" "$TMP/model.safetensors" || die "fp32 sharded folder check"

# DeepSeek-V3's release format (--dtype fp8): Linear weights F8_E4M3 with 128x128 block scales,
# the rest bf16, config.json's quantization_config; read back, it evaluates within 1% (FP32).
"$BIN" ckpt export "$TMP/ck" "$TMP/hf_fp8x" --format hf --dtype fp8 || die "hf export (fp8) failed"
python3 "$CHECK" "$TMP/hf_fp8x" "$TMP/model.safetensors" || die "fp8 folder check"

# The moving average: under the weights' names (router biases as trained), different values,
# and its HF folder holds the same values.
"$BIN" ckpt export "$TMP/ck" "$TMP/ema.safetensors" --ema || die "export --ema failed"
python3 - "$TMP/model.safetensors" "$TMP/ema.safetensors" <<'PY' || die "ema export check"
import sys
from safetensors.numpy import load_file
w, e = load_file(sys.argv[1]), load_file(sys.argv[2])
assert sorted(w) == sorted(e), "names differ"
moved = [n for n in w if not (w[n] == e[n]).all()]
# exactly the router biases (e_score_correction_bias, not averaged) keep the trained values
kept = sorted(set(w) - set(moved))
biases = sorted(n for n in w if n.endswith("e_score_correction_bias"))
assert biases and kept == biases, (kept, biases)
print(f"ema export: {len(moved)} of {len(w)} tensors differ from the weights, the "
      f"{len(kept)} router biases do not")
PY
"$BIN" ckpt export "$TMP/ck" "$TMP/hf_ema" --format hf --dtype fp32 --ema ||
  die "hf export --ema failed"
python3 "$CHECK" "$TMP/hf_ema" "$TMP/ema.safetensors" || die "ema folder check"

# Optional: both folders load in transformers and compute what fp8pipe computes (mean CE vs
# `fp8pipe eval`, FP32; for the fp32 folders also greedy decoding, `fp8pipe generate` against
# transformers' generate). torch and transformers are not installed by launch/setup.sh;
# FP8PIPE_HF_PYTHON may name a Python that has them (docs/HF_EXPORT.md, "Loading in transformers").
HF_PY=${FP8PIPE_HF_PYTHON:-python3}
if "$HF_PY" -c 'import torch, transformers' 2>/dev/null; then
  for d in hf_bf16 hf_fp32; do
    gen=()
    [ $d = hf_fp32 ] && gen=(--generate 32)  # and greedy decoding against transformers'
    "$HF_PY" "$SRC/tests/scripts/check_hf_transformers.py" "$TMP/$d" "$TMP/model.safetensors" \
      --fp8pipe "$BIN" --config "$SRC/configs/tiny.textproto" "${gen[@]}" ||
      die "transformers check ($d)"
  done
else
  echo "transformers checks skipped (both exports, the YaRN export, a transformers-made model):" \
    "torch/transformers not installed for $HF_PY (FP8PIPE_HF_PYTHON)"
fi

# YaRN (model.rope_scaling): config.json carries it as DeepSeek-V3's does, and transformers'
# YaRN computes what fp8pipe computes. init_std 0.1 makes the attention sharp enough that RoPE
# matters: evaluated without YaRN, or with another mscale, the CE moves by 2.6e-3 and 2e-4
# relative, far past the 1e-5 tolerance (measured when this was written).
YARN=(--model.rope_scaling.factor=4 --model.rope_scaling.original_max_position=16
  --model.rope_scaling.beta_fast=2 --model.rope_scaling.beta_slow=0.05
  --model.rope_scaling.mscale=2 --model.rope_scaling.mscale_all_dim=1)
"$BIN" train "$SRC/configs/tiny.textproto" --train.steps=3 --optim.warmup_steps=1 \
  --train.eval_every=0 --checkpoint.dir="$TMP/ck_yarn" --checkpoint.every=3 --log.jsonl= \
  --model.init_std=0.1 "${YARN[@]}" >"$TMP/train_yarn.log" 2>&1 ||
  { tail -5 "$TMP/train_yarn.log"; die "training the tiny config with YaRN failed"; }
"$BIN" ckpt export "$TMP/ck_yarn" "$TMP/yarn.safetensors" || die "consolidated export (yarn)"
"$BIN" ckpt export "$TMP/ck_yarn" "$TMP/hf_yarn" --format hf --dtype fp32 || die "hf export (yarn)"
python3 "$CHECK" "$TMP/hf_yarn" "$TMP/yarn.safetensors" || die "yarn folder check"
python3 - "$TMP/hf_yarn/config.json" <<'PY' || die "yarn config.json"
import json, sys
r = json.load(open(sys.argv[1]))["rope_scaling"]
want = {"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 2.0, "beta_slow": 0.05, "mscale": 2.0, "mscale_all_dim": 1.0}
assert r == want, r
PY
if "$HF_PY" -c 'import torch, transformers' 2>/dev/null; then
  SETS=()
  for a in "${YARN[@]}"; do SETS+=("--set=$a"); done
  "$HF_PY" "$SRC/tests/scripts/check_hf_transformers.py" "$TMP/hf_yarn" "$TMP/yarn.safetensors" \
    --fp8pipe "$BIN" --config "$SRC/configs/tiny.textproto" "${SETS[@]}" --generate 32 ||
    die "transformers check (yarn)"
fi

# Reading HF folders back (core/hf_import.h): `fp8pipe eval --checkpoint FOLDER` (and
# checkpoint.init_from) of the fp32 export gives the exported model's loss to the last digit; of
# a copy with DeepSeek-V3's FP8 weights (128x128 blocks, `<name>_scale_inv`, made by `fp8pipe
# quantize`; norms, embeddings, head, router and biases kept) within 1% of it, not equal.
eval_loss() { "$BIN" eval "$SRC/configs/tiny.textproto" --checkpoint "$1" "${@:2}" 2>/dev/null |
  sed -n 's/^eval loss \([0-9.]*\) .*/\1/p'; }
L_MODEL=$(eval_loss "$TMP/model.safetensors")
L_HF=$(eval_loss "$TMP/hf_fp32")
[[ -n $L_MODEL && $L_MODEL == "$L_HF" ]] || die "eval of the fp32 HF folder: $L_HF, of the model: $L_MODEL"
mkdir -p "$TMP/hf_fp8"
cp "$TMP/hf_fp32/config.json" "$TMP/hf_fp8/"
python3 - "$TMP/hf_fp32" "$TMP/hf_fp32.safetensors" <<'PY' || die "merging the fp32 shards"
import json, sys
from safetensors.numpy import load_file, save_file
d = sys.argv[1]
files = sorted(set(json.load(open(d + "/model.safetensors.index.json"))["weight_map"].values()))
merged = {}
for f in files:
    merged.update(load_file(d + "/" + f))
save_file(merged, sys.argv[2], metadata={"format": "pt"})
PY
"$BIN" quantize "$TMP/hf_fp32.safetensors" "$TMP/hf_fp8/model.safetensors" --granularity 128x128 \
  --skip 'norm|embed|head|mlp\.gate\.|bias' >"$TMP/quantize.log" 2>&1 ||
  { tail -3 "$TMP/quantize.log"; die "fp8pipe quantize of the HF folder"; }
# compared in FP32: in FP8 the model re-quantizes its weights in the same 128x128 blocks, which
# gives back these very values, so the two losses would be equal
L_MODEL=$(eval_loss "$TMP/model.safetensors" --precision.mode=FP32)
"$BIN" eval "$SRC/configs/tiny.textproto" --checkpoint "$TMP/hf_fp8" --precision.mode=FP32 \
  >"$TMP/eval_fp8.log" 2>&1 ||
  { tail -3 "$TMP/eval_fp8.log"; die "eval of the FP8 HF folder"; }
grep -q "F8_E4M3" "$TMP/eval_fp8.log" || die "the FP8 folder was not read as FP8"
L_FP8=$(sed -n 's/^eval loss \([0-9.]*\) .*/\1/p' "$TMP/eval_fp8.log")
python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); sys.exit(not (0 < abs(a - b) < 0.01 * a))" \
  "$L_MODEL" "$L_FP8" || die "eval of the FP8 HF folder: $L_FP8, of the model: $L_MODEL"
L_FP8X=$(eval_loss "$TMP/hf_fp8x" --precision.mode=FP32)
python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); sys.exit(not (0 < abs(a - b) < 0.01 * a))" \
  "$L_MODEL" "$L_FP8X" || die "eval of the --dtype fp8 export: $L_FP8X, of the model: $L_MODEL"
echo "HF folders read back: the fp32 folder evaluates to $L_HF as the model does; in FP32 the FP8-block folders to $L_FP8 (fp8pipe quantize) and $L_FP8X (--dtype fp8), the model to $L_MODEL"
# A model transformers made (random init, no MTP): fp8pipe computes transformers' CE.
if "$HF_PY" -c 'import torch, transformers' 2>/dev/null; then
  "$HF_PY" "$SRC/tests/scripts/make_hf_random.py" "$TMP/hf_fp32/config.json" "$TMP/hf_rand" ||
    die "making a transformers model"
  "$HF_PY" "$SRC/tests/scripts/check_hf_transformers.py" "$TMP/hf_rand" "$TMP/hf_rand" \
    --fp8pipe "$BIN" --config "$SRC/configs/tiny.textproto" --set=--model.mtp_depth=0 \
    --generate 32 ||
    die "transformers check (a transformers-made model read by fp8pipe)"
fi

# Bad arguments are refused with the usage text.
"$BIN" ckpt export "$TMP/ck" "$TMP/x" --format onnx 2>/dev/null && die "--format onnx accepted"
"$BIN" ckpt export "$TMP/ck" "$TMP/x" --format hf --dtype fp16 2>/dev/null && die "--dtype fp16 accepted"
echo "PASS: hf_export_test"
