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
