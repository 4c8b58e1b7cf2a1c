"""Request bodies as the JSON the sender meant: JSON text, and multipart forms (the SDK's and curl's).

Parsing is bounded by what an image request can hold, not only by its size in bytes: a request has a prompt
and a few short lists, so a body with more than `MAX_JSON_VALUES` values is refused before `json.loads`
sees it (a 64 MiB list of numbers would otherwise cost seconds and gigabytes). A large body's base64 images
never reach `json.loads`: a decode process takes them out as it reads (`_DataURLs`). Nesting deeper than
Python's recursion limit is a 400 too.
"""

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from server.decoders import DecoderPool, Job
from server.errors import bad_request
from server.spool import RequestSpool, SpooledFile

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


# -- large bodies, parsed in a decode process from the spool (server/decoders.py, server/spool.py) --------------

LARGE_BODY = 64 * 1024  # bytes of a body above which it is spooled to disk and parsed in a decode process
LONG_STRING = 4096  # bytes of a string literal above which a base64 data URL is decoded to a file, not kept as text
MAX_TEXT = 32_000  # the longest text a field takes (prompt, negative_prompt)
# bytes inside the quotes of a string that is no data URL: MAX_TEXT characters escaped, 12 bytes each past U+FFFF
MAX_LONG_TEXT = 12 * MAX_TEXT
MAX_REST = 1 << 20  # bytes of a body's JSON once its data URLs are out, or of a form's text fields: none needs more
IMAGE_URL_CHARS = 20_971_520  # OpenAI's spec: a JSON edit's image_url (a URL or a data URL) is at most 20 MiB long
MAX_DATA_URLS = 64  # long data URLs in one body: an edit's images and mask, a video's reference, with room to spare
READ_CHUNK = 1 << 20  # bytes of a spooled body read at a time


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
    data: bytes  # a text field's bytes; empty for a file part, which is written to `path`
    path: Path | None = None

    @property
    def text(self) -> str:
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            return self.data.decode("latin-1")


async def read_json(
    body: bytes | Path, spool: RequestSpool, decoders: DecoderPool, deadline: float, max_image_bytes: int
) -> dict:
    """A JSON body: a short one here, a spooled one in a decode process within the request's deadline, its data
    URLs decoded into the spool as it is read (the parsed body holds their markers: `spool.data_urls`)."""
    if isinstance(body, bytes):
        return parse_json(body)
    size = body.stat().st_size
    spool.disk.take(size)  # what the parse may write: the body's data URLs decoded, less than the body
    job = json_job(body, spool.folder, max_image_bytes)
    data, files = await decoders.run(job, deadline, "the JSON body", None)
    spool.data_urls.update(files)
    spool.drop(body)
    spool.disk.give(size - sum(f.size for f in files.values()))
    return data


async def read_form(
    body: Path, content_type: str, limits: FormLimits, spool: RequestSpool, decoders: DecoderPool, deadline: float
) -> list[FormPart]:
    """A spooled multipart body's parts, parsed in a decode process within the request's deadline: its files
    written beside it, its text fields back in memory."""
    size = body.stat().st_size
    spool.disk.take(size)  # what the parse writes: the body's files, less than the body
    job = form_file_job(body, content_type, limits, spool.folder)
    parts = await decoders.run(job, deadline, "the multipart body", None)
    spool.drop(body)
    spool.disk.give(size - sum(p.path.stat().st_size for p in parts if p.path is not None))
    return parts


def json_job(body: Path, folder: Path, max_image_bytes: int) -> Job:
    """A spooled JSON body to parse in a decode process (server/decoders.py): a long C call (json.loads of 64 MB
    holds the GIL for most of a second) stays off the event loop, and the server never holds the body."""
    nonce = secrets.token_hex(16)  # markers no caller can write
    header = {
        "op": "json",
        "path": str(body),
        "folder": str(folder),
        "nonce": nonce,
        "max_image_bytes": max_image_bytes,
    }

    def finish(reply: dict, blobs: list[bytearray]) -> tuple[dict, dict[str, SpooledFile]]:
        data = json.loads(blobs[0].decode("utf-8", "surrogatepass"))  # the decode process's own JSON, checked there
        files = {}
        for marker, found in reply["files"].items():
            if not marker.startswith(f"spooled:{nonce}:") or ("/" in found.get("name", "")):
                raise ValueError(f"a JSON reply names {marker!r}, {found!r}")
            path = folder / found["name"] if "name" in found else None
            files[marker] = SpooledFile(path, found.get("size", 0), found.get("error", ""), found.get("code"))
        return data, files

    return Job(header, [], 2 * MAX_REST, finish)


