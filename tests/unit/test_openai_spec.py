"""The server against OpenAI's published Images spec (shared/reference/openai-images-spec.yaml), in process.

schemathesis generates requests from OpenAI's spec with its coverage phase (deterministic: each property's
wrong types, bounds, enum values and missing required fields) and a bounded, derandomised fuzzing phase.
Negative requests (what the spec forbids) must be refused with a 4xx; positive ones must never be a 5xx, and
every answer, streamed events included, must match the spec's response schemas (read as
`tests/support/openai_spec.served_spec` says). The responses of the SDK's own calls are checked the same way.
"""

import base64
import io
import time

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
)

from tests.support.fakes import InProcess
from tests.support.images import gradient, png_bytes
from tests.support.openai_spec import assert_conforms, served_spec, stream_events

ROUTES = ["generations", "edits"]  # /images/variations (dall-e-2 only) is not served
FUZZ = settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
CHECKS = {
    GenerationMode.NEGATIVE: [not_a_server_error, negative_data_rejection],
    # schemathesis reads a text/event-stream schema as the SSE envelope's, OpenAI's as each event's data:
    # `conformance` checks the events themselves
    GenerationMode.POSITIVE: [not_a_server_error, response_schema_conformance, content_type_conformance],
}
EVENTS = {"generations": "ImageGenStreamEvent", "edits": "ImageEditStreamEvent"}


@pytest.fixture(scope="module")
def app():
    # upscale: a plugin's field in every run; not upload, whose URLs would be looked up in DNS
    with InProcess(default_size="64x64", max_pixels=256 * 256, plugins="upscale") as running:
        yield running


@pytest.fixture(scope="module")
def specs(app):
    """OpenAI's (its paths under the server's /v1), and the one this server publishes at /openapi.json: what
    generated clients see must hold too (nothing it forbids accepted, nothing it allows a 5xx)."""
    return {
        "openai": _schema(served_spec(), "/images"),
        "published": _schema(app.http.get("/openapi.json").json(), "/v1/images"),
    }


def _schema(document: dict, prefix: str) -> tuple:
    for route in ROUTES:  # the envelope, as schemathesis reads it; the events are checked by `conformance`
        content = document["paths"][f"{prefix}/{route}"]["post"]["responses"]["200"]["content"]["text/event-stream"]
        content["schema"] = {"type": "object", "properties": {"event": {"type": "string"}, "data": {}}}
    schema = schemathesis.openapi.from_dict(document)
    schema.config.generation.update(with_security_parameters=False)  # keys are tested in test_api.py
    return schema, prefix


def send(app, case):
    """The case as schemathesis puts it on the wire (requests' encoding), sent to the in-process app."""
    base = "http://testserver/v1" if case.operation.path.startswith("/images") else "http://testserver"
    kwargs = case.as_transport_kwargs(base_url=base)
    prepared = requests.Request(**{k: v for k, v in kwargs.items() if k in _REQUEST_ARGS}).prepare()
    return app.http.request(prepared.method, prepared.url, headers=dict(prepared.headers), content=prepared.body)


_REQUEST_ARGS = ("method", "url", "headers", "params", "json", "data", "files", "cookies")


def conformance(response, route: str) -> None:
    if response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream"):
        for event in stream_events(response.text):
            assert_conforms(event, EVENTS[route])


def failures_of(app, case, route: str, mode: GenerationMode) -> list[str]:
    response = send(app, case)
    try:
        case.validate_response(response, checks=CHECKS[mode])
        conformance(response, route)
    except Exception as exc:
        return [f"{case.meta.phase.data.description if case.meta else ''}: {str(exc)[:1200]}"]
    return []


@pytest.mark.parametrize("mode", [GenerationMode.NEGATIVE, GenerationMode.POSITIVE], ids=["negative", "positive"])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("source", ["openai", "published"])
def test_the_server_keeps_to_the_spec(app, specs, source, route, mode):
    spec, prefix = specs[source]
    operation = spec[f"{prefix}/{route}"]["POST"]
    started = time.monotonic()
    coverage = spec.iter_coverage_cases(
        operation, generation_modes=[mode], generation_config=spec.config.generation_for(operation=operation)
    )
    failures, cases = [], 0
    for case in coverage:
        failures += failures_of(app, case, route, mode)
        cases += 1

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case):
        failures.extend(failures_of(app, case, route, mode))

    fuzz()
    print(f"{source} {route} {mode.value}: {cases} coverage cases and the fuzzing in {time.monotonic() - started:.1f}s")
    assert cases > 50, "the coverage phase generated almost nothing: the spec did not load as expected"
    assert not failures, f"{len(failures)} failures:\n\n" + "\n\n".join(failures[:6])


