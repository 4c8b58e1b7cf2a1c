"""Generate images with the official OpenAI SDK. Usage: .venv/bin/python examples/generate.py [OUT_PREFIX]

Extensions (seed, num_inference_steps, ...) go in `extra_body`.
"""

import base64
import os
import sys

try:
    from openai import OpenAI
except ImportError:  # run by a Python other than the venv's
    sys.exit(f"{sys.argv[0]} needs the OpenAI SDK, which scripts/setup.sh installs: .venv/bin/python {sys.argv[0]}")

client = OpenAI(
    base_url=os.environ.get("BASE_URL", "http://localhost:8000") + "/v1",
    api_key=os.environ.get("OPENAI_API_KEY", "none"),
)
prefix = sys.argv[1] if len(sys.argv) > 1 else "generated"

result = client.images.generate(
    model="flux",
    prompt="a red fox in fresh snow, golden hour",
    size="512x512",
    n=2,
    output_format="png",
    extra_body={"seed": 42, "num_inference_steps": 8, "negative_prompt": "blurry"},
)
for i, image in enumerate(result.data):
    path = f"{prefix}-{i}.png"
    with open(path, "wb") as f:
        f.write(base64.b64decode(image.b64_json))
    print(path, "seed", image.model_extra["seed"])