def split_json(header: dict, blobs: list[bytearray]) -> tuple[dict, list[bytes]]:
    """Decode process: a spooled JSON body read a MiB at a time, each long base64 data URL decoded into a file
    beside it as it passes, the rest (at most MAX_REST bytes) parsed. What the process holds is bounded by
    MAX_REST and a chunk, whatever the body's size."""
    urls = _DataURLs(Path(header["folder"]), header["nonce"], header["max_image_bytes"])
    try:
        with open(header["path"], "rb") as body:
            for chunk in iter(lambda: body.read(READ_CHUNK), b""):
                urls.feed(chunk)
        rest = urls.rest()
    finally:
        urls.discard()  # a data URL cut off by a refusal: its file closed and gone now, not at the next GC
    data = parse_json(rest)
    _check_markers(data, urls.files)
    # the parsed rest travels as a blob, not in the frame's header: escaped, it could pass MAX_HEADER
    return {"files": urls.files}, [json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogatepass")]


def _check_markers(node: dict | list, files: dict, where: str = "") -> None:
    """Data URLs decoded to files are only taken where an image is: `image_url` (a marker elsewhere would pass
    for a short string)."""
    for key, value in node.items() if isinstance(node, dict) else enumerate(node):
        field = f"{where}.{key}" if where and isinstance(key, str) else f"{where}[{key}]" if where else str(key)
        if key in files:
            raise invalid_json("a field's name is a data URL")
        if isinstance(value, str) and value in files and key != "image_url":
            raise bad_request(f"'{field}' holds a data URL; only an image_url takes one.", field)
        if isinstance(value, dict | list):
            _check_markers(value, files, field)


class _DataURLs:
    """A JSON text read in chunks. Outside strings its bytes are kept; a string literal is kept as it is, unless
    it grows past LONG_STRING as a base64 data URL: then its payload is decoded into a file as it comes, and a
    marker stands in its place. Every other string stays under MAX_LONG_TEXT, and what is kept under MAX_REST.
    Escapes are skipped without being read (json.loads reads the kept text); in a data URL only `\\/` is one."""

    def __init__(self, folder: Path, nonce: str, max_image_bytes: int) -> None:
        self.folder, self.nonce, self.max_image_bytes = folder, nonce, max_image_bytes
        self.files: dict[str, dict] = {}
        self._rest = bytearray()
        self._literal: bytearray | None = None  # the string being kept, raw, from its opening quote
        self._text = False  # the string being kept is past LONG_STRING and is no data URL
        self._data: _Base64File | None = None  # the data URL being decoded
        self._escape = False  # the last chunk ended with a backslash inside a string
        self._first = True

    def feed(self, chunk: bytes) -> None:
        if self._first:
            self._first = False
            chunk = chunk.removeprefix(b"\xef\xbb\xbf")
            if b"\x00" in chunk[:4]:  # UTF-16 or UTF-32: RFC 8259 asks for UTF-8, which the scan relies on
                raise invalid_json("it is not UTF-8 JSON text")
        pos = 0
        while pos < len(chunk):
            if self._literal is None and self._data is None:
                quote = chunk.find(b'"', pos)
                self._keep(chunk[pos : len(chunk) if quote < 0 else quote])
                if quote < 0:
                    return
                self._literal, self._text, pos = bytearray(b'"'), False, quote + 1
            else:
                pos = self._string(chunk, pos)

    def _string(self, chunk: bytes, pos: int) -> int:
        """Within a string: its content up to the closing quote (or the chunk's end) passed on; where to go on. A
        quote after an odd run of backslashes is escaped: runs are measured by C calls, never walked a backslash
        at a time (a data URL of `\\/` escapes cost 25 times a plain one that way)."""
        start, end = pos, len(chunk)
        if self._escape:
            self._escape, pos = False, pos + 1
        while (quote := chunk.find(b'"', pos)) >= 0:
            if _backslashes_ending(chunk[pos:quote]) % 2 == 0:
                self._content(chunk[start:quote])
                self._close()
                return quote + 1
            pos = quote + 1
        self._escape = _backslashes_ending(chunk[pos:]) % 2 == 1
        self._content(chunk[start:end])
        return end

    def _content(self, raw: bytes) -> None:
        if self._data is not None:
            self._data.write(raw)
            return
        self._literal += raw
        if len(self._literal) > LONG_STRING and not self._text:
            self._long()
        if self._literal is not None and len(self._literal) - 1 > MAX_LONG_TEXT:  # its opening quote apart
            raise invalid_json(f"it holds a string of more than {MAX_TEXT} characters that is not a base64 data URL")

    def _long(self) -> None:
        """A string past LONG_STRING: a base64 data URL (its header within LONG_STRING, whatever the read chunks)
        is decoded from here on; anything else stays text."""
        comma = self._literal.find(b",", 0, LONG_STRING)
        try:
            media = json.loads(self._literal[:comma] + b'"') if comma > 0 else ""
        except ValueError:
            media = ""
        if not (media.startswith("data:") and ";base64" in media):
            self._text = True
            return
        if len(self.files) == MAX_DATA_URLS:
            raise invalid_json(f"it holds more than {MAX_DATA_URLS} long data URLs; no request needs that many")
        payload, self._literal = self._literal[comma + 1 :], None
        path = self.folder / f"data-url.{self.nonce}.{len(self.files)}"
        self._data = _Base64File(path, self.max_image_bytes, IMAGE_URL_CHARS - comma)  # comma: the header's length
        self._data.write(bytes(payload))

    def _close(self) -> None:
        if self._data is None:
            self._literal += b'"'
            self._keep(self._literal)
            self._literal = None
            return
        marker = f"spooled:{self.nonce}:{len(self.files)}"
        self.files[marker] = self._data.close()
        self._data = None
        self._keep(b'"' + marker.encode() + b'"')

    def _keep(self, text: bytes) -> None:
        self._rest += text
        if len(self._rest) > MAX_REST:
            raise invalid_json(f"it holds more than {MAX_REST // 1024} KiB besides its data URLs")

    def rest(self) -> bytes:
        if self._literal is not None or self._data is not None:
            raise invalid_json("it ends inside a string")
        return bytes(self._rest)

    def discard(self) -> None:
        """The data URL being decoded, if any, given up."""
        if self._data is not None:
            self._data.discard()
            self._data = None


def _backslashes_ending(text: bytes) -> int:
    return len(text) - len(text.rstrip(b"\\"))


class _Base64File:
    """A data URL's base64 payload, decoded into a file as it comes; the first fault ends it (the file removed)."""

    def __init__(self, path: Path, max_bytes: int, max_chars: int) -> None:
        self.path, self.max_bytes, self.max_chars = path, max_bytes, max_chars
        self._out: BinaryIO = path.open("wb")
        self._size = 0
        self._chars = 0  # of the payload, escapes as sent
        self._escape = b""  # a backslash that ended the last piece
        self._quartet = b""  # base64 characters past the last multiple of 4
        self._padded = False  # a quartet ended in '=': the payload must end there
        self._fault: tuple[str, str | None] | None = None

    def write(self, raw: bytes) -> None:
        if self._fault is not None:
            return
        self._chars += len(raw)
        if self._chars > self.max_chars:  # the spec's bound on an image_url, which the request model no longer sees
            return self._fail(f"should have at most {IMAGE_URL_CHARS} characters.", "invalid_value")
        raw, self._escape = self._escape + raw, b""
        if b"\\" in raw:
            raw = raw.replace(b"\\/", b"/")
            if raw.endswith(b"\\"):
                raw, self._escape = raw[:-1], b"\\"
            if b"\\" in raw:
                return self._fail("is not valid base64.")
        raw = self._quartet + raw
        cut = len(raw) - len(raw) % 4
        self._quartet = raw[cut:]
        self._decode(raw[:cut])

    def _decode(self, text: bytes) -> None:
        """Whole quartets; '=' only at the end of the last one, wherever the pieces end."""
        if not text:
            return
        pad = text.find(b"=")
        if self._padded or 0 <= pad < len(text) - 2:
            return self._fail("is not valid base64.")
        self._padded = pad >= 0
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return self._fail("is not valid base64.")
        self._size += len(data)
        if self._size > self.max_bytes:
            return self._fail(f"is larger than {self.max_bytes / 2**20:g} MiB.", "image_too_large")
        self._out.write(data)

    def discard(self) -> None:
        if self._fault is None:
            self._fail("was cut off.")

    def _fail(self, why: str, code: str | None = None) -> None:
        self._fault = (why, code)
        self._out.close()
        self.path.unlink()

    def close(self) -> dict:
        """What the server learns: the file's name and size, or why there is none."""
        if self._fault is None and (self._escape or self._quartet):
            self._fail("is not valid base64.")
        if self._fault is not None:
            return {"error": self._fault[0], "code": self._fault[1]}
        self._out.close()
        return {"name": self.path.name, "size": self._size}


def form_file_job(body: Path, content_type: str, limits: FormLimits, folder: Path) -> Job:
    """A multipart body on disk to parse in a decode process, its file parts written to `folder` as `body`'s name
    plus a number; text fields come back."""
    header = {"op": "form", "content_type": content_type, "limits": dataclasses.asdict(limits)}
    return Job({**header, "path": str(body), "folder": str(folder)}, [], 8 * MAX_REST, _form_parts)


def split_form(header: dict, blobs: list[bytearray]) -> tuple[dict, list[bytes]]:
    """Decode process: the parts of a multipart body, each bounded."""
    limits, content_type = FormLimits(**header["limits"]), header["content_type"]
    with open(header["path"], "rb") as body:
        chunks = iter(lambda: body.read(READ_CHUNK), b"")
        parts = parse_form(chunks, content_type, limits, Path(header["folder"]) / Path(header["path"]).name)
    described = [[p.name, p.filename, p.content_type, p.path and str(p.path)] for p in parts]
    # the parts' names travel as a blob, not in the frame's header: escaped, they could pass MAX_HEADER
    return {}, [json.dumps(described).encode(), *(p.data for p in parts)]


def _form_parts(reply: dict, blobs: list[bytearray]) -> list[FormPart]:
    """The parts, each blob dropped once copied."""
    described = json.loads(blobs.pop(0))  # the decode process's own JSON
    if len(described) != len(blobs):
        raise ValueError("a form reply's blobs do not match its parts")
    parts = [FormPart(*part[:3], bytes(blobs.pop()), part[3] and Path(part[3])) for part in reversed(described)]
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


def boundary_of(content_type: str) -> bytes:
    """A multipart Content-Type's boundary; a 400 without one (before its body is read)."""
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise invalid_form("its Content-Type has no boundary.")
    return boundary


def invalid_form(why: str):
    return bad_request(f"We could not parse the multipart body of your request: {why}", None, "invalid_multipart")


def parse_form(chunks: Iterable[bytes], content_type: str, limits: FormLimits, prefix: Path) -> list[FormPart]:
    """The parts of a multipart/form-data body; a 400 for a malformed one or one past `limits`. File parts are
    written to files named `prefix` plus a number (and removed again if the body is refused)."""
    reader = _FormReader(limits, prefix)
    boundary = boundary_of(content_type)
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

    def __init__(self, limits: FormLimits, prefix: Path) -> None:
        self.limits = limits
        self.prefix = prefix
        self.parts: list[FormPart] = []
        self.files = self.fields = 0
        self._text_bytes = 0
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""
        self._data: BinaryIO = io.BytesIO()
        self._size = 0
        self._part: tuple[str, str | None, str | None] = ("", None, None)
        self._spooled: list[Path] = []

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data_in,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._headers = {}

    # A part's header name and value come in pieces, counted with the text fields (python-multipart bounds each
    # header line, not how many parts carry them).
    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._text(end - start)
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._text(end - start)
        self._value += data[start:end]

    def _text(self, size: int) -> None:
        self._text_bytes += size
        if self._text_bytes > MAX_REST:
            raise invalid_form(f"its text fields and part headers hold more than {MAX_REST // 1024} KiB.")

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
        self._data = self._spooled_file() if filename is not None else io.BytesIO()
        if filename is None:
            self.fields += 1
            if self.fields > self.limits.max_fields:
                raise invalid_form(f"it has more than {self.limits.max_fields} fields.")
        else:
            self.files += 1
            if self.files > self.limits.max_files:
                raise bad_request(f"At most {self.limits.max_files} files may be sent.", name)

    def _spooled_file(self) -> BinaryIO:
        path = self.prefix.with_name(f"{self.prefix.name}.{len(self._spooled)}")
        self._spooled.append(path)
        return path.open("wb")

    def _data_in(self, data: bytes, start: int, end: int) -> None:
        name, filename, _ = self._part
        self._size += end - start
        if filename is None:
            self._text(end - start)
            if self._size > self.limits.max_field_bytes:
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
        self.parts.append(FormPart(*self._part, b"", Path(self._data.name)))

    def discard(self) -> None:
        self._data.close()
        for path in self._spooled:
            path.unlink(missing_ok=True)
