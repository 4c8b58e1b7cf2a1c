#!/usr/bin/env bash
# On a machine that reaches the package index: fill the wheelhouse that the image build installs from offline.
#
#   ./download-packages.sh [--cpu | --debian] [--lean] [--lock FILE]... [--wheels LIST]... [--dest DIR]
#                          [--python-version X.Y] [--glibc 2.NN]
#
# Defaults are the CUDA image's (./build.sh): requirements/cuda-py312.txt and the SGLang engine's
# requirements/sglang-cuda-py312.txt, the off-index wheels of requirements/wheels-cuda.txt and flash-attn's sources
# (requirements/flash-attn-cuda.txt, used by ./build.sh --flash-attn), for CPython 3.12 and glibc 2.39 (Ubuntu 24.04),
# into wheelhouse/ (or $WHEELHOUSE).
#   --cpu    the CPU image's instead (./build.sh --cpu): requirements/cpu-py311.txt for CPython 3.11 and glibc 2.36
#            (Debian 12), no off-index wheels, into wheelhouse-cpu/ (or $WHEELHOUSE)
#   --debian the CUDA image on a Debian 12 base (./build.sh --debian): requirements/cuda-py311.txt (with CUDA's
#            toolchain) and sglang-cuda-py311.txt for CPython 3.11 and glibc 2.36, flash-attn's sources, no
#            off-index wheels (wheels-cuda.txt's are cp312), into wheelhouse-debian/ (or $WHEELHOUSE)
#   --lean   without the SGLang lock (./build.sh --lean): several GB less
#   --lock, --wheels  replace the default locks / lists (repeat them for several; '' for none)
# Two parts:
#   1. every package of each lock, as wheels for that Python and platform (`pip download --only-binary=:all:`,
#      --require-hashes: each file is checked against the lock's sha256);
#   2. the files of each list (URL SHA256): a file already there with the right sha256 is kept, anything
#      else is fetched with curl and moved into place only when its sha256 matches.
# Idempotent: what is there already is not fetched again. It ends by naming what it fetched.
# pip runs with this machine's pip settings (PIP_INDEX_URL, proxy, certificates), curl with its proxy variables.
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=docker/wheel-list.sh
source "$root/docker/wheel-list.sh"

cpu=0 debian=0 lean=0 dest=${WHEELHOUSE:-} python_version="" glibc=""
locks=() lists=() locks_given=0 lists_given=0
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) cpu=1 ;;
    --debian) debian=1 ;;
    --lean) lean=1 ;;
    --lock) locks_given=1 locks+=("${2?}") && shift ;;
    --wheels) lists_given=1 lists+=("${2?}") && shift ;;
    --dest) dest=${2?} && shift ;;
    --python-version) python_version=${2?} && shift ;;
    --glibc) glibc=${2?} && shift ;;
    *) echo "download-packages.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

# The target's defaults, for whatever the options did not set.
if [ $cpu -eq 1 ]; then
  default_locks=("$root/requirements/cpu-py311.txt") default_lists=()
  : "${dest:=$root/wheelhouse-cpu}" "${python_version:=3.11}" "${glibc:=2.36}"
elif [ $debian -eq 1 ]; then
  default_locks=("$root/requirements/cuda-py311.txt")
  [ $lean -eq 1 ] || default_locks+=("$root/requirements/sglang-cuda-py311.txt")
  default_lists=("$root/requirements/flash-attn-cuda.txt")
  : "${dest:=$root/wheelhouse-debian}" "${python_version:=3.11}" "${glibc:=2.36}"
else
  default_locks=("$root/requirements/cuda-py312.txt")
  [ $lean -eq 1 ] || default_locks+=("$root/requirements/sglang-cuda-py312.txt")
  default_lists=("$root/requirements/wheels-cuda.txt" "$root/requirements/flash-attn-cuda.txt")
  : "${dest:=$root/wheelhouse}" "${python_version:=3.12}" "${glibc:=2.39}"
fi
[ $locks_given -eq 1 ] || locks=("${default_locks[@]}")
[ $lists_given -eq 1 ] || lists=("${default_lists[@]}")
mkdir -p "$dest"
listing() { find "$dest" -mindepth 1 -maxdepth 1 ! -name '.partial.*' -printf '%f\n' | sort; }
before=$(listing)

# pip matches --platform tags exactly: list every manylinux tag this glibc runs (2_5 up to 2_NN, and the old
# aliases), as an installer on that machine would accept them.
platforms=()
for ((minor = ${glibc#2.}; minor >= 5; minor--)); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
abi=cp${python_version/./}

for lock in "${locks[@]}"; do
  [ -n "$lock" ] || continue
  echo "download-packages.sh: $lock for CPython $python_version, glibc $glibc -> $dest"
  "${PYTHON:-python3}" -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
    --implementation cp --python-version "$python_version" --abi "$abi" --abi abi3 --abi none "${platforms[@]}" \
    --dest "$dest" -r "$lock"
done

for list in "${lists[@]}"; do
  [ -n "$list" ] || continue
  entries=$(wheel_list "$list")
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
done

fetched=$(comm -13 <(echo "$before") <(listing))
if [ -n "$fetched" ]; then
  echo "download-packages.sh: fetched $(echo "$fetched" | wc -l) file(s):"
  while read -r name; do echo "  $name"; done <<<"$fetched"
else
  echo "download-packages.sh: fetched nothing, the wheelhouse was complete"
fi
echo "download-packages.sh: $dest has $(listing | wc -l) file(s), $(du -sh "$dest" | cut -f1)"
