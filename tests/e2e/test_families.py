"""Every model family through the real server: a tiny random-weight model of each (`--model demo:FAMILY`), one
server per family, driven by the OpenAI SDK and curl at 64x64 and 2 steps (4 for the stream: previews start
after the second step).

For an image family: a generation (the family found from model_index.json), n=2 (batched where the family
batches, one seed each), its images through the NSFW plugin and counted in /metrics, a stream with
partial_images=2, an edit where the family edits in this engine, a LoRA set restored bit for bit where diffusers
loads LoRAs for the family's pipeline, and a field the family does not take refused with a 400 naming it; for a
family that only edits (Qwen-Image-Edit) all of it through edits. FLUX.2 and Qwen-Image-Edit load their processors
without torchvision where it is missing (server/engines/processors.py), as here. For Wan 2.2 (videos go through
/v1/videos, tests/e2e/test_videos.py): the family in /v1/models and an image request refused naming the model."""

import json
import subprocess
from dataclasses import dataclass, field

import openai
import pytest
from transformers.utils import is_torchvision_available

from plugins.nsfw.demo import write_demo_classifier
from server.engines.demos import demo_model_path
from tests.support.images import assert_other_image, assert_same_image, decode_b64, gradient, pixels, png_bytes
from tests.support.loras import transformer_lora
from tests.support.server import CACHE_DIR, ServerProcess

FAST = {"num_inference_steps": 2, "seed": 5}


@dataclass(frozen=True)
class Case:
    demo: str
    family: str
    edits: bool = False
    loras: bool = True
    text2img: bool = True  # False: it only edits (its generations are refused: `refused`)
    refused: dict = field(default_factory=dict)  # a request field the family does not take -> the body sent
    stand_in: str = ""  # what its processor loads as where torchvision is missing (server/engines/processors.py)


CASES = [
    Case("flux1", "FLUX.1-dev", edits=True, refused={"size": {"size": "72x72"}}),
    Case("flux2", "FLUX.2-dev", edits=True, refused={"negative_prompt": {"negative_prompt": "blur"}},
         stand_in="PixtralTextProcessor"),
    Case("qwen-image", "Qwen-Image", edits=True, refused={"true_cfg_scale": {"true_cfg_scale": 4.0}}),
    Case("qwen-image-edit", "Qwen-Image-Edit-2509", edits=True, text2img=False, refused={"image": {}},
         stand_in="Qwen2VLProcessorWithoutVideo"),
    Case("z-image", "Z-Image", edits=True, refused={"true_cfg_scale": {"true_cfg_scale": 4.0}}),
    Case("glm-image", "GLM-Image", loras=False, refused={"size": {"size": "80x80"}}),  # multiples of 32
]  # fmt: skip


@pytest.fixture(scope="module")
def nsfw_model(tmp_path_factory):
    return write_demo_classifier(tmp_path_factory.mktemp("nsfw") / "nsfw_image_detection")


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.demo)
def served(request, tmp_path_factory, nsfw_model):
    """(case, server): one server per family, with the NSFW plugin (checks only when asked), and the LoRA plugin
    with one LoRA where the family takes LoRAs."""
    case = request.param
    env = {"MODEL_PATH": f"demo:{case.demo}", "MAX_BATCH": "2", "PLUGINS": "nsfw", "NSFW_CHECK": "false"}
    env["NSFW_MODEL_PATH"] = str(nsfw_model)
    if case.loras:
        loras = tmp_path_factory.mktemp("loras")
        transformer_lora(loras / "style.safetensors", demo_model_path(CACHE_DIR, case.demo), seed=1, scale=1.0)
        env.update(PLUGINS="nsfw,lora", LORA_DIR=str(loras))
    server = ServerProcess(env).start()
    yield case, server
    server.stop()


def generate(server, **fields) -> list:
    client = server.client(max_retries=0)
    body = {**FAST, **fields}
    result = client.images.generate(prompt="a fox", size="64x64", output_format="png", extra_body=body)
    return [pixels(decode_b64(item.b64_json)) for item in result.data]


def edits(server, **fields) -> list:
    client = server.client(max_retries=0)
    result = client.images.edit(
        image=("in.png", png_bytes(gradient(64, 64)), "image/png"), prompt="make it red", size="64x64",
        output_format="png", extra_body={**FAST, **fields},
    )  # fmt: skip
    return [pixels(decode_b64(item.b64_json)) for item in result.data]


def edit(server, **fields):
    return edits(server, **fields)[0]


def images(case: Case, server, **fields) -> list:
    """The family's images from a prompt, or for a family that only edits from a prompt and an input image."""
    return generate(server, **fields) if case.text2img else edits(server, **fields)


