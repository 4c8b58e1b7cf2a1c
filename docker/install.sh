#!/usr/bin/env bash
# Install into a virtual environment from a local wheelhouse only: pinned, hash-checked, no network.
# The Dockerfile runs it; tests/e2e/test_deploy_scripts.py runs it too (fresh venv, CPU lock), so this path is tested
# without Docker.
#
#   docker/install.sh --venv DIR [--python PYTHON] [--wheelhouse DIR --lock FILE [--wheels LIST]] [--project DIR]
#
#   --lock     requirements/<target>.txt: every package pinned with its sha256 (pip --require-hashes)
#   --wheels   requirements/wheels-<target>.txt: off-index wheels (URL SHA256), installed with --no-deps after
#              the lock; an sdist listed there is built here against the installed torch (nvcc, MAX_JOBS jobs)
#   --project  the image-server source tree, installed without its dependencies (the lock has them)
# Any step may be left out (the Dockerfile installs the dependencies and the project in two layers); the venv is
# created when missing, and `pip check` ends every run, so a lock that misses a dependency fails here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=docker/wheel-list.sh
source "$here/wheel-list.sh"

python=python3 venv="" wheelhouse="" lock="" wheels="" project=""
while [ $# -gt 0 ]; do
  case $1 in
    --python) python=${2?} ;;
    --venv) venv=${2?} ;;
    --wheelhouse) wheelhouse=${2?} ;;
    --lock) lock=${2?} ;;
    --wheels) wheels=${2?} ;;
    --project) project=${2?} ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift 2
done
[ -n "$venv" ] || { echo "install.sh: --venv is required" >&2; exit 2; }
if [ -n "$lock$wheels" ] && [ ! -d "$wheelhouse" ]; then
  echo "install.sh: --wheelhouse '$wheelhouse' is not a folder (run download-packages.sh)" >&2
  exit 2
fi

# Only the wheelhouse counts: ignore this machine's pip configuration (extra indexes, find-links, constraints).
while IFS= read -r name; do unset "$name"; done < <(compgen -e | grep '^PIP_' || true)
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)

if [ -n "$lock" ]; then
  echo "install.sh: $lock from $wheelhouse"
  # --no-deps: the lock is the whole set, so exactly its pins are installed, whatever other versions the wheelhouse
  # holds (the server's and SGLang's locks share one). Resolving again would let a dependency with an extra
  # (nvidia-cutlass-dsl[cu13]) take another lock's newer wheel, which --require-hashes refuses. pip check below
  # proves the set complete.
  "${pip[@]}" install --find-links "$wheelhouse" --only-binary=:all: --require-hashes --no-deps -r "$lock"
fi

if [ -n "$wheels" ]; then
  entries=$(wheel_list "$wheels")
  while read -r _url sha file; do
    [ -n "$file" ] || continue
    echo "install.sh: $file (off-index)"
    # Checked again here: the wheelhouse travelled from another machine.
    echo "$sha  $wheelhouse/$file" | sha256sum --check --quiet -
    # --force-reinstall: the listed file is what ends up installed, even over the same version (flash-attn-cuda.txt
    # puts FA4 back over the files flash-attn 2 overwrote).
    "${pip[@]}" install --find-links "$wheelhouse" --no-deps --no-build-isolation --force-reinstall "$wheelhouse/$file"
  done <<<"$entries"
fi

if [ -n "$project" ]; then
  echo "install.sh: project $project"
  "${pip[@]}" install --no-deps --no-build-isolation "$project"
fi

"${pip[@]}" check
