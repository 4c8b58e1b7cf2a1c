#!/usr/bin/env bash
# Stream a generation with curl: partial images as they form, then the finished one, saved as they arrive
# (OUT_PREFIX-partial-0.jpeg, ..., OUT_PREFIX.jpeg). Usage: examples/stream.sh [OUT_PREFIX]
# BASE_URL (default http://localhost:8000) and OPENAI_API_KEY (if the server wants one) come from the environment.
set -euo pipefail
base_url=${BASE_URL:-http://localhost:8000}
prefix=${1:-streamed}

# -N: no buffering, each event is handled as it arrives. Events are "event: <type>" then "data: <json>".
curl -sSN --fail-with-body "$base_url/v1/images/generations" \
  -H "Content-Type: application/json" \
  -H "Authorization: Bearer ${OPENAI_API_KEY:-none}" \
  -d '{
        "model": "flux",
        "prompt": "a lighthouse on a cliff at dawn, watercolor",
        "size": "512x512",
        "stream": true,
        "partial_images": 2,
        "num_inference_steps": 12,
        "seed": 1234
      }' \
  | python3 -u -c '
import base64, json, sys
prefix = sys.argv[1]
for line in sys.stdin:
    if not line.startswith("data: {"):
        continue  # event names, keep-alive comments, [DONE]
    event = json.loads(line[6:])
    if event.get("type") == "error" or "error" in event:
        sys.exit(f"error: {event}")
    index = event.get("partial_image_index")
    name = f"{prefix}.jpeg" if index is None else f"{prefix}-partial-{index}.jpeg"
    open(name, "wb").write(base64.b64decode(event["b64_json"]))
    print(event["type"], name, flush=True)
' "$prefix"
