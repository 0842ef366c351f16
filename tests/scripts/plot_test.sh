#!/usr/bin/env bash
# End-to-end test of `fp8pipe plot`: two small JSONL metrics files with known values -> one SVG,
# checked as XML (panels, series per panel) and by mapping every drawn point back to its value
# through the panel's data-* axis transform; bad inputs must exit 2 naming the file.
# Usage (CTest): bash plot_test.sh BUILD_DIR SOURCE_DIR
set -uo pipefail

BUILD=${1:?usage: $0 BUILD_DIR SOURCE_DIR}
BIN=$BUILD/launch/fp8pipe
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
command -v python3 >/dev/null || die "python3 not found"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# Run A: 5 steps, two MoE layers, an eval at step 5 (of the weights and of their EMA), a note
# and an eval-kind record (skipped), and a truncated last line (a live run). Run B: 4 steps, one
# non-finite loss, no expert load.
python3 - "$TMP" <<'EOF' || die "could not write the inputs"
import json, sys
d = sys.argv[1]
def rec(step, loss, lr, tps, loads, ev=-1, ema=-1):
    return {"step": step, "loss": loss, "mtp_loss": loss + 0.2, "aux_loss": 1e-4, "lr": lr,
            "grad_norm": 0.5, "tokens_per_s": tps, "tflops": 0.001, "mfu": -1, "mem_gib": 0.1,
            "ms": 100, "tokens": 512 * step, "skipped": 0, "dropped": 0,
            "expert_overload": max([l for l in loads] or [0]), "eval_loss": ev,
            "eval_ema_loss": ema,
            "expert_load": [{"layer": f"moe{i}", "max_over_mean": l, "dead": 0}
                            for i, l in enumerate(loads)]}
A = [rec(1, 5.5, 1e-4, 1000, [2.0, 1.5]), rec(2, 4.0, 2e-4, 1200, [1.8, 1.25]),
     rec(3, 3.0, 3e-4, 1100, [1.5, 1.2]), rec(4, 2.5, 2e-4, 1300, [1.3, 1.1]),
     rec(5, 2.25, 1e-4, 1250, [1.2, 1.05], ev=2.4, ema=2.7)]
B = [rec(1, 5.0, 1e-4, 900, []), rec(2, 4.5, 2e-4, 950, []),
     rec(3, float("nan"), 3e-4, 1000, []), rec(4, 3.5, 2e-4, 980, [])]
with open(f"{d}/a.jsonl", "w") as f:
    f.write('{"kind":"run_start","config":"tiny"}\n')
    for r in A:
        f.write(json.dumps(r) + "\n")
    f.write('{"kind":"eval","step":5,"loss":9.0}\n')
    f.write('{"step":6,"loss":2.1,"lr"\n')
with open(f"{d}/b.jsonl", "w") as f:
    for r in B:
        f.write(json.dumps(r).replace("NaN", "nan") + "\n")
json.dump({"A": A, "B": B}, open(f"{d}/expect.json", "w"))
EOF

"$BIN" plot "$TMP/a.jsonl" "$TMP/b.jsonl" --labels runA,runB --floor 1.5 -o "$TMP/out.svg" \
  >"$TMP/plot.log" 2>&1 || {
  cat "$TMP/plot.log" >&2
  die "fp8pipe plot failed"
}
grep -q "a.jsonl:8: not a JSON object" "$TMP/plot.log" || bad "no warning for the truncated line"

python3 - "$TMP" <<'EOF' || bad "SVG checks"
import json, math, sys, xml.etree.ElementTree as ET
d = sys.argv[1]
exp = json.load(open(f"{d}/expect.json"))
NS = "{http://www.w3.org/2000/svg}"
root = ET.parse(f"{d}/out.svg").getroot()  # well-formed XML or an exception
panels = {g.get("data-panel"): g for g in root.iter(NS + "g") if g.get("class") == "panel"}
assert set(panels) == {"loss", "tokens_per_s", "expert_load", "lr"}, panels.keys()

def transform(g):  # pixel -> data, from the documented data-* attributes
    f = {k: float(g.get("data-" + k)) for k in ("x0", "x1", "y0", "y1", "px0", "px1", "py0", "py1")}
    return (lambda px: f["x0"] + (px - f["px0"]) / (f["px1"] - f["px0"]) * (f["x1"] - f["x0"]),
            lambda py: f["y0"] + (py - f["py0"]) / (f["py1"] - f["py0"]) * (f["y1"] - f["y0"]))

def series(g):
    return [e for e in g.iter(NS + "polyline") if e.get("class") == "series"]

def check_line(g, line, want):  # want: [(x, y)] finite points in order
    X, Y = transform(g)
    pts = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
    assert len(pts) == len(want), (line.get("data-label"), len(pts), len(want))
    for (px, py), (x, y) in zip(pts, want):
        assert abs(X(px) - x) < 1e-3 * max(1, abs(x)), (line.get("data-label"), X(px), x)
        assert abs(Y(py) - y) < 2e-3 * max(1e-3, abs(y)), (line.get("data-label"), Y(py), y)

def pts(run, key):
    return [(r["step"], r[key]) for r in exp[run] if math.isfinite(r[key])]

counts = {"loss": 2, "tokens_per_s": 2, "expert_load": 2, "lr": 2}
for name, n in counts.items():
    got = series(panels[name])
    assert len(got) == n, (name, len(got))
    assert [l.get("data-label") for l in got] == (["moe0", "moe1"] if name == "expert_load"
                                                 else ["runA", "runB"]), name
for name in ("loss", "tokens_per_s", "lr"):
    for line, run in zip(series(panels[name]), ("A", "B")):
        check_line(panels[name], line, pts(run, name))
