#!/usr/bin/env bash
# A Debian 12 base image made from Debian's own packages with mmdebstrap, for the CPU variant where no image registry
# is reachable (CI, an offline builder with a Debian mirror). Like debian:bookworm-slim: minbase, bookworm-updates and
# bookworm-security, no manuals or translations.
#
#   docker/debian-base.sh      prints the image's name, e.g. image-server-base:bookworm-3f2a1c9e0b7d
#   ./build.sh --cpu --build-arg BASE_IMAGE="$(docker/debian-base.sh)"
#
# Made once per machine: the tag carries a hash of the mmdebstrap command, so an existing image is reused and a changed
# command makes a new one. The Dockerfile runs apt-get update, so what it installs is current whatever the base's age;
# delete the image (docker rmi) to refresh the base itself.
# Needs root (mmdebstrap's root mode), mmdebstrap, and a docker daemon. Progress goes to stderr, the name to stdout.
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), DEBIAN_SECURITY_MIRROR, DOCKER (the CLI).
set -euo pipefail

docker=${DOCKER:-docker}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# What debian:bookworm-slim leaves out: manuals, documentation (but copyrights) and translations. The dpkg options
# stay in the image (/etc/dpkg/dpkg.cfg.d), so the Dockerfile's own apt-get install leaves them out too.
options=(
  --variant=minbase
  --aptopt='Acquire::Languages "none"'
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
)
sources=(
  "deb $mirror $suite main"
  "deb $mirror $suite-updates main"
  "deb $security $suite-security main"
)

key=$(printf '%s\n' "$suite" "${options[@]}" "${sources[@]}" | sha256sum | cut -c1-12)
image=image-server-base:$suite-$key
if "$docker" image inspect "$image" >/dev/null 2>&1; then
  echo "debian-base.sh: $image exists" >&2
  echo "$image"
  exit 0
fi

command -v mmdebstrap >/dev/null || { echo "debian-base.sh: needs mmdebstrap (apt-get install mmdebstrap)" >&2; exit 1; }
# Into a file, not a pipe: a failed mmdebstrap must not leave a half-made image behind.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "debian-base.sh: mmdebstrap $suite from $mirror (about a minute)" >&2
mmdebstrap --quiet "${options[@]}" "$suite" "$work/rootfs.tar" "${sources[@]}" >&2
"$docker" import --change 'CMD ["bash"]' "$work/rootfs.tar" "$image" >&2
echo "debian-base.sh: made $image" >&2
echo "$image"
