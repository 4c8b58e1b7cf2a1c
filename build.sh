#!/usr/bin/env bash
# Build the image, tagged image-server:<git tag of HEAD, else its short hash>, from wheelhouse/ (fill it first with
# ./download-packages.sh). Never tags `latest`: a tag names exactly one build, which is what a rollout needs.
#
#   ./build.sh [--save] [extra docker build flags...]
#
#   --save   also write out/image-server-<tag>.tar.gz (docker save) for an offline cluster, and print the
#            `docker load` line that brings it in there.
# Environment: IMAGE_TAG overrides the tag; MAX_JOBS (default 2) bounds the compile jobs of any sdist built.
set -euo pipefail
root=$(cd "$(dirname "$0")" && pwd)
cd "$root"

save=0
if [ "${1:-}" = "--save" ]; then
  save=1
  shift
fi

tag=${IMAGE_TAG:-}
if [ -z "$tag" ]; then
  tag=$(git describe --tags --exact-match 2>/dev/null || git rev-parse --short HEAD)
  # A build from uncommitted changes must not pass for the commit.
  if [ -n "$(git status --porcelain --untracked-files=no)" ]; then tag=$tag-dirty; fi
fi
if [ "$tag" = latest ]; then
  echo "build.sh: refusing the tag 'latest': tag a commit (git tag v1.2.3) or set IMAGE_TAG" >&2
  exit 1
fi
if [ ! -d wheelhouse ] || [ -z "$(find wheelhouse -maxdepth 1 -name '*.whl' -print -quit)" ]; then
  echo "build.sh: wheelhouse/ is empty: run ./download-packages.sh first" >&2
  exit 1
fi

image=image-server:$tag
echo "build.sh: building $image"
docker build --progress=plain --build-arg "MAX_JOBS=${MAX_JOBS:-2}" --tag "$image" "$@" .

if [ $save -eq 1 ]; then
  mkdir -p out
  archive=out/image-server-$tag.tar.gz
  docker save "$image" | gzip >"$archive.partial"
  mv "$archive.partial" "$archive"
  echo "build.sh: saved $image to $archive; copy it to the offline machine and run there:"
  echo "docker load -i $archive"
fi
