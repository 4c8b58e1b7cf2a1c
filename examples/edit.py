"""Edit an image with the official OpenAI SDK. Usage: python examples/edit.py INPUT.png [MASK.png] [OUT_FILE]"""

import base64
import os
import sys

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("BASE_URL", "http://localhost:8000") + "/v1",
    api_key=os.environ.get("OPENAI_API_KEY", "none"),
)
source = sys.argv[1]
mask = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
out = sys.argv[3] if len(sys.argv) > 3 else "edited.png"

kwargs = {"mask": (mask, open(mask, "rb").read(), "image/png")} if mask else {}  # noqa: SIM115
result = client.images.edit(
    image=[(source, open(source, "rb").read(), "image/png")],  # noqa: SIM115
    prompt="the same scene at night, lit by lanterns",
    output_format="png",
    extra_body={"strength": 0.8, "num_inference_steps": 8, "seed": 3},
    **kwargs,
)
with open(out, "wb") as f:
    f.write(base64.b64decode(result.data[0].b64_json))
print(out)
