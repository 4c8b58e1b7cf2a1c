#!/usr/bin/env bash
# Build the image from a wheelhouse (fill it first with ./download-packages.sh, given the same --cpu / --lean), tagged
# image-server:<git tag of HEAD, else its short hash>[-variant]. Never tags `latest`: a tag names exactly one build,
# which is what a rollout needs.
#
#   ./build.sh [--cpu | --debian] [--lean] [--flash-attn] [--wheelhouse DIR] [--save] [extra docker build flags...]
#
#   (none)            the CUDA image with the SGLang engine (ENGINE=sglang), from wheelhouse/
#   --lean            without SGLang (several GB smaller); tag suffix -lean
#   --flash-attn      flash-attn compiled in (ATTENTION=flash; hours at MAX_JOBS=2); tag suffix -flash-attn
#   --cpu             the CPU variant: debian:bookworm-slim, Python 3.11, CPU torch, no SGLang, from wheelhouse-cpu/;
#                     tag suffix -cpu. Without a registry: --build-arg BASE_IMAGE="$(docker/debian-base.sh)"
#   --debian          the CUDA image on debian:bookworm-slim instead of the NVIDIA base: Python 3.11, CUDA's toolchain
#                     (nvcc) from PyPI wheels, with SGLang, from wheelhouse-debian/; tag suffix -debian. Without a
#                     registry, as --cpu: --build-arg BASE_IMAGE="$(docker/debian-base.sh)"
#   --wheelhouse DIR  the wheels (default $WHEELHOUSE, else the folder download-packages.sh fills by default)
#   --save            also write out/image-server-<tag>.tar.gz (docker save) for an offline cluster, and print the
#                     `docker load` line that brings it in there
# Other arguments go to docker build after the variant's build arguments, so they win (--build-arg BASE_IMAGE=...).
# Environment: IMAGE_TAG overrides the tag; MAX_JOBS (default 2) bounds the compile jobs of source builds; DOCKER is
# the docker CLI. The Dockerfile needs BuildKit (RUN --mount): Docker 23+ brings it with the buildx plugin, Docker
# 20.10 (Debian 12's docker.io) with DOCKER_BUILDKIT=1, which is set here.
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)
cd "$root"
docker=${DOCKER:-docker}

save=0 cpu=0 debian=0 lean=0 flash_attn=0 wheelhouse=${WHEELHOUSE:-}
while [ $# -gt 0 ]; do
  case $1 in
    --save) save=1 ;;
    --cpu) cpu=1 ;;
    --debian) debian=1 ;;
    --lean) lean=1 ;;
    --flash-attn) flash_attn=1 ;;
    --wheelhouse) wheelhouse=${2?} && shift ;;
    *) break ;;
  esac
  shift
done
if [ $cpu -eq 1 ] && [ $((flash_attn + debian)) -gt 0 ]; then
  echo "build.sh: --flash-attn and --debian need the CUDA image (nvcc), not --cpu" >&2
  exit 2
fi

# The variant: its build arguments, its default wheelhouse and the suffix that keeps its tag apart.
if [ $cpu -eq 1 ]; then
  : "${wheelhouse:=wheelhouse-cpu}"
  variant=(--build-arg BASE_IMAGE=debian:bookworm-slim --build-arg PYTHON=python3.11
    --build-arg LOCK=requirements/cpu-py311.txt --build-arg WHEELS= --build-arg WITH_SGLANG=0 --build-arg COMPILER=)
  suffix=-cpu description="CPU" download=--cpu
