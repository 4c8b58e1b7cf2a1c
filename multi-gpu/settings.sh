# shellcheck shell=bash disable=SC2034  # the variables are for the scripts that source this
# Settings shared by multi-gpu/run.sh and multi-gpu/status.sh (sourced, not run), all from the environment:
#   GPUS          comma-separated GPU indexes, one instance each (default: every GPU nvidia-smi lists, else "0")
#   BASE_PORT     instance i listens on 127.0.0.1:BASE_PORT+i (default 8001)
#   NGINX_LISTEN  where nginx listens for clients, nginx `listen` syntax (default 8080: every address)
#   STATE_DIR     logs, pid files, the generated nginx.conf (default ~/.local/state/image-server-multi-gpu)
if [ -z "${GPUS:-}" ]; then
  GPUS=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    listed=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, -) || listed=""
    if [ -n "$listed" ]; then GPUS=$listed; fi
  fi
fi
IFS=, read -r -a gpu_list <<<"${GPUS// /}"
base_port=${BASE_PORT:-8001}
nginx_listen=${NGINX_LISTEN:-8080}
state_dir=${STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/image-server-multi-gpu}
