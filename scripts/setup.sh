#!/usr/bin/env bash
# Set up a fresh machine for image-server: system packages the tests use, and a virtual environment in .venv.
# Idempotent: a second run only checks. Usage: scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "setup: installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

if command -v apt-get >/dev/null 2>&1; then
  apt_install python3-venv curl
  [ $want_test -eq 1 ] && apt_install nginx shellcheck
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build where a CPU one will do.
# On a GPU host set TORCH_SPEC to the build you want (e.g. "torch==2.13.0" from the CUDA index).
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
extras=""
[ $want_test -eq 1 ] && extras="[test]"
.venv/bin/python -m pip install -q -e ".${extras}"
echo "setup: ready ($(.venv/bin/python -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)'))"