else
  variant=(--build-arg "WITH_SGLANG=$((1 - lean))")
  if [ $debian -eq 1 ]; then
    : "${wheelhouse:=wheelhouse-debian}"
    variant+=(--build-arg BASE_IMAGE=debian:bookworm-slim --build-arg PYTHON=python3.11
      --build-arg LOCK=requirements/cuda-py311.txt --build-arg WHEELS= --build-arg CUDA_FROM_WHEELS=1
      --build-arg SGLANG_LOCK=requirements/sglang-cuda-py311.txt)
    suffix=-debian description="CUDA on Debian 12 (toolchain from PyPI)" download=--debian
  else
    : "${wheelhouse:=wheelhouse}"
    suffix="" description="CUDA" download=""
  fi
  if [ $lean -eq 1 ]; then
    suffix+=-lean description+=", lean (no SGLang)" download+=" --lean"
  else
    description+=", with SGLang"
  fi
fi
variant+=(--build-arg "WITH_FLASH_ATTN=$flash_attn")
if [ $flash_attn -eq 1 ]; then suffix+=-flash-attn description+=", flash-attn"; fi

tag=${IMAGE_TAG:-}
if [ -z "$tag" ]; then
  tag=$(git describe --tags --exact-match 2>/dev/null || git rev-parse --short HEAD)
  # A build from uncommitted changes must not pass for the commit.
  if [ -n "$(git status --porcelain --untracked-files=no)" ]; then tag=$tag-dirty; fi
  tag=$tag$suffix
fi
if [ "$tag" = latest ]; then
  echo "build.sh: refusing the tag 'latest': tag a commit (git tag v1.2.3) or set IMAGE_TAG" >&2
  exit 1
fi
if [ ! -d "$wheelhouse" ] || [ -z "$(find "$wheelhouse" -maxdepth 1 -name '*.whl' -print -quit)" ]; then
  echo "build.sh: $wheelhouse is empty: run ./download-packages.sh${download:+ $download} first" >&2
  exit 1
fi

# The build context, staged in out/: what .dockerignore lets through (its "!" lines) and the wheelhouse, which may
# then live anywhere. Its files are hard links (a copy across filesystems), so staging costs no space; a fixed path
# lets BuildKit send only what changed since the last build.
context=$root/out/build-context
stage_context() {
  rm -rf "$context"
  mkdir -p "$context/wheelhouse"
  cp .dockerignore "$context/"
  local entry
  while read -r entry; do
    entry=${entry#!}
    entry=${entry%/}
    if [ "$entry" != wheelhouse ]; then cp -a "$entry" "$context/"; fi
  done < <(grep '^!' .dockerignore)
  if ! cp -al "$wheelhouse/." "$context/wheelhouse/" 2>/dev/null; then
    echo "build.sh: copying $wheelhouse into the build context (it cannot be hard-linked from here)"
    rm -rf "$context/wheelhouse" && mkdir "$context/wheelhouse"
    cp -a "$wheelhouse/." "$context/wheelhouse/"
  fi
}
stage_context
trap 'rm -rf "$context"' EXIT

image=image-server:$tag
# The labels say which build this is, and make every tag its own image: two tags of equal content would otherwise
# share one image ID, and removing one would not remove the image.
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
labels=(--label "org.opencontainers.image.version=$tag" --label "org.opencontainers.image.revision=$revision")
echo "build.sh: building $image ($description) from $wheelhouse"
DOCKER_BUILDKIT=1 "$docker" build --progress=plain --build-arg "MAX_JOBS=${MAX_JOBS:-2}" "${variant[@]}" \
  "${labels[@]}" --file Dockerfile --tag "$image" "$@" "$context"

if [ $save -eq 1 ]; then
  mkdir -p out
  archive=out/image-server-$tag.tar.gz
  # pigz: the same gzip, on every core (a CUDA image is tens of GB: single-threaded gzip takes a quarter of an hour).
  gzip=gzip
  if command -v pigz >/dev/null; then gzip=pigz; fi
  echo "build.sh: saving $image with $gzip"
  "$docker" save "$image" | "$gzip" >"$archive.partial"
  mv "$archive.partial" "$archive"
  echo "build.sh: saved $image to $archive; copy it to the offline machine and run there:"
  echo "docker load -i $archive"
fi