for i, line in enumerate(series(panels["expert_load"])):
    check_line(panels["expert_load"], line,
               [(r["step"], r["expert_load"][i]["max_over_mean"]) for r in exp["A"]])
assert float(panels["expert_load"].get("data-y0")) == 1.0, "expert load axis must start at 1"

X, Y = transform(panels["loss"])
marks = {g.get("data-label"): g for g in panels["loss"].iter(NS + "g")
         if g.get("class") == "markers"}
assert sorted(marks) == ["runA eval", "runA eval ema"], sorted(marks)
for label, want, filled in (("runA eval", 2.4, True), ("runA eval ema", 2.7, False)):
    g = marks[label]
    assert len(g) == 1, (label, len(g))
    cx, cy = float(g[0].get("cx")), float(g[0].get("cy"))
    assert abs(X(cx) - 5) < 1e-3 and abs(Y(cy) - want) < 1e-3, label
    assert (g.get("fill") != "white") == filled, (label, "filled" if filled else "hollow")
hl = [e for e in panels["loss"].iter(NS + "line") if e.get("class") == "hline"]
assert len(hl) == 1 and abs(Y(float(hl[0].get("y1"))) - 1.5) < 1e-3, "floor line"
for name, g in panels.items():  # tick labels are drawn
    ticks = [t for e in g.iter(NS + "g") if e.get("class") == "ticks" for t in e]
    assert len(ticks) >= 4, (name, len(ticks))
print("SVG checks passed")
EOF

# A batch-size ramp (train.batch_ramp): run C's batch rises 8 -> 32, run D's stays 32; a "batch"
# panel appears, its points mapping back to each run's sizes (runs A and B, without a "batch"
# field, had none).
python3 - "$TMP" <<'EOF' || die "could not write the ramp inputs"
import json, sys
d = sys.argv[1]
def rec(step, batch):
    return {"step": step, "loss": 5.0 - step * 0.1, "lr": 1e-4, "tokens_per_s": 1000,
            "batch": batch, "eval_loss": -1, "expert_load": []}
for name, sizes in (("c", [8, 8, 16, 16, 32, 32]), ("d", [32] * 6)):
    with open(f"{d}/{name}.jsonl", "w") as f:
        for i, b in enumerate(sizes):
            f.write(json.dumps(rec(i + 1, b)) + "\n")
EOF
"$BIN" plot "$TMP/c.jsonl" "$TMP/d.jsonl" --labels ramp,flat -o "$TMP/ramp.svg" >"$TMP/ramp.log" 2>&1 ||
  die "fp8pipe plot (ramp) failed: $(cat "$TMP/ramp.log")"
python3 - "$TMP/ramp.svg" <<'EOF' || bad "batch panel checks"
import sys, xml.etree.ElementTree as ET
NS = "{http://www.w3.org/2000/svg}"
root = ET.parse(sys.argv[1]).getroot()
panels = {g.get("data-panel"): g for g in root.iter(NS + "g") if g.get("class") == "panel"}
assert "batch" in panels, panels.keys()
g = panels["batch"]
x0, x1, px0, px1 = (float(g.get(k)) for k in ("data-x0", "data-x1", "data-px0", "data-px1"))
y0, y1, py0, py1 = (float(g.get(k)) for k in ("data-y0", "data-y1", "data-py0", "data-py1"))
X = lambda p: x0 + (p - px0) * (x1 - x0) / (px1 - px0)
Y = lambda p: y0 + (p - py0) * (y1 - y0) / (py1 - py0)
lines = [e for e in g.iter(NS + "polyline") if e.get("class") == "series"]
want = {"ramp": [8, 8, 16, 16, 32, 32], "flat": [32] * 6}
assert sorted(l.get("data-label") for l in lines) == ["flat", "ramp"], [l.get("data-label") for l in lines]
for l in lines:
    pts = [tuple(map(float, p.split(","))) for p in l.get("points").split()]
    got = [(round(X(px)), round(Y(py))) for px, py in pts]
    assert got == list(enumerate(want[l.get("data-label")], 1)), (l.get("data-label"), got)
print("batch panel checks passed")
EOF

# Errors: exit 2 and a message naming the file.
expect_error() {  # expect_error NEEDLE ARGS...
  local needle=$1
  shift
  "$BIN" plot "$@" -o "$TMP/err.svg" >"$TMP/err.log" 2>&1
  local rc=$?
  if [ $rc -ne 2 ]; then
    bad "plot $*: exit $rc, want 2"
  elif ! grep -qF -- "$needle" "$TMP/err.log"; then
    bad "plot $*: message lacks '$needle':"
    cat "$TMP/err.log" >&2
  fi
}
: >"$TMP/empty.jsonl"
echo '{"kind":"run_start"}' >"$TMP/notes.jsonl"
expect_error "$TMP/absent.jsonl" "$TMP/a.jsonl" "$TMP/absent.jsonl"
expect_error "$TMP/empty.jsonl" "$TMP/empty.jsonl"
expect_error "$TMP/notes.jsonl' has no step records" "$TMP/notes.jsonl"
expect_error "--labels has 1 names for 2 files" "$TMP/a.jsonl" "$TMP/b.jsonl" --labels x
expect_error "usage" --floor

# Optional: render to PNG when a renderer exists (for a human look; never fails the test).
if command -v rsvg-convert >/dev/null; then
  rsvg-convert "$TMP/out.svg" -o "$TMP/out.png" && echo "rendered $(wc -c <"$TMP/out.png") bytes"
fi

[ $failed -eq 0 ] || die "$failed checks failed"
echo "plot_test: all checks passed"
