#!/usr/bin/env bash
# Installs exactly what fp8pipe needs and is missing, on Debian 12 (or Ubuntu): compilers, CMake,
# OpenMPI, protobuf, fmt, GoogleTest, OpenBLAS, zlib, and the Python packages the tests use.
# Idempotent; runs as root or through sudo. CUDA is optional and never installed here.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(build-essential cmake ninja-build pkg-config git python3 python3-pip
      openmpi-bin libopenmpi-dev libprotobuf-dev protobuf-compiler libfmt-dev
      libgtest-dev libgmock-dev libopenblas-dev zlib1g-dev
      clang-16 libclang-rt-16-dev)  # clang-16 + libFuzzer: tests/fuzz/run_fuzz.sh
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: system packages present"
fi

# Python packages for the script tests (the standard safetensors reader, numpy).
if ! python3 - <<'PY' 2>/dev/null
import importlib, sys
reqs = [l.split("==")[0].split(">=")[0].strip() for l in open("requirements-test.txt") if l.strip() and not l.startswith("#")]
names = {"ml-dtypes": "ml_dtypes", "ml_dtypes": "ml_dtypes"}
for r in reqs:
    importlib.import_module(names.get(r, r))
PY
then
  echo "setup: installing Python test packages"
  python3 -m pip install -q -r requirements-test.txt 2>/dev/null ||
    python3 -m pip install -q --break-system-packages -r requirements-test.txt
else
  echo "setup: Python test packages present"
fi
