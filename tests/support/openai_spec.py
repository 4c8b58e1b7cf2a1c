"""OpenAI's Images spec (shared/reference/openai-images-spec.yaml) as the tests read it, and checks against it."""

import copy
import json
from functools import cache
from pathlib import Path

import jsonschema
import yaml

SPEC = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "openai-images-spec.yaml"


@cache
def _served() -> dict:
    spec = _nullable_as_31(yaml.safe_load(SPEC.read_text()))
    schemas = spec["components"]["schemas"]
    schemas["EditImageBodyJsonParam"]["properties"]["size"] = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    for name in ("ImagesResponse", *(n for n in schemas if n.endswith(("PartialImageEvent", "CompletedEvent")))):
        schemas[name]["properties"]["size"] = {"type": "string", "pattern": "^(auto|[1-9][0-9]*x[1-9][0-9]*)$"}
    return spec


def served_spec() -> dict:
    """OpenAI's spec with two readings made explicit:
    - `nullable: true` is OpenAPI 3.0's keyword, which a 3.1 document like this one ignores; the spec means
      those fields to take null (its SDKs send null for None), so it is rewritten as 3.1 says it.
    - Sizes: the request schemas take any string for `size` (WIDTHxHEIGHT, for gpt-image-2), but the JSON edit
      body and the responses list only OpenAI's standard sizes. This server makes the sizes its model allows,
      so a JSON edit's `size` is a string as in the multipart form, and a response's is the size made."""
    return copy.deepcopy(_served())


def _nullable_as_31(node):
    if isinstance(node, list):
        return [_nullable_as_31(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_as_31(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


def assert_conforms(payload: dict, schema: str) -> dict:
    """`payload` is valid under the spec's component `schema` (as served); returns it."""
    document = {"$ref": f"#/components/schemas/{schema}", "components": _served()["components"]}
    errors = list(jsonschema.Draft202012Validator(document).iter_errors(payload))
    assert not errors, f"{schema}: " + "; ".join(f"{list(e.absolute_path)}: {e.message[:200]}" for e in errors)
    return payload


def stream_events(text: str) -> list[dict]:
    """The JSON events of a server-sent-event stream, each with its `event:` name checked against its `type`."""
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "data" not in fields or fields["data"] == "[DONE]":
            continue
        event = json.loads(fields["data"])
        assert fields.get("event") == event["type"], block[:200]
        events.append(event)
    return events
