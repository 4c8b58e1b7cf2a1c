"""server/protocol.py: strict request types and multipart forms converted by each field's declared type.

Every field of the request models, the plugins' included, is checked property-wise; the cases the SDK and curl
send go through the real app (a fake engine) behind uvicorn on loopback, as JSON and as multipart forms.
"""

import base64
import json
import subprocess
import typing

import openai
import pytest
from pydantic import BaseModel

from server.app import create_app
from server.config import from_env
from server.errors import APIError
from server.plugins import discover
from server.protocol import _members, field_keys, form_payload, request_models
from server.service import validate
from tests.support.fakes import FakeEngine
from tests.support.images import assert_openai_shape, decode_b64, gradient, png_bytes
from tests.support.loopback import exchange, serving
from tests.support.waiting import until

GENERATION, EDIT = request_models([cls.fields for cls in discover().values() if cls.fields is not None])
EXAMPLES = {bool: True, int: 2, float: 2.5, str: "2", list: [], dict: {}}  # one value of each JSON kind


def admitted(annotation) -> set[type]:
    """The JSON kinds a field's type takes (a float field takes integers: JSON does not tell them apart)."""
    kinds = set()
    for member in _members(annotation):
        origin = typing.get_origin(member)
        if origin is typing.Literal:
            kinds |= {type(v) for v in typing.get_args(member)}
        elif origin is list:
            kinds.add(list)
        elif isinstance(member, type) and issubclass(member, BaseModel):
            kinds.add(dict)
        elif member in (bool, int, str, list, dict):
            kinds.add(member)
        elif member is float:
            kinds |= {float, int}
    return kinds


FIELDS = [(key, info.annotation) for key, info in field_keys(EDIT).items() if key != "prompt"]
WRONG = [
    (key, value) for key, annotation in FIELDS for kind, value in EXAMPLES.items() if kind not in admitted(annotation)
]


@pytest.mark.parametrize(("key", "value"), WRONG, ids=[f"{k}={v!r}" for k, v in WRONG])
def test_every_field_refuses_every_json_kind_it_does_not_declare(key, value):
    """`true` is not 1, "2" is not 2, 2.5 is not an integer: OpenAI's 400s, for the plugins' fields too."""
    with pytest.raises(APIError) as err:
        validate(EDIT, {"prompt": "p", key: value})
    keys = field_keys(EDIT)
    same_field = {k for k, info in keys.items() if info is keys[key]}  # its name and its aliases
    assert err.value.status == 400
    assert err.value.param.split("[")[0].split(".")[0] in same_field, err.value.message


def test_the_wrong_kinds_cover_every_field():
    assert {key for key, _ in WRONG} == {key for key, _ in FIELDS}
    assert {"upscale", "loras", "upload_urls", "nsfw_check"} <= {key for key, _ in WRONG}  # plugins' fields


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"n": "2", "stream": "true", "guidance_scale": "2.5", "seed": "7"}, {"n": 2, "stream": True}),
        ({"upscale": "2", "nsfw_check": "false"}, {"upscale": 2, "nsfw_check": False}),
        ({"seed": ["1", "2"], "n": "2"}, {"seed": [1, 2]}),  # seed[]=1, seed[]=2
        ({"loras": [{"name": "a", "weight": "0.5"}]}, {"loras": [{"name": "a", "weight": 0.5}]}),  # loras[][...]
        ({"loras": '[{"name": "a", "weight": 1}]'}, {"loras": [{"name": "a", "weight": 1.0}]}),  # JSON by hand
        ({"upload_urls": '["https://x/1"]'}, {"upload_urls": ["https://x/1"]}),
        ({"prompt": "[not a list]", "model": "123", "user": "true"}, {"prompt": "[not a list]", "user": "true"}),
        ({"n": "", "quality": "", "response_format": "null"}, {"n": None, "quality": None}),  # a form's nulls
    ],
    ids=["numbers", "plugins", "list-items", "objects", "json-list", "json-strings", "free-text", "nulls"],
)
def test_form_text_is_converted_by_the_declared_type(fields, expected):
    request = validate(EDIT, {"prompt": "p", **fields}, form=True)
    assert {k: v for k, v in request.model_dump(exclude_unset=True).items() if k in expected} == expected


