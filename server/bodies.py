"""Request bodies as the JSON the sender meant: JSON text, and multipart forms (the SDK's and curl's).

Parsing is bounded by what an image request can hold, not only by its size in bytes: a request has a prompt
and a few short lists, so a body with more than `MAX_JSON_VALUES` values is refused before `json.loads`
sees it (a 64 MiB list of numbers would otherwise cost seconds and gigabytes). Base64 images are long
strings, which cost little to parse. Nesting deeper than Python's recursion limit is a 400 too.
"""

import json
import re

from python_multipart.multipart import parse_options_header

from server.errors import bad_request

MAX_JSON_VALUES = 50_000

_LIST_KEY = re.compile(r"^(\w+)\[\](?:\[(\w+)\])?$")
_DICT_KEY = re.compile(r"^(\w+)\[(\w+)\]$")
FILE_FIELDS = ("image", "image[]", "mask")


def invalid_json(why: str):
    return bad_request(f"We could not parse the JSON body of your request: {why}", None, "invalid_json")


def media_type_of(content_type: str | None) -> str:
    """A Content-Type's media type: lower case, parameters dropped (RFC 9110 8.3.1), parsed as Starlette parses
    forms, so that what is routed to the form parser is what it reads as a form."""
    return parse_options_header(content_type)[0].decode("latin-1")


def _check_shape(body: bytes) -> None:
    """A cheap scan (C speed, no objects) that bounds what json.loads will build. Commas and colons inside
    strings count too: prompts are at most 32000 characters, far below the limit."""
    if body.count(b",") + body.count(b":") > MAX_JSON_VALUES:
        raise invalid_json(f"it holds more than {MAX_JSON_VALUES} values; no image request needs that many")


class _NotJSON(ValueError):
    """What is wrong with a body, in words about the body."""


def _no_constant(name: str) -> None:
    raise _NotJSON(f"{name} is not a JSON number")


def parse_json(body: bytes) -> dict:
    """The body as a JSON object; a 400 `invalid_json` for anything else (never a 500)."""
    _check_shape(body)
    try:
        data = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise invalid_json("it is nested too deeply") from None
    except (json.JSONDecodeError, _NotJSON) as exc:
        raise invalid_json(str(exc)) from None
    except ValueError:  # UnicodeDecodeError, or a 5000-digit integer (Python's words suggest a setting)
        raise invalid_json("it is not UTF-8 JSON text, or holds a number too long to read") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    return data


def form_fields(items: list[tuple[str, object]]) -> dict:
    """Multipart fields in their shapes, values still text: `a[]` lists, `a[][k]` lists of objects, `a[k]`
    objects (the SDK's and curl's ways). `protocol.form_payload` then converts the text by each field's type.
    One name sent in two shapes (`prompt` and `prompt[]`) is a 400 naming it."""
    out: dict = {}
    seen: dict[tuple[str, str], int] = {}
    for key, value in items:
        if not isinstance(value, str) or key in FILE_FIELDS:
            continue
        if match := _LIST_KEY.match(key):
            _add_list_item(out, seen, match[1], match[2], value)
        elif match := _DICT_KEY.match(key):
            _container(out, match[1], dict)[match[2]] = value
        elif key in out:
            raise bad_request(f"'{key}' is sent more than once.", key)
        else:
            out[key] = value
    return out


def _container(out: dict, name: str, kind: type) -> list | dict:
    """out[name] as a list or dict being built from several fields; a 400 when it is already something else."""
    value = out.setdefault(name, kind())
    if type(value) is not kind:
        raise bad_request(f"'{name}' is sent in two shapes (as '{name}' and as '{name}[...]').", name)
    return value


def _add_list_item(out: dict, seen: dict, name: str, sub: str | None, value: str) -> None:
    values = _container(out, name, list)
    if sub is None:
        values.append(value)
        return
    # the i-th `a[][k]` belongs to element i: right for curl's interleaved order and for the SDK's, which
    # sends every a[][name] before every a[][weight]
    index = seen[(name, sub)] = seen.get((name, sub), -1) + 1
    while len(values) <= index:
        values.append({})
    if not isinstance(values[index], dict):
        raise bad_request(f"'{name}' mixes values and objects.", name)
    values[index][sub] = value


def parse_json_value(text: str) -> object:
    """A JSON field of a form, bounded like a body."""
    _check_shape(text.encode())
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