# -- the SDK's calls, their answers checked against the spec ----------------------------------


def test_a_generation_answers_as_the_spec_says_with_background_and_usage(app):
    response = app.client().images.with_raw_response.generate(prompt="p", size="128x64", n=2).http_response
    body = assert_conforms(response.json(), "ImagesResponse")
    assert body["background"] == "opaque"
    tokens = 8 * 4  # one per 16x16 patch: 8x4 patches per image
    assert body["usage"] == {
        "input_tokens": 0,
        "output_tokens": 2 * tokens,
        "total_tokens": 2 * tokens,
        "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
        "output_tokens_details": {"text_tokens": 0, "image_tokens": 2 * tokens},
    }


def test_edits_answer_as_the_spec_says_multipart_and_json(app):
    image = png_bytes(gradient(64, 64))
    form = app.client().images.with_raw_response.edit(image=("a.png", io.BytesIO(image), "image/png"), prompt="p")
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    as_json = app.http.post("/v1/images/edits", json={"prompt": "p", "images": [{"image_url": data_url}]})
    for response in (form.http_response, as_json):
        body = assert_conforms(response.json(), "ImagesResponse")
        assert body["background"] == "opaque" and body["size"] == "64x64"
        assert body["usage"]["input_tokens_details"]["image_tokens"] == 16  # the input image, 4x4 patches
        assert body["usage"]["total_tokens"] == 32


@pytest.mark.parametrize("path", ["generations", "edits"])
def test_stream_events_are_the_spec_s_each_completed_one_with_usage(app, path):
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(gradient(64, 64))).decode()
    body = {"images": [{"image_url": data_url}]} if path == "edits" else {}
    response = app.http.post(
        f"/v1/images/{path}", json={"prompt": "p", "size": "64x64", "stream": True, "partial_images": 2, **body}
    )
    events = stream_events(response.text)
    assert [e["type"].split(".")[1] for e in events] == ["partial_image", "partial_image", "completed"]
    for event in events:
        assert_conforms(event, EVENTS[path])
    assert events[-1]["usage"]["output_tokens"] == 16


def test_openapi_publishes_the_request_bodies_with_the_enabled_plugins_fields(app):
    document = app.http.get("/openapi.json").json()
    content = {route: document["paths"][f"/v1/images/{route}"]["post"]["requestBody"]["content"] for route in ROUTES}
    refs = {
        route: {media: c["schema"]["$ref"].rsplit("/", 1)[1] for media, c in content[route].items()} for route in ROUTES
    }
    assert refs == {
        "generations": {"application/json": "ImageGenerationRequest"},
        "edits": {"multipart/form-data": "ImageEditForm", "application/json": "ImageEditRequest"},
    }
    schemas = document["components"]["schemas"]
    generation, form, edit = (schemas[n] for n in ("ImageGenerationRequest", "ImageEditForm", "ImageEditRequest"))
    assert generation["required"] == ["prompt"] and {"n", "seed", "upscale"} <= set(generation["properties"])
    assert {"images", "mask", "strength", "upscale"} <= set(edit["properties"])
    assert form["required"] == ["image", "prompt"] and "images" not in form["properties"]
    assert form["properties"]["mask"] == {"type": "string", "format": "binary"} and "upscale" in form["properties"]
    with InProcess() as plain:  # no plugins: none of their fields
        published = plain.http.get("/openapi.json").json()["components"]["schemas"]["ImageGenerationRequest"]
    assert "upscale" not in published["properties"] and "n" in published["properties"]


def test_openapi_publishes_the_video_request_bodies(app):
    document = app.http.get("/openapi.json").json()
    create = document["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    remix = document["paths"]["/v1/videos/{video_id}/remix"]["post"]["requestBody"]["content"]
    assert {media: c["schema"]["$ref"].rsplit("/", 1)[1] for media, c in create.items()} == {
        "multipart/form-data": "VideoForm",
        "application/json": "VideoRequest",
    }
    assert remix["application/json"]["schema"]["$ref"].endswith("/VideoRemixRequest")
    schemas = document["components"]["schemas"]
    form, request = schemas["VideoForm"], schemas["VideoRequest"]
    assert form["required"] == ["prompt"] and request["required"] == ["prompt"]
    assert form["properties"]["input_reference"] == {"type": "string", "format": "binary"}
    assert {"seconds", "size", "seed"} <= set(form["properties"]) and "input_reference" in request["properties"]
