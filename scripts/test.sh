#!/usr/bin/env bash
# Set up (if needed) and run the tests. Extra arguments go to pytest.
#
#   scripts/test.sh               the whole suite, as CI runs it (.ci/run): sets up everything it needs
#                                 (scripts/setup.sh --test: nginx, Docker, mmdebstrap, the e2e tools)
#   scripts/test.sh tests/unit    the in-process tier alone (or any paths inside it): sets up only what it needs
#                                 (scripts/setup.sh --unit: no system package, no e2e tool)
set -euo pipefail
cd "$(dirname "$0")/.."

# --unit when every path among the arguments is inside tests/unit (options and their values are not paths).
tier=--test
for arg in "$@"; do
  path=${arg%%::*} # tests/unit/test_x.py::test_y
  [ -e "$path" ] || continue
  case "$(realpath --relative-to=. "$path")/" in
    tests/unit/*) tier=--unit ;;
    *)
      tier=--test
      break
      ;;
  esac
done

scripts/setup.sh "$tier"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# The in-process tier alone runs on every core (pytest-xdist); the whole suite runs in one process, as its
# real servers and timing-bound checks need the machine's cores to themselves.
parallel=()
[ "$tier" = --unit ] && parallel=(-n auto)
# The slowest tests are listed at the end: what to look at when the suite grows past its time.
exec .venv/bin/python -m pytest -q -ra --durations=25 "${parallel[@]}" "$@"
