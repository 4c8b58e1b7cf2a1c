"""Every error path: OpenAI's body shape and status, surfacing as the SDK's exception classes."""

import httpx
import openai
import pytest

from tests.support.images import assert_openai_shape

FAST = {"num_inference_steps": 2}


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"prompt": "x", "n": 11}, "n"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "size": "100x100"}, "size"),
        ({"prompt": "x", "size": "banana"}, "size"),
        ({"prompt": "x", "size": "4096x4096"}, "size"),
        ({"prompt": "x", "size": "32x32"}, "size"),
        ({"prompt": "x", "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "output_compression": 101}, "output_compression"),
        ({"prompt": "x", "response_format": "binary"}, "response_format"),
        ({"prompt": "x", "background": "transparent"}, "background"),
        ({"prompt": "x", "extra_body": {"seed": [1, 2]}}, "seed"),
        ({"prompt": "x", "extra_body": {"seed": -1}}, "seed"),
        ({"prompt": "x", "extra_body": {"num_inference_steps": 1000}}, "num_inference_steps"),
        ({"prompt": "x", "extra_body": {"guidance_scale": "high"}}, "guidance_scale"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "quality": "ultra"}, "quality"),
        ({"prompt": "x", "style": "gothic"}, "style"),
        ({"prompt": "x", "moderation": "none"}, "moderation"),
        ({"prompt": "x", "extra_body": {"partial_images": 4}}, "partial_images"),
    ],
)
def test_bad_generation_input_is_a_400_naming_the_param(client, kwargs, param):
    kwargs.setdefault("size", "256x256")
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(**kwargs)
    assert err.value.status_code == 400
    error = assert_openai_shape(err.value.response.json())
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_missing_prompt(server):
    response = httpx.post(server.url + "/v1/images/generations", json={"size": "256x256"})
    assert response.status_code == 400
    assert assert_openai_shape(response.json())["param"] == "prompt"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_unparseable_body_is_a_400(server, body):
    response = httpx.post(
        server.url + "/v1/images/generations", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert assert_openai_shape(response.json())["code"] == "invalid_json"


def test_404_and_405_have_openai_shape(server, client):
    response = httpx.get(server.url + "/v1/nothing-here")
    assert response.status_code == 404
    assert assert_openai_shape(response.json())["code"] == "not_found"
    response = httpx.get(server.url + "/v1/images/generations")
    assert response.status_code == 405
    assert assert_openai_shape(response.json())["code"] == "method_not_allowed"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert httpx.get(server.url + "/v1/images/AAAAAAAAAAAAAAAAAAAAAA.png").status_code == 404


def test_rejected_requests_change_nothing(server, client):
    images_before = server.metric("image_server_images_total")
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="x", size="100x100")
    assert server.metric("image_server_images_total") == images_before
    assert server.metric("image_server_queue_depth") == 0


def test_oversized_body_is_refused_before_it_is_read(make_server):
    srv = make_server({"MAX_BODY_MB": "1"})
    big = b'{"prompt": "' + b"x" * (2 * 2**20) + b'"}'
    response = httpx.post(srv.url + "/v1/images/generations", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert assert_openai_shape(response.json())["code"] == "request_too_large"

    def chunks():  # no Content-Length: refused as soon as the count passes the limit
        yield b'{"prompt": "'
        for _ in range(64):
            yield b"x" * 65536
        yield b'"}'

    response = httpx.post(
        srv.url + "/v1/images/generations", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    with pytest.raises(openai.APIStatusError) as err:
        srv.client(max_retries=0).images.generate(prompt="x" * (2 * 2**20), size="256x256")
    assert err.value.status_code == 413


def test_auth(make_server):
    srv = make_server({"API_KEY": "key-one, key-two"})
    with pytest.raises(openai.AuthenticationError) as err:
        srv.client(api_key="wrong", max_retries=0).images.generate(prompt="x", size="256x256")
    assert err.value.status_code == 401
    assert assert_openai_shape(err.value.response.json())["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        srv.client(api_key="wrong", max_retries=0).models.list()
    response = httpx.post(srv.url + "/v1/images/generations", json={"prompt": "x"})
    assert response.status_code == 401
    assert assert_openai_shape(response.json())["code"] == "missing_api_key"
    for key in ("key-one", "key-two"):
        assert srv.client(api_key=key).images.generate(prompt="x", size="256x256", extra_body=FAST).data
    for open_path in ("/health", "/ready", "/metrics"):
        assert httpx.get(srv.url + open_path).status_code == 200
