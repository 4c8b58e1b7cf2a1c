"""server/bodies.py: JSON bodies and multipart fields, bounded and never a 500."""

import json

import pytest

from server.bodies import MAX_JSON_VALUES, MAX_TEXT, form_fields, parse_json, split_json
from server.errors import APIError


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b"\xff\xfe",
        b"[" * 50_000 + b"]" * 50_000,
        b'{"n": ' + b"9" * 5000 + b"}",
        b'{"x": NaN}',
        b'{"x": -Infinity}',
        b'{"seed": [' + b"1," * MAX_JSON_VALUES + b"1]}",
        b'{"a": {"b": ' * 10_000 + b"1" + b"}" * 10_000,
    ],
    ids=["broken", "list", "not-utf8", "deep-list", "digits", "nan", "infinity", "many-values", "deep-object"],
)
def test_hostile_json_is_invalid_json(body):
    with pytest.raises(APIError) as err:
        parse_json(body)
    assert err.value.status == 400 and err.value.code == "invalid_json"


def test_a_prompt_full_of_commas_is_fine():
    assert parse_json(b'{"prompt": "' + b"," * 32000 + b'"}')["prompt"] == "," * 32000


def test_form_fields_build_the_shapes_the_sender_meant_and_leave_the_text_to_the_types():
    fields = form_fields(
        [
            ("prompt", "p"),
            ("loras[][name]", "a"),
            ("loras[][name]", "b"),
            ("loras[][weight]", "0.5"),
            ("seed[]", "1"),
            ("seed[]", "2"),
            ("meta[k]", "v"),
            ("upload_urls", '["https://x/1"]'),
        ]
    )
    assert fields == {
        "prompt": "p",
        "loras": [{"name": "a", "weight": "0.5"}, {"name": "b"}],
        "seed": ["1", "2"],
        "meta": {"k": "v"},
        "upload_urls": '["https://x/1"]',  # protocol.form_payload decodes it: its field is a list
    }


@pytest.mark.parametrize(
    "items",
    [
        [("prompt", "a"), ("prompt[]", "b")],
        [("prompt[]", "a"), ("prompt", "b")],
        [("loras", "[]"), ("loras[name]", "x")],
        [("loras[k]", "x"), ("loras[]", "y")],
        [("loras[]", "y"), ("loras[][name]", "x")],
        [("n", "1"), ("n", "2")],
    ],
)
def test_one_name_in_two_shapes_is_a_400_naming_it(items):
    with pytest.raises(APIError) as err:
        form_fields(items)
    assert err.value.status == 400 and err.value.param == items[0][0].split("[")[0]


def _split(payload: dict) -> tuple[dict, list[bytes]]:
    """What a decode process makes of a large JSON body."""
    return split_json({}, [bytearray(json.dumps(payload, ensure_ascii=False).encode())])


def test_long_strings_of_non_ascii_text_are_refused_where_no_field_takes_them():
    """Python holds a string with one character past U+FFFF at 4 bytes each: 4x what its body reserved."""
    url = "data:image/png;base64," + "A" * 100_000
    prompt = "\U0001f600" * 8000  # text a field takes: kept
    _, strings = _split({"prompt": prompt, "images": [{"image_url": url}]})
    assert set(strings) == {prompt.encode(), url.encode()}  # long strings travel apart, unchanged
    with pytest.raises(APIError) as refused:
        _split({"prompt": "p", "extra": "a" * MAX_TEXT + "\U0001f600"})
    assert refused.value.status == 400 and refused.value.code == "invalid_json"
