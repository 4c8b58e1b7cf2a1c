#!/usr/bin/env bash
# Edit an image with curl (multipart, as the OpenAI docs show). Usage: examples/edit.sh INPUT.png [MASK.png] [OUT_FILE]
# The mask is a PNG whose fully transparent pixels mark the area to repaint.
set -euo pipefail
base_url=${BASE_URL:-http://localhost:8000}
input=${1:?usage: edit.sh INPUT.png [MASK.png] [OUT_FILE]}
mask=${2:-}
out=${3:-edited.png}

args=(-F "image[]=@$input" -F "prompt=the same scene in winter, snow falling" -F "output_format=png"
      -F "num_inference_steps=8" -F "strength=0.8" -F "seed=7")
if [ -n "$mask" ]; then
  args+=(-F "mask=@$mask")
fi

curl -sS --fail-with-body "$base_url/v1/images/edits" \
  -H "Authorization: Bearer ${OPENAI_API_KEY:-none}" \
  "${args[@]}" \
  | python3 "$(dirname "$0")/save.py" "$out"
