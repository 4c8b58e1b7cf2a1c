#!/usr/bin/env bash
# On a machine that reaches the package index: fill the wheelhouse that the image build installs from offline.
#
#   ./download-packages.sh [--lock FILE] [--wheels LIST] [--dest DIR] [--python-version X.Y] [--glibc 2.NN]
#
# Defaults are the CUDA image's: requirements/cuda-py312.txt, requirements/wheels-cuda.txt, wheelhouse/,
# CPython 3.12, glibc 2.39 (Ubuntu 24.04). Two parts:
#   1. every package of the lock, as wheels for that Python and platform (`pip download --only-binary=:all:`,
#      --require-hashes: each file is checked against the lock's sha256);
#   2. the off-index wheels of the list (URL SHA256): a file already there with the right sha256 is kept, anything
#      else is fetched with curl and moved into place only when its sha256 matches.
# Idempotent: what is there already is not fetched again. It ends by naming what it fetched.
# pip runs with this machine's pip settings (PIP_INDEX_URL, proxy, certificates), curl with its proxy variables.
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=docker/wheel-list.sh
source "$root/docker/wheel-list.sh"

lock=$root/requirements/cuda-py312.txt
wheels=$root/requirements/wheels-cuda.txt
dest=$root/wheelhouse
python_version=3.12
glibc=2.39
while [ $# -gt 0 ]; do
  case $1 in
    --lock) lock=${2?} ;;
    --wheels) wheels=${2?} ;;
    --dest) dest=${2?} ;;
    --python-version) python_version=${2?} ;;
    --glibc) glibc=${2?} ;;
    *) echo "download-packages.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift 2
done
mkdir -p "$dest"
listing() { find "$dest" -mindepth 1 -maxdepth 1 ! -name '.partial.*' -printf '%f\n' | sort; }
before=$(listing)

# pip matches --platform tags exactly: list every manylinux tag this glibc runs (2_5 up to 2_NN, and the old
# aliases), as an installer on that machine would accept them.
platforms=()
for ((minor = ${glibc#2.}; minor >= 5; minor--)); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
abi=cp${python_version/./}

echo "download-packages.sh: $lock for CPython $python_version, glibc $glibc -> $dest"
"${PYTHON:-python3}" -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
  --implementation cp --python-version "$python_version" --abi "$abi" --abi abi3 --abi none "${platforms[@]}" \
  --dest "$dest" -r "$lock"

if [ -n "$wheels" ]; then
  entries=$(wheel_list "$wheels")
  while read -r url sha file; do
    [ -n "$file" ] || continue
    target=$dest/$file
    if [ -f "$target" ] && echo "$sha  $target" | sha256sum --check --quiet - 2>/dev/null; then
      continue
    fi
    echo "download-packages.sh: fetching $url"
    partial=$(mktemp "$dest/.partial.XXXXXX")
    curl --fail --silent --show-error --location --retry 3 --output "$partial" "$url"
    if ! echo "$sha  $partial" | sha256sum --check --quiet - 2>/dev/null; then
      rm -f "$partial"
      echo "download-packages.sh: sha256 mismatch for $url (want $sha); nothing written" >&2
      exit 1
    fi
    chmod 644 "$partial"
    mv -f "$partial" "$target"
  done <<<"$entries"
fi

fetched=$(comm -13 <(echo "$before") <(listing))
if [ -n "$fetched" ]; then
  echo "download-packages.sh: fetched $(echo "$fetched" | wc -l) file(s):"
  while read -r name; do echo "  $name"; done <<<"$fetched"
else
  echo "download-packages.sh: fetched nothing, the wheelhouse was complete"
fi
echo "download-packages.sh: $dest has $(listing | wc -l) file(s), $(du -sh "$dest" | cut -f1)"
