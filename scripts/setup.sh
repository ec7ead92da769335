#!/usr/bin/env bash
# Installs what apq needs on a Debian machine (root or sudo): system packages for the
# default dataset and the ARM64 cross toolchain / emulator, then apq itself (editable)
# with its pinned Python dependencies. Idempotent: reruns skip what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(dataset-fashion-mnist gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user cmake)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "apq setup: apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
HERE="$(pwd -P)"
# (Re)install when a dependency is missing or when `apq` is not this checkout (another clone's
# editable install would make the tests test the wrong tree).
INSTALLED_AT="$("$PY" -c "import apq.toolchain, tvm, torch, onnxruntime, xgboost, os; print(os.path.realpath(os.path.dirname(os.path.dirname(apq.toolchain.__file__))))" 2>/dev/null || true)"
if [ "$INSTALLED_AT" != "$HERE" ]; then
  echo "apq setup: pip install -e .[test] (pinned: apache-tvm 0.27.0.post1, apache-tvm-ffi 0.1.14.post1, torch 2.13.0)"
  "$PY" -m pip install -q -e ".[test]"
fi
echo "apq setup: done"
