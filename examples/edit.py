"""Edit an image with the official OpenAI SDK.

Usage: .venv/bin/python examples/edit.py INPUT.png [MASK.png] [OUT_FILE]
"""

import base64
import os
import sys
from pathlib import Path

try:
    from openai import OpenAI
except ImportError:  # run by a Python other than the venv's
    sys.exit(f"{sys.argv[0]} needs the OpenAI SDK, which scripts/setup.sh installs: .venv/bin/python {sys.argv[0]}")

client = OpenAI(
    base_url=os.environ.get("BASE_URL", "http://localhost:8000") + "/v1",
    api_key=os.environ.get("OPENAI_API_KEY", "none"),
)
source = sys.argv[1]
mask = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
out = sys.argv[3] if len(sys.argv) > 3 else "edited.png"

kwargs = {"mask": Path(mask)} if mask else {}
result = client.images.edit(
    image=[Path(source)],
    prompt="the same scene at night, lit by lanterns",
    output_format="png",
    extra_body={"strength": 0.8, "num_inference_steps": 8, "seed": 3},
    **kwargs,
)
with open(out, "wb") as f:
    f.write(base64.b64decode(result.data[0].b64_json))
print(out)
