#!/usr/bin/env bash
# Set up (if needed) and serve the embedded demo model on http://localhost:8000. Extra flags go to `image-server serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/image-server serve --model demo "$@"
