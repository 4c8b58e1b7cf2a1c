#!/usr/bin/env bash
# Pressure test at a fixed request rate: ./run_pressure_test.sh RPS [pressure.py options...]
# URL (default http://127.0.0.1:8000), DURATION (default 60 s) and MIX come from the environment. MIX defaults to
# auto: bench/mix-cpu.jsonl when the server runs on the CPU (the demo), else bench/mix-example.jsonl (1024x1024, 28
# steps). Any further option goes to bench/pressure.py (--count, --arrivals constant, --out DIR, ...).
set -euo pipefail
cd "$(dirname "$0")"
if [ $# -lt 1 ]; then
  echo "usage: $0 RPS [bench/pressure.py options]" >&2
  exit 2
fi
rps=$1
shift
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
exec "$python" bench/pressure.py --rps "$rps" --url "${URL:-http://127.0.0.1:8000}" \
  --duration "${DURATION:-60}" --mix "${MIX:-auto}" "$@"
