#!/usr/bin/env bash
# End-to-end test of `fp8pipe prepare-data` with fill-in-the-middle: a corpus of code-like
# documents, some with multi-byte UTF-8, is prepared with and without --fim-rate; the Megatron
# files are read back by tests/scripts/megatron_py.py (plain Python, shares nothing with the C++
# reader), each PSM document is decoded in Python from the layout's definition and must give the
# plain document's bytes, and the rewritten share must fit the rate. Then 2 training steps run on
# the FIM data with vocab 260, and vocab 257 is refused naming the sentinel id.
# Usage (CTest): bash prepare_data_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail

BUILD=${1:?usage: $0 BUILD_DIR SOURCE_DIR}
SRC=${2:?usage: $0 BUILD_DIR SOURCE_DIR}
BIN=$BUILD/launch/fp8pipe
die() {
  echo "FAIL: $*" >&2
  exit 1
}
[ -x "$BIN" ] || die "$BIN is not built (ninja -C $BUILD fp8pipe)"
command -v python3 >/dev/null || die "python3 not found"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

python3 - "$TMP/corpus.txt" <<'PY' || die "could not write the corpus"
import random, sys
random.seed(3)
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for d in range(1000):
        name = random.choice(["f", "g", "größe", "平方", "λx"])
        f.write(f"def {name}{d}(x):\n    return x * {random.randint(1, 99)}  # ok ✓\n\n")
PY

"$BIN" prepare-data "$TMP/plain" "$TMP/corpus.txt" --format megatron --split-docs \
  >"$TMP/plain.out" 2>&1 || die "prepare-data (plain) failed: $(cat "$TMP/plain.out")"
"$BIN" prepare-data "$TMP/fim" "$TMP/corpus.txt" --format megatron --split-docs \
  --fim-rate 0.1 --fim-seed 9 >"$TMP/fim.out" 2>&1 ||
  die "prepare-data (fim) failed: $(cat "$TMP/fim.out")"
grep -q "1000 documents (.* fill-in-the-middle).*vocab 260" "$TMP/fim.out" ||
  die "summary line: $(cat "$TMP/fim.out")"

python3 - "$SRC/tests/scripts/megatron_py.py" "$TMP" <<'PY' || die "FIM documents do not decode"
import json, subprocess, sys
reader, tmp = sys.argv[1], sys.argv[2]
def docs(prefix):
    out = subprocess.run([sys.executable, reader, "read", prefix], check=True,
                         capture_output=True, text=True).stdout
    return [sum(d, []) for d in json.loads(out)["docs"]]
plain, fim = docs(tmp + "/plain"), docs(tmp + "/fim")
assert len(plain) == len(fim) == 1000, (len(plain), len(fim))
BEGIN, HOLE, END, EOD = 257, 258, 259, 256
rewritten = 0
for i, (p, f) in enumerate(zip(plain, fim)):
    assert p[-1] == EOD and f[-1] == EOD, i
    if f[0] != BEGIN:
        assert f == p, f"document {i} changed without FIM"
        continue
    rewritten += 1
    body = f[1:-1]
    assert body.count(HOLE) == 1 and body.count(END) == 1 and BEGIN not in body, i
    h, e = body.index(HOLE), body.index(END)
    assert h < e, i
    prefix, suffix, middle = body[:h], body[h + 1:e], body[e + 1:]
    assert prefix + middle + suffix + [EOD] == p, f"document {i} does not decode"
    for piece in (middle, suffix):
        assert not piece or piece[0] & 0xC0 != 0x80, f"document {i}: cut inside a character"
    text = bytes(p[:-1]).decode("utf-8")  # the plain one is valid UTF-8 ...
    for piece in (prefix, middle, suffix):
        bytes(piece).decode("utf-8")      # ... and so is every piece
# 1000 documents at 0.1: 100 +- 4 binomial standard deviations (9.5)
assert 62 <= rewritten <= 138, rewritten
print(f"{rewritten} of 1000 documents in PSM form, all decode to the plain ones")
PY

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
common=(--data.source=megatron "--data.path=$TMP/fim" --train.steps=2 --optim.warmup_steps=1
  --train.eval_every=0 --checkpoint.dir= --checkpoint.every=0 --log.every=1)
"$BIN" train "$SRC/configs/tiny.textproto" "${common[@]}" --model.vocab_size=260 \
  >"$TMP/train.out" 2>&1 || die "training on the FIM data failed: $(tail -5 "$TMP/train.out")"
grep -qE "step +2 " "$TMP/train.out" || die "no step 2 line: $(tail -5 "$TMP/train.out")"
if "$BIN" train "$SRC/configs/tiny.textproto" "${common[@]}" --model.vocab_size=257 \
  >"$TMP/small.out" 2>&1; then
  die "vocab 257 accepted FIM sentinels"
fi
grep -qE "is 25[789], outside the vocabulary \[0, 257\) \(a fill-in-the-middle sentinel of prepare-data --fim-rate: model.vocab_size >= 260\)" "$TMP/small.out" ||
  die "the vocab error does not name the sentinel: $(grep -m1 ' E\]' "$TMP/small.out")"
echo "prepare_data_test: ok"
