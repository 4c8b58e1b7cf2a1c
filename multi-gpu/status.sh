#!/usr/bin/env bash
# How each instance of multi-gpu/run.sh is doing: readiness, requests queued and in flight, GPU memory.
#
#   multi-gpu/status.sh            (with the same GPUS / BASE_PORT / NGINX_LISTEN as run.sh)
#
# Exits 0 when nginx answers and every instance is ready, 1 otherwise (usable as a check).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=multi-gpu/settings.sh
source "$here/settings.sh"

# A gauge's value from Prometheus text, as an integer; "-" when absent.
gauge() {
  awk -v name="$1" '$1 == name { printf "%d", $2; found = 1 } END { if (!found) printf "-" }' <<<"$2"
}

gpu_memory() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader,nounits -i "$1" 2>/dev/null \
      | awk -F', *' '{ printf "%s/%s MiB", $1, $2 }' || printf "?"
  else
    printf "n/a (no nvidia-smi)"
  fi
}

all_ready=1
printf '%-9s %-4s %-16s %-10s %-6s %-10s %s\n' instance gpu address ready queue in_flight gpu_memory
for i in "${!gpu_list[@]}"; do
  gpu=${gpu_list[$i]}
  address=127.0.0.1:$((base_port + i))
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "http://$address/ready" || true)
  case $code in
    200) ready=yes ;;
    503) ready=no ;;  # loading the model, or draining
    *) ready=down ;;
  esac
  [ "$ready" = yes ] || all_ready=0
  metrics=$(curl -s --max-time 3 "http://$address/metrics" || true)
  printf '%-9s %-4s %-16s %-10s %-6s %-10s %s\n' "$i" "$gpu" "$address" "$ready" \
    "$(gauge image_server_queue_depth "$metrics")" "$(gauge image_server_in_flight "$metrics")" "$(gpu_memory "$gpu")"
done

# nginx's listen may be "8080" or "addr:8080"; ask it on loopback when no address is given.
front=$nginx_listen
[[ $front == *:* ]] || front=127.0.0.1:$front
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "http://$front/health" || true)
echo "nginx on $nginx_listen: $([ "$code" = 200 ] && echo up || echo "down (HTTP $code)")"
[ "$code" = 200 ] || all_ready=0
[ $all_ready -eq 1 ]
