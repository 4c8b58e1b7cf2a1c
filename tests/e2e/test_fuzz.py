"""Fuzzing the real server with hypothesis: generated hostile bodies, forms and LoRA files.

Whatever arrives, the answer is never a 5xx, every error has OpenAI's shape, and the server still serves. The
server runs with tiny limits (64x64, two steps) so that what is accepted costs little, and every plugin with
request fields is on, so that their fields are fuzzed too. Bounded: a fixed number of examples per test.
"""

import io
import json

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from plugins.lora.demo import INNER
from tests.support.images import assert_openai_shape, gradient, png_bytes

EXAMPLES = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

FIELDS = [
    "prompt", "model", "n", "size", "quality", "response_format", "output_format", "output_compression",
    "background", "moderation", "style", "user", "stream", "partial_images", "negative_prompt",
    "num_inference_steps", "guidance_scale", "true_cfg_scale", "seed", "strength", "input_fidelity", "images",
    "mask", "loras", "upscale", "upload_urls",
]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["64x64", "auto", "16x4096", "0x0", "png", "jpeg", "webp", "b64_json", "url", "high",
                       "data:image/png;base64,AAAA", "https://[::1/x", "https://169.254.169.254/", "style", "\x00"])
)  # fmt: skip
keys = st.sampled_from(["name", "weight", "image_url", "file_id", "x"])
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=3), max_leaves=12
)
bodies = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=40)}, optional={f: values for f in FIELDS if f != "prompt"}
)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from tests.support.loras import peft_lora
    from tests.support.server import ServerProcess

    loras = tmp_path_factory.mktemp("loras")
    peft_lora(loras / "style.safetensors", seed=1)
    limits = {
        "MAX_PIXELS": "4096",
        "MIN_PIXELS": "256",
        "MAX_SIDE": "64",
        "DEFAULT_SIZE": "64x64",
        "MAX_STEPS": "2",
        "DEFAULT_STEPS": "1",
    }
    srv = ServerProcess(
        {**limits, "PLUGINS": "lora,upscale,upload", "LORA_DIR": str(loras), "MAX_OUTPUT_PIXELS": "65536",
         "REQUEST_TIMEOUT": "60", "UPLOAD_TIMEOUT": "1", "UPLOAD_RETRIES": "0"}
    ).start()  # fmt: skip
    yield srv
    answered = httpx.get(srv.url + "/metrics").text.splitlines()
    srv.stop()
    assert not [line for line in answered if 'route="/v1/' in line and 'status="5' in line], "a 5xx was answered"


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code != 200:
        assert_openai_shape(response.json())


@EXAMPLES
@given(body=bodies)
def test_generation_bodies(fuzz_server, body):
    check(httpx.post(fuzz_server.url + "/v1/images/generations", json=body, timeout=60))


@EXAMPLES
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_raw_bytes_as_json(fuzz_server, raw):
    headers = {"content-type": "application/json"}
    check(httpx.post(fuzz_server.url + "/v1/images/generations", content=raw, headers=headers, timeout=60))


form_keys = st.sampled_from(FIELDS) | st.sampled_from(
    ["prompt[]", "loras[][name]", "loras[]", "loras[name]", "seed[]", "x[y]"]
)
image_bytes = st.sampled_from(
    [png_bytes(gradient(64, 64)), png_bytes(gradient(1, 300)), b"", b"\x89PNG\r\n\x1a\n"]
) | st.binary(max_size=200)


@EXAMPLES
@given(
    fields=st.lists(
        st.tuples(form_keys, st.text(max_size=20) | st.sampled_from(["[]", "{}", "[1]", '{"a": 1}', "64x64"])),
        max_size=8,
    ),
    images=st.lists(image_bytes, max_size=3),
    mask=st.none() | image_bytes,
)
def test_edit_forms(fuzz_server, fields, images, mask):
    files = [("image[]", ("x.png", data, "image/png")) for data in images]
    if mask is not None:
        files.append(("mask", ("m.png", mask, "image/png")))
    data: dict[str, list[str]] = {"prompt": ["p"]}
    for key, value in fields:  # repeated and clashing names, as a form can carry them
        data.setdefault(key, []).append(value)
    check(httpx.post(fuzz_server.url + "/v1/images/edits", data=data, files=files or None, timeout=60))


lora_keys = st.sampled_from(
    [
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
        "transformer.transformer_blocks.0.attn.to_q.lora_B.bias",
        "transformer.transformer_blocks.0.attn.to_q.alpha",
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight",
        "lora_unet_double_blocks_0_img_attn_qkv.alpha",
        "unet.x.lora_A.weight",
        "nonsense",
    ]
)
tensors = st.tuples(
    st.lists(st.integers(min_value=0, max_value=3 * INNER), max_size=3),
    st.sampled_from([torch.float32, torch.float16, torch.int64]),
    st.sampled_from([0.0, 1.0, float("nan"), float("inf")]),
)


def _tensor(shape, dtype, fill) -> torch.Tensor:
    if (dtype == torch.int64 and fill != fill) or fill in (float("inf"),):
        fill = 1
    return torch.full(shape, fill, dtype=dtype)


@EXAMPLES
@given(
    state=st.dictionaries(lora_keys, tensors, min_size=1, max_size=5),
    metadata=st.none()
    | st.sampled_from(["{", "[1]", '{"transformer.lora_alpha": "x"}', '{"transformer.lora_alpha": -1}']),
)
def test_lora_files(fuzz_server, state, metadata):
    buffer = save(
        {k: _tensor(*v) for k, v in state.items()}, metadata={"lora_adapter_metadata": metadata} if metadata else None
    )
    files = {"file": ("fuzz.safetensors", io.BytesIO(buffer).getvalue())}
    response = httpx.post(fuzz_server.url + "/v1/loras", files=files, data={"name": "fuzz"}, timeout=60)
    check(response)
    if response.status_code == 200:  # it applies: use it, then make room for the next example
        body = {"prompt": "x", "size": "64x64", "loras": [{"name": "fuzz"}], "num_inference_steps": 1}
        check(httpx.post(fuzz_server.url + "/v1/images/generations", json=body, timeout=60))
        assert httpx.delete(fuzz_server.url + "/v1/loras/fuzz").status_code == 200


def test_the_server_still_serves_after_the_fuzzing(fuzz_server):
    body = {"prompt": "x", "size": "64x64", "num_inference_steps": 2}
    response = httpx.post(fuzz_server.url + "/v1/images/generations", json=body, timeout=60)
    assert response.status_code == 200 and json.loads(response.text)["data"]
