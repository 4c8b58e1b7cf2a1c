#!/usr/bin/env bash
# Create (once) the separate virtual environment that ENGINE=sglang runs `sglang serve` from.
# SGLang pins torch, transformers and diffusers exactly; in its own venv those pins never meet the server's.
# Idempotent: when the venv holds the pinned version, it only checks. Prints the sglang executable (SGLANG_BIN).
# The first run downloads about 11 GB and takes several minutes.
set -euo pipefail

version=0.5.23
# the server looks for it under CACHE_DIR, so the script honours that variable too
cache=${IMAGE_SERVER_CACHE:-${CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/image-server}}
venv="$cache/sglang-$version"
python=${PYTHON:-python3}

installed() {
  [ -x "$venv/bin/sglang" ] &&
    "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('sglang') != '$version')" 2>/dev/null
}

if ! installed; then
  mkdir -p "$cache"
  exec 9>"$cache/.sglang-$version.lock"
  flock 9 # two concurrent runs must not install into one venv at once
  if ! installed; then
    echo "setup-sglang: installing sglang[diffusion]==$version into $venv (several minutes, ~11 GB)" >&2
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q --no-cache-dir "sglang[diffusion]==$version" >&2
    installed || { echo "setup-sglang: sglang $version did not install" >&2; exit 1; }
  fi
fi
echo "$venv/bin/sglang"