def test_the_family_is_found_from_its_model_index(served):
    case, server = served
    card = server.client(max_retries=0).models.list().data[0]
    assert card.model_extra["engine"]["family"] == case.family


def test_its_processor_loads_without_torchvision_logged_once(served):
    case, server = served
    if not case.stand_in or is_torchvision_available():
        pytest.skip("its processor loads as transformers' own class here")
    logs = server.logs()
    assert logs.count(f"is loaded as {case.stand_in}") == 1
    assert "WARNING transformers" not in logs  # nothing said per prompt (its warm-up's has been)


def test_a_generation_and_n_2_with_a_seed_each(served):
    case, server = served
    (one,) = images(case, server, seed=11)
    first, second = images(case, server, n=2, seed=11)
    assert one.shape == (64, 64, 3)
    assert_same_image(first, one)  # image i of n has seed + i, batched or not
    assert_other_image(first, second)


def test_its_images_go_through_the_post_processing_plugins_and_the_metrics(served):
    case, server = served
    client = server.client(max_retries=0)
    before = server.metric("image_server_images_total")
    body = {**FAST, "nsfw_check": True}
    if case.text2img:
        item = client.images.generate(prompt="a fox", size="64x64", extra_body=body).data[0]
    else:
        item = client.images.edit(image=("in.png", png_bytes(gradient(64, 64)), "image/png"), prompt="red",
                                  size="64x64", extra_body=body).data[0]  # fmt: skip
    assert 0.0 <= item.model_extra["nsfw_score"] <= 1.0
    assert server.metric("image_server_images_total") == before + 1


def test_a_stream_with_two_partial_images(served):
    case, server = served
    client, asked = server.client(max_retries=0), {"size": "64x64", "stream": True, "partial_images": 2}
    asked["extra_body"] = {"num_inference_steps": 4}
    if case.text2img:
        stream, kind = client.images.generate(prompt="a fox", **asked), "image_generation"
    else:
        image = ("in.png", png_bytes(gradient(64, 64)), "image/png")
        stream, kind = client.images.edit(image=image, prompt="make it red", **asked), "image_edit"
    types = [event.type for event in stream]
    assert types == [f"{kind}.partial_image"] * 2 + [f"{kind}.completed"]


def test_an_edit_where_the_family_edits(served):
    case, server = served
    if not case.text2img:
        pytest.skip("a family that only edits: its edits are the tests above")
    if not case.edits:
        with pytest.raises(openai.BadRequestError) as refused:
            edit(server)
        assert refused.value.body["param"] == "image"
        return
    changed = edit(server)
    assert changed.shape == (64, 64, 3)
    assert_same_image(edit(server), changed)  # seeded


def test_a_lora_set_and_the_exact_base_after_it(served):
    case, server = served
    if not case.loras:
        pytest.skip(f"diffusers has no LoRA loader for {case.family} (the lora plugin refuses it: test below)")
    (base,) = images(case, server)
    (styled,) = images(case, server, loras=[{"name": "style", "weight": 1.0}])
    assert (styled != base).any()
    assert (images(case, server, loras=[])[0] == base).all()  # the base weights back, bit for bit


def test_the_unsupported_field_is_refused(served):
    case, server = served
    ((param, body),) = case.refused.items()
    answer = subprocess.run(
        ["curl", "-s", f"{server.url}/v1/images/generations", "-H", "Content-Type: application/json",
         "-d", json.dumps({"prompt": "a fox", "size": "64x64", **FAST, **body})],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    error = json.loads(answer.stdout)["error"]
    assert error["param"] == param, error
    assert "Traceback" not in error["message"] and "/" not in error["message"].replace("/v1/", "")


def test_glm_image_with_the_lora_plugin_is_refused_at_startup_with_the_reason(make_server):
    server = make_server({"MODEL_PATH": "demo:glm-image", "PLUGINS": "lora"}, wait=False)
    assert server.proc.wait(timeout=300) != 0
    assert "no LoRA loader for GlmImagePipeline" in server.logs()


def test_flux2_with_the_first_block_cache_is_refused_at_startup_with_the_reason(make_server):
    """Its pipeline calls the transformer outside a cache context: every generation would fail (before: a traceback
    from the warm-up)."""
    server = make_server({"MODEL_PATH": "demo:flux2", "CACHE_THRESHOLD": "0.2"}, wait=False)
    assert server.proc.wait(timeout=300) != 0
    assert "CACHE_THRESHOLD: diffusers' Flux2Pipeline calls its transformer outside a cache context" in server.logs()
    assert "Traceback" not in server.logs()


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