@pytest.mark.parametrize(
    ("key", "text", "words"),
    [("n", "2.0", "integer"), ("n", "true", "integer"), ("n", "two", "integer"), ("stream", "yes", "boolean"),
     ("stream", "True", "boolean"), ("upscale", "3", "1, 2 or 4"), ("upscale", "2.0", "integer"),
     ("guidance_scale", "nan", "number"), ("seed", "[1, true]", "integer"), ("nsfw_check", "1", "boolean"),
     ("loras", "x", "list")],
)  # fmt: skip
def test_form_text_that_is_not_its_type_is_a_400_naming_the_field(key, text, words):
    with pytest.raises(APIError) as err:
        validate(EDIT, {"prompt": "p", key: text}, form=True)
    assert err.value.status == 400 and err.value.param.split("[")[0] == key
    assert words in err.value.message, err.value.message


def test_unknown_form_fields_stay_as_sent():
    assert form_payload(EDIT, {"not_a_field": "2", "n": "2"}) == {"not_a_field": "2", "n": 2}


# -- the SDK and curl, through the app behind uvicorn ---------------------------------------


class Served:
    def __init__(self, url: str, engine: FakeEngine) -> None:
        self.url = url
        self.engine = engine

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def curl(self, path: str, *args: str) -> tuple[int, str]:
        out = subprocess.run(
            ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args, self.url + path],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        body, _, status = out.stdout.rpartition("\n")
        return int(status), body


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine()
    settings = from_env(warmup=False, plugins="upscale,upload", default_size="64x64", min_pixels=256)
    with serving(create_app(settings, engine=engine), settings) as url:
        srv = Served(url, engine)
        until(lambda: srv.curl("/ready")[0] == 200, 30, "the app to be ready")
        yield srv


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "x.png"
    path.write_bytes(png_bytes(gradient(64, 64)))
    return path


LAX = [
    ({"n": True}, "n"),
    ({"seed": True}, "seed"),
    ({"n": "2"}, "n"),
    ({"num_inference_steps": 2.0}, "num_inference_steps"),
    ({"output_compression": True}, "output_compression"),
    ({"stream": "yes"}, "stream"),
    ({"upscale": True}, "upscale"),
    ({"upscale": 2.0}, "upscale"),
    ({"size": "６４x６４"}, "size"),
    ({"size": "١٢٨x١٢٨"}, "size"),
    ({"size": "064x64"}, "size"),
    ({"size": "64x64\n"}, "size"),
    ({"size": "64X64"}, "size"),
]


@pytest.mark.parametrize(("body", "param"), LAX, ids=[json.dumps(b, ensure_ascii=False) for b, _ in LAX])
def test_json_that_is_not_the_declared_type_is_a_400_through_the_sdk_and_curl(served, body, param):
    before = len(served.engine.calls)
    with pytest.raises(openai.BadRequestError) as err:
        served.client().images.generate(prompt="p", extra_body=body)
    assert err.value.body["param"] == param
    status, answer = served.curl(
        "/v1/images/generations", "-H", "Content-Type: application/json", "-d", json.dumps({"prompt": "p", **body})
    )
    assert status == 400 and assert_openai_shape(json.loads(answer))["param"] == param
    assert len(served.engine.calls) == before  # nothing was generated


