#!/usr/bin/env bash
# Regenerate the pinned, hashed locks that the image installs from (needs uv and the package index).
#
#   requirements/lock.sh [--upgrade]     extra flags go to `uv pip compile`
#
# Each lock is the project's dependencies (pyproject.toml, plus the extras in IMAGE_EXTRAS) and the target's own
# .in file, resolved for one target platform and Python, every file's sha256 listed:
#   cuda-py312.txt  the image: Linux x86_64 (Ubuntu 24.04, glibc 2.39), CPython 3.12, CUDA torch from PyPI
#   cuda-py311.txt  the same image on a Debian 12 base (./build.sh --debian: glibc 2.36, CPython 3.11), plus CUDA's
#                   devel toolchain from PyPI (cuda-toolchain.in), which the NVIDIA base brings itself
#   cpu-py311.txt   the same server with CPU torch, for this project's dev/CI machines (Debian 12, CPython 3.11);
#                   the tests install it with docker/install.sh. CPU torch is not on PyPI: TORCH_CPU_WHEELS names
#                   where its wheels are listed (PyTorch's CPU index by default; a local folder works too).
#   sglang-cuda-py312.txt  only when requirements/sglang.in exists: the SGLang engine's own venv (/opt/sglang);
#   sglang-cuda-py311.txt  the same for the Debian base.
# uv keeps the pins already in a lock unless --upgrade is given, so adding a dependency changes only what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

uv=${UV:-uv}
command -v "$uv" >/dev/null || { echo "lock.sh: needs uv (pip install uv)" >&2; exit 1; }

# Extras of pyproject.toml that the image carries: a plugin whose dependencies live in an extra adds its name here.
IMAGE_EXTRAS=(gpu)
extra_flags=()
for extra in "${IMAGE_EXTRAS[@]}"; do extra_flags+=(--extra "$extra"); done

compile() {
  local out=$1
  shift
  echo "lock.sh: $out"
  "$uv" pip compile --quiet --generate-hashes --custom-compile-command "requirements/lock.sh" -o "$out" "$@"
}

compile requirements/cuda-py312.txt pyproject.toml "${extra_flags[@]}" requirements/cuda.in \
  --python-version 3.12 --python-platform x86_64-manylinux_2_39 "$@"

compile requirements/cuda-py311.txt pyproject.toml "${extra_flags[@]}" requirements/cuda.in \
  requirements/cuda-toolchain.in --python-version 3.11 --python-platform x86_64-manylinux_2_36 "$@"

compile requirements/cpu-py311.txt pyproject.toml "${extra_flags[@]}" requirements/cpu.in \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --find-links "${TORCH_CPU_WHEELS:-https://download.pytorch.org/whl/cpu/torch/}" "$@"

if [ -f requirements/sglang.in ]; then
  compile requirements/sglang-cuda-py312.txt requirements/sglang.in \
    --python-version 3.12 --python-platform x86_64-manylinux_2_39 "$@"
  compile requirements/sglang-cuda-py311.txt requirements/sglang.in \
    --python-version 3.11 --python-platform x86_64-manylinux_2_36 "$@"
fi
