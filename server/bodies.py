"""Request bodies as the JSON the sender meant: JSON text, and multipart forms (the SDK's and curl's).

Parsing is bounded by what an image request can hold, not only by its size in bytes: a request has a prompt
and a few short lists, so a body with more than `MAX_JSON_VALUES` values is refused before `json.loads`
sees it (a 64 MiB list of numbers would otherwise cost seconds and gigabytes). Base64 images are long
strings, which cost little to parse. Nesting deeper than Python's recursion limit is a 400 too.
"""

import asyncio
import dataclasses
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from server.decoders import DecoderPool, Job
from server.errors import bad_request

log = logging.getLogger(__name__)

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


def _check_shape(body: bytes | str) -> None:
    """A cheap scan (C speed, no objects) that bounds what json.loads will build. Commas and colons inside
    strings count too: prompts are at most MAX_TEXT characters, far below the limit."""
    comma, colon = (",", ":") if isinstance(body, str) else (b",", b":")
    if body.count(comma) + body.count(colon) > MAX_JSON_VALUES:
        raise invalid_json(f"it holds more than {MAX_JSON_VALUES} values; no image request needs that many")


class _NotJSON(ValueError):
    """What is wrong with a body, in words about the body."""


def _no_constant(name: str) -> None:
    raise _NotJSON(f"{name} is not a JSON number")


def parse_json(body: bytes | str) -> dict:
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


# -- large bodies, parsed in a decode process (server/decoders.py) --------------------------------------------

LARGE_BODY = 64 * 1024  # bytes of JSON above which the body is parsed in a decode process, not on the event loop
LONG_STRING = 4096  # characters: longer strings (data URLs) travel back as bytes, outside the JSON
# The longest text a field takes (prompt, negative_prompt). Longer strings are URLs and data URLs, ASCII: one of
# non-ASCII text is refused, as Python would hold it at up to 4 bytes a character, past what its body reserved.
MAX_TEXT = 32_000
MAX_REST = 1 << 20  # bytes of a body's JSON once its long strings are out: no image request needs more


@dataclass(frozen=True)
class FormLimits:
    max_files: int
    max_fields: int
    max_field_bytes: int
    max_file_bytes: int
    file_too_large: str = "file_too_large"  # the error code for a file over max_file_bytes


@dataclass(frozen=True)
class FormPart:
    name: str
    filename: str | None  # None: a text field
    content_type: str | None
    data: bytes  # empty when the part was written to `path`
    path: str | None = None  # a file part spooled to disk (form_file_job)

    @property
    def text(self) -> str:
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            return self.data.decode("latin-1")


async def read_json(body: bytes, decoders: DecoderPool, deadline: float) -> dict:
    """A JSON body: a small one here, a larger one in a decode process within the request's deadline."""
    if len(body) <= LARGE_BODY:
        return parse_json(body)
    return await decoders.run(json_job(body), deadline, "the JSON body", None)


async def read_form(
    body: bytes, content_type: str, limits: FormLimits, decoders: DecoderPool, deadline: float
) -> list[FormPart]:
    """A multipart body's parts, parsed in a decode process within the request's deadline."""
    return await decoders.run(form_job(body, content_type, limits), deadline, "the multipart body", None)


def json_job(body: bytes) -> Job:
    """A JSON body to parse in a decode process: a long C call (json.loads of 64 MB holds the GIL for most of
    a second) stays off the event loop, and its long strings come back as bytes, outside any JSON."""
    return Job({"op": "json"}, [body], len(body), _joined_json)


def split_json(header: dict, blobs: list[bytearray]) -> tuple[dict, list[bytes]]:
    """Decode process: the body parsed, its long strings taken out and sent as blobs, where they were kept. The
    body is held once at a time: its bytes dropped once decoded to text, the text once parsed."""
    data = parse_json(_text(blobs.pop()))
    paths, strings, stack = [], [], [(data, [])]
    while stack:
        node, path = stack.pop()
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(value, str) and len(value) > LONG_STRING:
                if len(value) > MAX_TEXT and not value.isascii():
                    raise invalid_json(f"no field takes non-ASCII text of more than {MAX_TEXT} characters")
                paths.append([*path, key])
                strings.append(value.encode("utf-8", "surrogatepass"))
                node[key] = ""
            elif isinstance(value, dict | list):
                stack.append((value, [*path, key]))
    if len(json.dumps(data)) > MAX_REST:
        raise invalid_json(f"it holds more than {MAX_REST // 1024} KiB besides its long strings")
    return {"data": data, "paths": paths}, strings


def _text(body: bytearray) -> str:
    try:
        return body.decode(json.detect_encoding(body), "surrogatepass")
    except UnicodeDecodeError:
        raise invalid_json("it is not UTF-8 JSON text") from None


def _joined_json(reply: dict, strings: list[bytearray]) -> dict:
    """The long strings back in their places, each blob dropped once decoded: the strings are held once."""
    data = reply["data"]
    if len(reply["paths"]) != len(strings):
        raise ValueError("a JSON reply's strings do not match its paths")
    for path in reversed(reply["paths"]):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = strings.pop().decode("utf-8", "surrogatepass")
    return data


def form_job(body: bytes, content_type: str, limits: FormLimits) -> Job:
    """A multipart body to parse in a decode process."""
    header = {"op": "form", "content_type": content_type, "limits": dataclasses.asdict(limits)}
    return Job(header, [body], len(body), _form_parts)


