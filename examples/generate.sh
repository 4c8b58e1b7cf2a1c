#!/usr/bin/env bash
# Generate an image with curl and save it. Usage: examples/generate.sh [OUT_FILE]
# BASE_URL (default http://localhost:8000) and OPENAI_API_KEY (if the server wants one) come from the environment.
set -euo pipefail
base_url=${BASE_URL:-http://localhost:8000}
out=${1:-generated.jpeg}

curl -sS --fail-with-body "$base_url/v1/images/generations" \
  -H "Content-Type: application/json" \
  -H "Authorization: Bearer ${OPENAI_API_KEY:-none}" \
  -d '{
        "model": "flux",
        "prompt": "a lighthouse on a cliff at dawn, watercolor",
        "size": "512x512",
        "n": 1,
        "output_format": "jpeg",
        "output_compression": 80,
        "num_inference_steps": 8,
        "seed": 1234
      }' \
  | python3 "$(dirname "$0")/save.py" "$out"
