# shellcheck shell=bash
# Preamble shared by the script tests (tests/scripts/*_test.sh), sourced first so that each one
# resolves its arguments, prepares mpirun, keeps its files and counts its checks the same way:
#   test_init "$@"     BUILD and SRC made absolute from $1 and $2, BIN=$BUILD/launch/fp8pipe, the
#                      Open MPI variables (mpirun as root, more ranks than cores), counters pass and
#                      fail, and TMP: a fresh directory, removed on exit (trap test_cleanup) unless
#                      KEEP is set. fault_lib.sh, sourced after test_init, replaces that trap with
#                      its own cleanup, which ends with test_cleanup.
#   ok MSG, bad MSG    print "ok: MSG" or "FAIL: MSG" and count it.
#   test_summary [NOTE]  print "P passed, F failed[ NOTE]"; its status, the script's last, is 0
#                      when nothing failed.
# Not a *_test.sh, so CTest does not run it on its own.

test_cleanup() { [ -n "${KEEP:-}" ] || rm -rf "$TMP"; }
# shellcheck disable=SC2034  # BUILD, SRC and BIN are for the sourcing script
test_init() {  # test_init BUILD_DIR SOURCE_DIR
  BUILD=$(cd "$1" && pwd); SRC=$(cd "$2" && pwd)
  BIN=$BUILD/launch/fp8pipe
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
  TMP=$(mktemp -d); trap test_cleanup EXIT
  pass=0; fail=0
}
ok() { echo "ok: $1"; pass=$((pass + 1)); }
bad() { echo "FAIL: $1"; fail=$((fail + 1)); }
# shellcheck disable=SC2120  # NOTE is optional
test_summary() {  # test_summary [NOTE]
  echo "$pass passed, $fail failed${1:+ $1}"
  [ "$fail" -eq 0 ]
}
