#!/usr/bin/env bash
# Set up a fresh machine for image-server: system packages, and a virtual environment in .venv holding the server and
# its bench tools.
#
#   scripts/setup.sh           the server, the OpenAI SDK and the bench tools (the `bench` extra)
#   scripts/setup.sh --unit    the server and what the in-process tests need (tests/unit): no system package
#                              beyond Python's venv and curl, no e2e tool
#   scripts/setup.sh --test    everything the whole suite needs: the test tools, nginx (the multi-GPU host), and
#                              Docker, mmdebstrap and pigz for tests/e2e/test_container.py
#
# Idempotent: a second run only checks. .venv/.setup-stamp records what was installed (pyproject.toml's hash, the
# extras, the torch wanted); while it matches, nothing is installed again.
# torch is pinned (torch==2.13.0, or TORCH_SPEC). PyPI's Linux torch is the CUDA build with GBs of NVIDIA libraries,
# so on a machine without an NVIDIA GPU it comes from PyTorch's CPU index (TORCH_CPU_INDEX); when that index cannot
# be reached, from pip's default index, which is said. TORCH_INDEX_URL forces an index either way.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  "") extras="bench" ;;
  --unit) extras="unit" ;;
  --test) extras="test" ;; # the test extra includes the others
  *)
    echo "usage: scripts/setup.sh [--unit | --test]" >&2
    exit 2
    ;;
esac
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
stamp=.venv/.setup-stamp

step() { echo "setup: [$1/3] $2"; }

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

system_packages() {
  local packages=(python3-venv curl)
  if [ "$extras" = test ]; then
    # nginx: the multi-GPU host's balancer; docker.io, mmdebstrap and pigz: the container test (build, Debian base,
    # build.sh --save). docker.io only where no Docker engine is installed (Docker CE's own packages would conflict).
    packages+=(nginx shellcheck mmdebstrap pigz)
    command -v dockerd >/dev/null || [ -x /usr/sbin/dockerd ] || packages+=(docker.io)
  fi
  apt_install "${packages[@]}"
}

has_nvidia_gpu() {
  [ -e /dev/nvidiactl ] || nvidia-smi -L >/dev/null 2>&1
}

# The pip options that choose where torch comes from (printed one per line), and why (on stderr).
torch_index() {
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    printf '%s\n' --index-url "$TORCH_INDEX_URL"
  elif has_nvidia_gpu; then
    echo "setup: an NVIDIA GPU is here: torch from the default index (PyPI's is the CUDA build)" >&2
  # One short try: a machine that cannot reach the index should not wait on retries before falling back.
  elif curl --silent --fail --output /dev/null --connect-timeout 5 --max-time 15 --retry 0 "$cpu_index/torch/"; then
    echo "setup: no NVIDIA GPU: torch's CPU build from $cpu_index" >&2
    printf '%s\n' --index-url "$cpu_index"
  else
    echo "setup: no NVIDIA GPU, but PyTorch's CPU index ($cpu_index) cannot be reached: torch from the default" \
      "index (on plain PyPI that is the CUDA build, GBs; set TORCH_INDEX_URL to a mirror of the CPU index)" >&2
  fi
}

venv_has() { # venv_has REQUIREMENT: the venv holds a distribution that satisfies it
  .venv/bin/python - "$1" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import PackageNotFoundError, version
from pip._vendor.packaging.requirements import Requirement

requirement = Requirement(sys.argv[1])
try:
    sys.exit(not requirement.specifier.contains(version(requirement.name), prereleases=True))
except PackageNotFoundError:
    sys.exit(1)
EOF
}

stamp_text() {
  echo "pyproject $(sha256sum pyproject.toml | cut -d' ' -f1) torch $torch_spec extras $1"
}

project_up_to_date() {
  [ -f "$stamp" ] && venv_has image-server || return 1
  # One line per extra installed since pyproject.toml last changed; what test installs includes the others.
  grep -qxF -e "$(stamp_text "$extras")" -e "$(stamp_text test)" "$stamp"
}

echo "setup: checking system packages"
if command -v apt-get >/dev/null 2>&1; then
  system_packages
fi

if [ ! -x .venv/bin/python ]; then
  step 1 "creating .venv with $($python --version)"
  "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
else
  step 1 ".venv exists"
fi

if venv_has "$torch_spec"; then
  step 2 "$torch_spec is installed"
else
  step 2 "installing $torch_spec"
  mapfile -t index < <(torch_index)
  .venv/bin/python -m pip install "$torch_spec" "${index[@]}"
fi

if project_up_to_date; then
  step 3 "image-server[$extras] is installed and pyproject.toml has not changed since"
else
  step 3 "installing image-server[$extras] and its dependencies (editable)"
  .venv/bin/python -m pip install -e ".[$extras]"
  stamp_text "$extras" >>"$stamp"
fi

versions=$(.venv/bin/python -c 'from importlib.metadata import version as v; print("torch", v("torch"), "diffusers", v("diffusers"))')
echo "setup: ready in ${SECONDS}s ($versions)"
