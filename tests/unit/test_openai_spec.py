"""The server against OpenAI's published Images spec (shared/reference/openai-images-spec.yaml), in process.

schemathesis generates requests from OpenAI's spec: its coverage phase (deterministic: each property's wrong
types, bounds, enums and missing required fields) and a bounded, derandomised fuzzing phase. Negative requests
(what the spec forbids) must be refused with a 4xx; positive ones must never be a 5xx, and every answer must
match the spec's response schemas. Where the spec is read other than literally, `as_served` says why.
"""

import copy
import time
from pathlib import Path

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
)

from tests.support.fakes import InProcess

SPEC = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "openai-images-spec.yaml"
PATHS = ["/images/generations", "/images/edits"]  # /images/variations (dall-e-2 only) is not served
FUZZ = settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
CHECKS = {
    GenerationMode.NEGATIVE: [not_a_server_error, negative_data_rejection],
    GenerationMode.POSITIVE: [not_a_server_error, response_schema_conformance, content_type_conformance],
}


def as_served(spec: dict) -> dict:
    """OpenAI's spec with two readings made explicit:
    - `nullable: true` is OpenAPI 3.0's keyword, which a 3.1 document like this one ignores; the spec means
      those fields to take null (the SDK sends null for None), so it is rewritten as 3.1 says it.
    - WIDTHxHEIGHT sizes: the request schemas take any string for `size` (arbitrary sizes, for gpt-image-2),
      but the JSON edit body and the responses list only OpenAI's standard sizes. This server generates what
      its model allows, so a response's `size` is the size made, and a JSON edit's `size` is a string as in
      the multipart form."""
    spec = _nullable_as_31(copy.deepcopy(spec))
    schemas = spec["components"]["schemas"]
    schemas["EditImageBodyJsonParam"]["properties"]["size"] = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    for name in ("ImagesResponse", *(n for n in schemas if n.endswith(("PartialImageEvent", "CompletedEvent")))):
        schemas[name]["properties"]["size"] = {"type": "string", "pattern": "^(auto|[1-9][0-9]*x[1-9][0-9]*)$"}
    return spec


def _nullable_as_31(node):
    if isinstance(node, list):
        return [_nullable_as_31(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_as_31(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@pytest.fixture(scope="module")
def spec():
    schema = schemathesis.openapi.from_dict(as_served(yaml.safe_load(SPEC.read_text())))
    schema.config.generation.update(with_security_parameters=False)  # keys are tested in test_api.py
    return schema


@pytest.fixture(scope="module")
def app():
    with InProcess(default_size="64x64", max_pixels=256 * 256, plugins="upscale") as running:
        yield running


def send(app, case):
    """The case as schemathesis puts it on the wire (requests' encoding), sent to the in-process app."""
    kwargs = case.as_transport_kwargs(base_url="http://testserver/v1")
    prepared = requests.Request(**{k: v for k, v in kwargs.items() if k in _REQUEST_ARGS}).prepare()
    return app.http.request(prepared.method, prepared.url, headers=dict(prepared.headers), content=prepared.body)


_REQUEST_ARGS = ("method", "url", "headers", "params", "json", "data", "files", "cookies")


def failures_of(app, case, mode: GenerationMode) -> list[str]:
    response = send(app, case)
    try:
        case.validate_response(response, checks=CHECKS[mode])
    except Exception as exc:
        return [f"{case.meta.phase.data.description if case.meta else ''}: {str(exc)[:1200]}"]
    return []


@pytest.mark.parametrize("mode", [GenerationMode.NEGATIVE, GenerationMode.POSITIVE], ids=["negative", "positive"])
@pytest.mark.parametrize("path", PATHS)
def test_the_server_keeps_to_openai_spec(app, spec, path, mode):
    operation = spec[path]["POST"]
    started = time.monotonic()
    failures = []
    coverage = spec.iter_coverage_cases(
        operation, generation_modes=[mode], generation_config=spec.config.generation_for(operation=operation)
    )
    for case in coverage:
        failures += failures_of(app, case, mode)

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case):
        failures.extend(failures_of(app, case, mode))

    fuzz()
    print(f"{path} {mode.value}: {time.monotonic() - started:.1f}s")
    assert not failures, f"{len(failures)} failures:\n\n" + "\n\n".join(failures[:6])
