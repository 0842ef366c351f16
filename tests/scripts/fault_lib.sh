# Helpers shared by the fault tests (fault_*_test.sh), sourced after test_init (test_lib.sh): its
# trap cleanup replaces test_lib's and ends with test_cleanup. Each rank of a job writes its PID
# (that of fp8pipe itself, through exec) to $TMP/<case>.pid.<rank>.

alive() {  # alive PID: the process exists and is not a zombie
  local st; st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "${st:0:1}" != Z ]
}
cleanup() {  # never leave a stopped or orphaned rank behind
  for f in "$TMP"/*.pid.*; do
    [ -f "$f" ] || continue
    local p; p=$(cat "$f")
    if alive "$p" && grep -q fp8pipe "/proc/$p/cmdline" 2>/dev/null; then
      kill -CONT "$p" 2>/dev/null; kill -KILL "$p" 2>/dev/null
    fi
  done
  test_cleanup  # TMP, unless KEEP is set
}
trap cleanup EXIT
# leftovers CASE: PIDs of the case's ranks still alive once mpirun has returned, after giving the
# launcher's SIGTERM/SIGKILL up to 5 s to land (a rank may be between the two when mpirun exits).
leftovers() {
  local left f
  for _ in $(seq 50); do
    left=""
    for f in "$TMP/$1".pid.*; do alive "$(cat "$f")" && left+=" $(cat "$f")"; done
    [ -z "$left" ] && break
    sleep 0.1
  done
  echo "$left"
}
steps_logged() { if [ -f "$1" ]; then awk '/^\{"step"/ { n++ } END { print n + 0 }' "$1"; else echo 0; fi; }
now() { echo "$EPOCHREALTIME"; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# signal_case NAME RANK SIGNAL [mpirun options...] [-- train overrides...]: start a 2-rank tiny
# job ($ARGS, then the overrides), send SIGNAL to RANK once it has logged a step (it is then
# inside the next one) and wait for mpirun. Sets RC, ELAPSED (s from the signal to the exit) and
# LEFT (PIDs of the job still alive, after leftovers' grace).
signal_case() {
  local name=$1 victim=$2 sig=$3 mpi=()
  shift 3
  while [ $# -gt 0 ] && [ "$1" != -- ]; do mpi+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  timeout -k 5 45 mpirun "${mpi[@]}" -np 2 bash -c \
    'echo $$ >"$0.pid.${OMPI_COMM_WORLD_RANK:-$PMIX_RANK}"; exec "$@"' "$TMP/$name" \
    "$BIN" train "$SRC/configs/tiny.textproto" "${ARGS[@]}" "$@" \
    --log.jsonl="$TMP/$name.r{rank}.jsonl" >"$TMP/$name.log" 2>&1 &
  local mp=$!
  for _ in $(seq 600); do
    [ "$(steps_logged "$TMP/$name.r$victim.jsonl")" -ge 1 ] && [ -s "$TMP/$name.pid.$victim" ] && break
    sleep 0.1
  done
  sleep 0.1
  local t0; t0=$(now)
  kill -"$sig" "$(cat "$TMP/$name.pid.$victim")"
  wait $mp; RC=$?
  ELAPSED=$(secs "$t0" "$(now)")
  LEFT=$(leftovers "$name")
}
