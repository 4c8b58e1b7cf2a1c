"""Every model family through the real server: a tiny random-weight model of each (`--model demo:FAMILY`), one
server per family, driven by the OpenAI SDK and curl at 64x64 and 2 steps.

For an image family: a generation, n=2 (batched, one seed each), a stream with partial_images=2, an edit where
the family edits, a LoRA set restored bit for bit where diffusers loads LoRAs for its pipeline, and a field the
family does not take refused with a 400 naming it. For Wan 2.2 (videos: /v1/videos, built elsewhere): the family
and its video rules in /v1/models, and an image request refused naming the model."""

import json
import subprocess

import openai
import pytest

from tests.conftest import ServerProcess

FAST = {"num_inference_steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def wan():
    server = ServerProcess({"MODEL_PATH": "demo:wan2.2", "MAX_BATCH": "2"}).start()
    yield server
    server.stop()


def test_wan_serves_as_a_video_family_and_refuses_images(wan):
    card = wan.client(max_retries=0).models.list().data[0]
    assert card.id == "wan2.2-demo"
    engine = card.model_extra["engine"]
    assert engine["family"] == "Wan2.2-TI2V" and engine["pipeline"] == "WanPipeline"
    assert engine["modes"] == ["img2img", "text2img"]  # text to video, image to video
    with pytest.raises(openai.BadRequestError) as refused:
        wan.client(max_retries=0).images.generate(prompt="a fox", size="64x64", extra_body=FAST)
    assert refused.value.body["param"] == "model" and "/v1/videos" in refused.value.body["message"]
    answer = subprocess.run(
        ["curl", "-s", f"{wan.url}/v1/images/generations", "-H", "Content-Type: application/json",
         "-d", json.dumps({"prompt": "a fox", "size": "64x64"})],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(answer.stdout)["error"]["param"] == "model"
