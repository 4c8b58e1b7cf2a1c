#!/usr/bin/env bash
# Prepare what an air-gapped GPU host lacks to run bench/gpu_flux.py (and the server): wheels of the packages it
# does not have, at the versions of the image's lock (requirements/cuda-py312.txt), and image-server itself as a
# wheel: its code and its entry points, through which the server finds its plugins. A typical GPU host has torch,
# transformers, peft, accelerate, Pillow, httpx and prometheus-client; override the list with PACKAGES.
#
#   bench/gpu_carry.sh [DEST]      (default .whl; at most 64 MiB, what such a host's file transfer takes)
#
# There (Python 3.12), from a copy of the repository with DEST beside it:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DEST/*.whl && export PYTHONPATH=/tmp/site
#   python3 bench/gpu_flux.py --quick --compile-cache /tmp/compile-cache
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
limit_mib=64
lock=requirements/cuda-py312.txt
read -r -a packages <<<"${PACKAGES:-diffusers fastapi starlette pydantic pydantic-core uvicorn python-multipart torchao typing-extensions annotated-doc opentelemetry-api}"

specs=()
for name in "${packages[@]}"; do
  pinned=$(grep -i -m1 -o "^${name}==[^ ]*" "$lock") || { echo "gpu_carry.sh: $name is not in $lock" >&2; exit 1; }
  specs+=("$pinned")
done

mkdir -p "$dest"
rm -f "$dest"/*.whl
platforms=()
for minor in 39 35 34 31 28 27 24 17; do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
echo "gpu_carry.sh: ${specs[*]}"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d "$dest" "${specs[@]}"
echo "gpu_carry.sh: image-server as a wheel (code and entry points)"
"$python" -m pip wheel --quiet --no-deps -w "$dest" .

size=$(du -sm "$dest" | cut -f1)
echo "gpu_carry.sh: $dest holds $(find "$dest" -name '*.whl' | wc -l) wheels, ${size} MiB"
if [ "$size" -gt "$limit_mib" ]; then
  echo "gpu_carry.sh: more than ${limit_mib} MiB: carry fewer packages (PACKAGES)" >&2
  exit 1
fi
