#!/usr/bin/env bash
# Scaling study: DeepSeek-V3-671B on 2048 H800-class GPUs under 1F1B, ZB1P, DualPipe, DualPipeV
# (fp8pipe simulate), plus the layout sweep. Writes out/compare.csv, out/sweep.csv, out/sweep.svg,
# out/dualpipe_trace.json and out/<kind>.txt. Usage: run.sh [BUILD_DIR] (default ../../build-sim).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${1:-$root/build-sim}
bin=$build/launch/fp8pipe
cfg=$root/configs/dsv3-671b-2048.textproto
out=$here/out
if [[ ! -x $bin ]]; then
  cmake -S "$root" -B "$build" -G Ninja -DFP8PIPE_CUDA=OFF
  nice ninja -C "$build" -j2 fp8pipe
fi
mkdir -p "$out"
first=1
for kind in 1f1b zb1p dualpipe dualpipev; do
  extra=()
  [[ $kind == dualpipe ]] && extra=(--trace "$out/dualpipe_trace.json")
  "$bin" simulate "$cfg" --parallel.schedule=$kind --csv "$out/$kind.csv" "${extra[@]}" \
    | tee "$out/$kind.txt"
  if [[ $first == 1 ]]; then head -1 "$out/$kind.csv" > "$out/compare.csv"; first=0; fi
  tail -n +2 "$out/$kind.csv" | sed "s/^single,/$kind,/" >> "$out/compare.csv"
  rm "$out/$kind.csv"
  echo
done
"$bin" simulate "$cfg" --sweep --csv "$out/sweep.csv" --svg "$out/sweep.svg" > /dev/null
echo "wrote $out/compare.csv $out/sweep.csv $out/sweep.svg $out/dualpipe_trace.json"