def test_a_multipart_edit_through_the_sdk_converts_every_field_by_its_type(served, picture):
    before = len(served.engine.calls)
    result = served.client().images.edit(
        image=picture.open("rb"),
        prompt="p",
        n=2,
        stream=False,
        extra_body={"upscale": 2, "seed": [3, 4], "guidance_scale": 2.5, "num_inference_steps": 3},
    )
    assert [decode_b64(d.b64_json).size for d in result.data] == [(128, 128)] * 2
    assert [d.model_extra["seed"] for d in result.data] == [3, 4]
    spec = served.engine.calls[before].specs[0]
    assert (spec.guidance, spec.steps, spec.mode) == (2.5, 3, "img2img")


def test_a_multipart_edit_through_curl_takes_the_upscale_it_is_sent(served, picture):
    """The issue's report: `-F upscale=2` answered "Input should be 1, 2 or 4"; the same edit as JSON worked."""
    status, body = served.curl("/v1/images/edits", "-F", f"image=@{picture}", "-F", "prompt=x", "-F", "upscale=2")
    assert status == 200, body
    assert json.loads(body)["size"] == "128x128"
    data_url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    as_json = json.dumps({"prompt": "x", "upscale": 2, "images": [{"image_url": data_url}]})
    status, body = served.curl("/v1/images/edits", "-H", "Content-Type: application/json", "-d", as_json)
    assert status == 200 and json.loads(body)["size"] == "128x128"


@pytest.mark.parametrize(
    ("field", "param", "words"),
    [("upscale=3", "upscale", "1, 2 or 4"), ("n=true", "n", "integer"), ("n=2.0", "n", "integer"),
     ("stream=yes", "stream", "boolean"), ("size=064x64", "size", "'064x64'"),
     ("upload_urls=[\"http://10.0.0.1/x\"]", "upload_urls[0]", "https")],
)  # fmt: skip
def test_a_multipart_field_that_is_not_its_type_is_a_400_whose_message_fits_the_value(
    served, picture, field, param, words
):
    status, body = served.curl("/v1/images/edits", "-F", f"image=@{picture}", "-F", "prompt=x", "-F", field)
    error = assert_openai_shape(json.loads(body))
    assert status == 400 and error["param"] == param and words in error["message"], error


def test_a_multipart_prompt_that_looks_like_json_stays_text(served, picture):
    before = len(served.engine.calls)
    status, body = served.curl("/v1/images/edits", "-F", f"image=@{picture}", "-F", "prompt=[1, 2]")
    assert status == 200, body
    assert served.engine.calls[before].specs[0].prompt == "[1, 2]"


def test_a_multipart_stream_through_curl(served, picture):
    status, body = served.curl("/v1/images/edits", "-F", f"image=@{picture}", "-F", "prompt=x", "-F", "stream=true")
    assert status == 200 and "event: image_edit.completed" in body


@pytest.mark.parametrize(
    ("content_type", "status"),
    [("APPLICATION/JSON", 200), ("application/json; charset=utf-8", 200), ("Application/Json ; charset=UTF-8", 200),
     ("application/jsonx", 400), ("text/json", 400), ("application/json-patch+json", 400)],
)  # fmt: skip
def test_json_edits_are_told_by_their_media_type_case_insensitively(served, picture, content_type, status):
    data_url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    body = json.dumps({"prompt": "x", "images": [{"image_url": data_url}]})
    answer = served.curl("/v1/images/edits", "-H", f"Content-Type: {content_type}", "-d", body)
    assert answer[0] == status, answer[1]
    if status == 400:
        assert json.loads(answer[1])["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_probes_answer_head_as_get_without_a_body(served, path):
    head = subprocess.run(["curl", "-sS", "-I", served.url + path], capture_output=True, text=True, check=True)
    assert head.stdout.startswith("HTTP/1.1 200 OK"), head.stdout
    raw = exchange(served.url, f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    get = exchange(served.url, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert raw.endswith(b"\r\n\r\n") and raw.count(b"\r\n\r\n") == 1  # the headers, and not a byte more
    assert _header(raw, b"content-type") == _header(get, b"content-type")


def _header(response: bytes, name: bytes) -> bytes:
    return next(line for line in response.split(b"\r\n") if line.lower().startswith(name + b":"))
