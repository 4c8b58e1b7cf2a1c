#!/usr/bin/env bash
# Container entrypoint: create the state folders (an emptyDir mounted on /app/state starts empty), then become
# `image-server serve`, configured by the environment (MODEL_PATH, PORT, API_KEY, ...; see README.md).
# `exec` makes the server the container's main process, so the SIGTERM of `docker stop` or the kubelet reaches it
# and it drains (DRAIN_TIMEOUT) before exiting.
#   no arguments, or flags   -> image-server serve [flags]
#   anything else            -> run it instead (e.g. `bash` to look inside the image)
set -euo pipefail

for dir in "${HOME:-}" "${XDG_CACHE_HOME:-}" "${HF_HOME:-}" "${TORCH_HOME:-}" "${TORCHINDUCTOR_CACHE_DIR:-}" \
  "${TRITON_CACHE_DIR:-}" "${CUDA_CACHE_PATH:-}" "${CACHE_DIR:-}" "${IMAGE_DIR:-}"; do
  if [ -n "$dir" ]; then mkdir -p "$dir"; fi
done

if [ $# -eq 0 ] || [ "${1#-}" != "$1" ]; then
  exec image-server serve "$@"
fi
exec "$@"