def form_file_job(body: Path, content_type: str, limits: FormLimits, spool: Path) -> Job:
    """A multipart body on disk (too large for memory: a LoRA) to parse in a decode process, its file parts
    written to `spool` as `body`'s name plus a number; text fields come back."""
    header = {"op": "form", "content_type": content_type, "limits": dataclasses.asdict(limits)}
    return Job({**header, "path": str(body), "spool": str(spool)}, [], limits.max_fields * limits.max_field_bytes,
               _form_parts)  # fmt: skip


def split_form(header: dict, blobs: list[bytearray]) -> tuple[dict, list[bytes]]:
    """Decode process: the parts of a multipart body, each bounded."""
    limits, content_type = FormLimits(**header["limits"]), header["content_type"]
    if "path" not in header:
        parts = parse_form([bytes(blobs[0])], content_type, limits)
    else:
        with open(header["path"], "rb") as body:
            chunks = iter(lambda: body.read(1 << 20), b"")
            parts = parse_form(chunks, content_type, limits, Path(header["spool"]) / Path(header["path"]).name)
    return {"parts": [[p.name, p.filename, p.content_type, p.path] for p in parts]}, [p.data for p in parts]


def _form_parts(reply: dict, blobs: list[bytearray]) -> list[FormPart]:
    """The parts, each blob dropped once copied: the files are held once."""
    if len(reply["parts"]) != len(blobs):
        raise ValueError("a form reply's blobs do not match its parts")
    parts = [FormPart(*part[:3], bytes(blobs.pop()), part[3]) for part in reversed(reply["parts"])]
    return parts[::-1]


async def spool(chunks: AsyncIterator[bytes], path: Path) -> None:
    """A body written to `path` as it arrives, a MiB at a time in a worker thread."""
    with path.open("wb") as out:
        batch = bytearray()
        async for chunk in chunks:
            batch += chunk
            if len(batch) >= 1 << 20:
                await asyncio.to_thread(out.write, batch)
                batch = bytearray()
        await asyncio.to_thread(out.write, batch)


def invalid_form(why: str):
    return bad_request(f"We could not parse the multipart body of your request: {why}", None, "invalid_multipart")


def parse_form(
    chunks: Iterable[bytes], content_type: str, limits: FormLimits, spool: Path | None = None
) -> list[FormPart]:
    """The parts of a multipart/form-data body; a 400 for a malformed one or one past `limits`. With `spool`,
    file parts are written to files named after it (and removed again if the body is refused)."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise invalid_form("its Content-Type has no boundary.")
    reader = _FormReader(limits, spool)
    try:
        parser = MultipartParser(boundary, reader.callbacks())
        for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        reader.discard()
        log.info("a multipart body was refused: %r", exc)
        raise invalid_form("it is not multipart/form-data as its Content-Type says.") from None
    except BaseException:
        reader.discard()
        raise
    return reader.parts


class _FormReader:
    """python-multipart's callbacks: each part's name, file name, type and bytes (or file), within the limits."""

    def __init__(self, limits: FormLimits, spool: Path | None) -> None:
        self.limits = limits
        self.spool = spool
        self.parts: list[FormPart] = []
        self.files = self.fields = 0
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""
        self._data: BinaryIO = io.BytesIO()
        self._size = 0
        self._part: tuple[str, str | None, str | None] = ("", None, None)
        self._spooled: list[Path] = []

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: setattr(self, "_field", self._field + data[start:end]),
            "on_header_value": lambda data, start, end: setattr(self, "_value", self._value + data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data_in,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        options = parse_options_header(self._headers.get(b"content-disposition"))[1]
        if b"name" not in options:
            raise invalid_form("a part has no name in its Content-Disposition.")
        name = options[b"name"].decode("utf-8", "replace")
        filename = options[b"filename"].decode("utf-8", "replace") if b"filename" in options else None
        content_type = self._headers.get(b"content-type", b"").decode("latin-1") or None
        self._part, self._size = (name, filename, content_type), 0
        self._data = self._spooled_file() if filename is not None and self.spool is not None else io.BytesIO()
        if filename is None:
            self.fields += 1
            if self.fields > self.limits.max_fields:
                raise invalid_form(f"it has more than {self.limits.max_fields} fields.")
        else:
            self.files += 1
            if self.files > self.limits.max_files:
                raise bad_request(f"At most {self.limits.max_files} files may be sent.", name)

    def _spooled_file(self) -> BinaryIO:
        path = self.spool.with_name(f"{self.spool.name}.{len(self._spooled)}")
        self._spooled.append(path)
        return path.open("wb")

    def _data_in(self, data: bytes, start: int, end: int) -> None:
        name, filename, _ = self._part
        self._size += end - start
        if filename is None and self._size > self.limits.max_field_bytes:
            raise invalid_form(f"the field '{name}' is larger than {self.limits.max_field_bytes // 1024} KiB.")
        if filename is not None and self._size > self.limits.max_file_bytes:
            limit = self.limits.max_file_bytes / 2**20
            raise bad_request(f"'{name}' is larger than {limit:g} MiB.", name, self.limits.file_too_large)
        self._data.write(data[start:end])

    def _end(self) -> None:
        if isinstance(self._data, io.BytesIO):
            self.parts.append(FormPart(*self._part, self._data.getvalue()))
            return
        self._data.close()
        self.parts.append(FormPart(*self._part, b"", self._data.name))

    def discard(self) -> None:
        self._data.close()
        for path in self._spooled:
            path.unlink(missing_ok=True)
