"""server/bodies.py: JSON bodies and multipart fields, bounded and never a 500."""

import base64
import contextlib
import json
import os
import random
from pathlib import Path

import pytest

from server import bodies
from server.bodies import (
    LONG_STRING,
    MAX_DATA_URLS,
    MAX_JSON_VALUES,
    MAX_LONG_TEXT,
    MAX_REST,
    MAX_TEXT,
    FormLimits,
    form_fields,
    json_job,
    parse_form,
    parse_json,
    split_json,
)
from server.errors import APIError
from server.spool import SpooledFile


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


# -- spooled JSON bodies: split_json and its _DataURLs scan, on files -------------------------------------------


def split(folder: Path, body: bytes, max_image_bytes: int = 1 << 20) -> tuple[dict, dict[str, SpooledFile]]:
    """What a decode process makes of a spooled JSON body, and what the server then learns: the body written to
    `folder`, the job's header through `split_json`, its reply through JSON (as a frame carries it) and the job's
    own `finish`."""
    folder.mkdir(exist_ok=True)
    path = folder / "body"
    path.write_bytes(body)
    job = json_job(path, folder, max_image_bytes)
    reply, blobs = split_json(job.header, [])
    assert len(blobs) == 1  # the parsed rest, as a blob: escaped in the header it could pass MAX_HEADER
    return job.finish(json.loads(json.dumps(reply)), [bytearray(blob) for blob in blobs])


def refused(folder: Path, body: bytes, max_image_bytes: int = 1 << 20) -> APIError:
    with pytest.raises(APIError) as err:
        split(folder, body, max_image_bytes)
    assert err.value.status == 400
    return err.value


def left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def with_markers(node, files: dict[str, SpooledFile], replace):
    """The parsed body with each marker as `replace(marker)`."""
    if isinstance(node, dict):
        return {key: with_markers(value, files, replace) for key, value in node.items()}
    if isinstance(node, list):
        return [with_markers(value, files, replace) for value in node]
    return replace(node) if isinstance(node, str) and node in files else node


def resolved(node, files: dict[str, SpooledFile]):
    """The body as its sender meant it: each marker back as the data URL of its file's bytes."""

    def as_url(marker: str) -> str:
        return "data:image/png;base64," + base64.b64encode(files[marker].path.read_bytes()).decode()

    return with_markers(node, files, as_url)


def numbered(node, files: dict[str, SpooledFile]):
    """The parsed body with each marker as its place among the files: the same for any nonce."""
    return with_markers(node, files, lambda marker: ("file", list(files).index(marker)))


def data_url(data: bytes, escape_header: bool = True) -> str:
    """A data URL as a JSON string literal, each '/' of its payload escaped as '\\/' (as PHP's json_encode
    writes it); its header's '/' too, or not."""
    head = '"data:image/png;base64,'
    return (
        (head.replace("/", "\\/") if escape_header else head)
        + base64.b64encode(data).decode().replace("/", "\\/")
        + '"'
    )


def literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


_random = random.Random(8259)  # the same bytes each run: where the escapes fall is part of the test
IMAGES = [
    _random.randbytes(6000),  # '/' is 1 base64 character in 64: an escape here and there
    # a run of 0xff bytes ('////' in base64) where the literal passes LONG_STRING, and a payload that ends in
    # '////': escapes where the string turns out to be a data URL, and one just before its closing quote
    _random.randbytes(2001) + b"\xff" * 3000 + _random.randbytes(2001) + b"\xff" * 3,
    _random.randbytes(2001) + b"\xff" * 3000 + _random.randbytes(2001),
]
LONG_TEXT = '"\\/' * 1000 + "é" * 2000  # a quote, a backslash and a slash, escaped as 5 bytes
SHORT = b"\xff" * 30 + _random.randbytes(60)  # a data URL under LONG_STRING, with escapes: kept inline
TRICKY = (
    "{"
    + '"prompt": "a \\"quoted\\" fox, a \\\\ and a last backslash \\\\", '
    + f'"images": [{{"image_url": {data_url(IMAGES[0])}}}, {{"image_url": {data_url(IMAGES[1])}}}, '
    + f'{{"image_url": {data_url(SHORT)}}}], '
    + f'"mask": {{"image_url": {data_url(IMAGES[2], escape_header=False)}}}, '  # one byte on: the other parity
    + '"nested": [[1, ["\\\\", "\\"", "\\\\\\"", "\\\\\\\\"]], [], [[["x", {"k\\"\\\\": [2.5, null, true]}]]]], '
    + f'"long_text": {literal(LONG_TEXT)}, '  # escapes, past LONG_STRING: text
    + f'"not_base64": {literal("data:text/plain," + "x" * 5000)}'  # a data URL, not base64: text
    + "}"
).encode()


def test_the_tricky_body_holds_the_cases_it_is_for():
    text = TRICKY.decode()
    images = text.index('"images"')
    first = text.index('"data:image\\/png;base64,', images)
    second = text.index('"data:image\\/png;base64,', first + 1)
    mask = text.index('"data:image/png;base64,', text.index('"mask"'))
    # where the scan, fed a byte at a time, sees a string pass LONG_STRING: a backslash in one, a '/' in the other
    assert {text[second + LONG_STRING], text[mask + LONG_STRING]} == {"\\", "/"}
    assert text[second : text.index('"}', second)].count("\\/") > 4000
    assert text.index('\\/"}', second) == text.index('"}', second) - 2  # an escape before the closing quote
    assert len(data_url(SHORT)) < LONG_STRING < len(literal(json.loads(TRICKY)["long_text"]).encode()) < MAX_LONG_TEXT
    assert json.loads(TRICKY)["prompt"] == 'a "quoted" fox, a \\ and a last backslash \\'


def one_chunk(tmp_path: Path) -> tuple[dict, dict[str, SpooledFile]]:
    assert len(TRICKY) < bodies.READ_CHUNK  # split_json reads it in one chunk
    return split(tmp_path / "one-chunk", TRICKY)


def test_a_body_read_in_one_chunk_gives_its_data_with_its_long_data_urls_in_files(tmp_path):
    data, files = one_chunk(tmp_path)
    markers = [data["images"][0]["image_url"], data["images"][1]["image_url"], data["mask"]["image_url"]]
    assert list(files) == markers and len(set(markers)) == 3
    assert [files[m].path.read_bytes() for m in markers] == IMAGES  # the exact bytes, the escapes undone
    assert [(files[m].size, files[m].error, files[m].code) for m in markers] == [(len(i), "", None) for i in IMAGES]
    assert data["images"][2]["image_url"] == "data:image/png;base64," + base64.b64encode(SHORT).decode()  # inline
    assert resolved(data, files) == json.loads(TRICKY)
    assert left_in(tmp_path / "one-chunk") == sorted(["body"] + [files[m].path.name for m in markers])


@pytest.mark.parametrize("chunk", [*range(1, 41), LONG_STRING - 1, LONG_STRING, LONG_STRING + 1])
def test_a_body_read_in_chunks_of_any_size_gives_the_same_data_and_files(tmp_path, monkeypatch, chunk):
    expected, expected_files = one_chunk(tmp_path)
    monkeypatch.setattr(bodies, "READ_CHUNK", chunk)  # split_json reads the body `chunk` bytes at a time
    data, files = split(tmp_path / "chunked", TRICKY)
    assert numbered(data, files) == numbered(expected, expected_files)
    assert [(f.path.read_bytes(), f.size, f.error, f.code) for f in files.values()] == [
        (f.path.read_bytes(), f.size, f.error, f.code) for f in expected_files.values()
    ]
    assert resolved(data, files) == json.loads(TRICKY)
    assert left_in(tmp_path / "chunked") == sorted(["body"] + [f.path.name for f in files.values()])


def test_a_long_string_that_is_no_data_url_is_a_400_past_max_long_text(tmp_path):
    at_cap = "\\ud83d\\ude00" * MAX_TEXT  # MAX_TEXT characters past U+FFFF, escaped: MAX_LONG_TEXT bytes
    assert len(at_cap) == MAX_LONG_TEXT
    data, files = split(tmp_path / "at-cap", f'{{"prompt": "{at_cap}"}}'.encode())
    assert data == {"prompt": "\U0001f600" * MAX_TEXT} and files == {}
    over = {
        "one-byte-more": at_cap + "x",
        "no-base64": "data:image/png," + "A" * MAX_LONG_TEXT,
        "no-comma": "data:image/png;base64" + "A" * MAX_LONG_TEXT,
    }
    for name, text in over.items():
        error = refused(tmp_path / name, f'{{"images": [{{"image_url": "{text}"}}]}}'.encode())
        assert error.code == "invalid_json" and "not a base64 data URL" in error.message, name
        assert left_in(tmp_path / name) == ["body"], name


def test_a_string_literal_one_byte_past_max_long_text_is_a_400(tmp_path):
    text = "\\u00e9" * (2 * MAX_TEXT) + "x"  # within its quotes, MAX_LONG_TEXT + 1 bytes
    assert len(text) == MAX_LONG_TEXT + 1
    assert refused(tmp_path, f'{{"prompt": "{text}"}}'.encode()).code == "invalid_json"


def test_a_prompt_of_max_text_characters_is_taken_however_it_is_escaped(tmp_path):
    prompt = "\U0001f600" * MAX_TEXT
    for name, body in [
        ("raw", json.dumps({"prompt": prompt}, ensure_ascii=False)),
        ("escaped", json.dumps({"prompt": prompt})),
    ]:
        assert split(tmp_path / name, body.encode())[0] == {"prompt": prompt}, name


def test_more_than_max_rest_besides_the_data_urls_is_a_400(tmp_path):
    head = b'{"prompt": "p", "seed": 1'
    body = head + b" " * (MAX_REST - len(head) - 1) + b"}"
    assert len(body) == MAX_REST
    assert split(tmp_path / "at-cap", body)[0] == {"prompt": "p", "seed": 1}
    error = refused(tmp_path / "one-byte-more", head + b" " + body[len(head) :])
    assert error.code == "invalid_json" and f"more than {MAX_REST // 1024} KiB" in error.message
    strings = json.dumps({"a": ["x" * 4000] * (MAX_REST // 4000 + 1)}).encode()  # short strings count too
    assert refused(tmp_path / "strings", strings).code == "invalid_json"
    # data URLs are not counted: 3 MiB of them beside nearly MAX_REST of the rest
    image = os.urandom(3 << 20)
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    fits = {
        "images": [{"image_url": url}],
        "prompt": "p" * MAX_TEXT,
        "pad": ["y" * 4000] * ((MAX_REST - 40_000) // 4000),
    }
    data, files = split(tmp_path / "urls", json.dumps(fits).encode(), max_image_bytes=4 << 20)
    assert resolved(data, files) == fits and [f.path.read_bytes() for f in files.values()] == [image]


def test_a_utf16_or_utf32_body_is_a_400_and_a_utf8_bom_is_skipped(tmp_path):
    payload = {"prompt": "p", "images": [{"image_url": "data:image/png;base64," + "AAAA" * 2000}]}
    for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"):
        error = refused(tmp_path / encoding, json.dumps(payload).encode(encoding))
        assert error.code == "invalid_json" and "not UTF-8" in error.message, encoding
        assert left_in(tmp_path / encoding) == ["body"], encoding  # no data URL was decoded
    data, files = split(tmp_path / "utf-8-sig", json.dumps(payload).encode("utf-8-sig"))
    assert resolved(data, files) == payload


def test_a_data_url_that_is_not_base64_or_too_large_is_an_error_for_its_marker_and_leaves_no_file(tmp_path):
    largest = 10_000
    good = os.urandom(largest)
    payloads = {
        "good": base64.b64encode(good).decode(),
        "not-base64": "A" * 5000 + "@@@@" + "A" * 400,
        "late-fault": "A" * 12_000 + "A-A=",  # 9,000 bytes decoded, then a fault
        "escape": "A" * 5000 + "\\n" + "AAAA",  # only '\/' is an escape a data URL may hold
        "unicode-escape": "A" * 5000 + "\\u0041AAA",
        "truncated": "A" * 5001,  # not a whole number of base64 quartets
        "too-large": base64.b64encode(os.urandom(largest + 1)).decode(),
        "much-too-large": base64.b64encode(os.urandom(5 * largest)).decode(),
    }
    body = json.dumps({"images": [{"image_url": f"data:image/png;base64,{p}"} for p in payloads.values()]})
    data, files = split(tmp_path, body.replace("\\\\", "\\").encode(), max_image_bytes=largest)
    markers = dict(zip(payloads, (image["image_url"] for image in data["images"]), strict=True))
    assert list(files) == list(markers.values())
    assert files[markers["good"]].path.read_bytes() == good and files[markers["good"]].size == largest
    invalid = SpooledFile(None, 0, "is not valid base64.", None)
    for name in ("not-base64", "late-fault", "escape", "unicode-escape", "truncated"):
        assert files[markers[name]] == invalid, name
    for name in ("too-large", "much-too-large"):
        found = files[markers[name]]
        assert (found.path, found.code) == (None, "image_too_large") and found.error.startswith("is larger than")
    assert left_in(tmp_path) == sorted(["body", files[markers["good"]].path.name])


def test_padding_in_the_middle_of_a_data_url_is_refused_wherever_the_read_chunks_end(tmp_path, monkeypatch):
    payload = "AAAA" * 1200 + "AA==" + "AAAA" * 10
    body = json.dumps({"images": [{"image_url": f"data:image/png;base64,{payload}"}]}).encode()
    for chunk in (bodies.READ_CHUNK, 7, 4, 1):
        monkeypatch.setattr(bodies, "READ_CHUNK", chunk)
        (found,) = split(tmp_path / str(chunk), body)[1].values()
        assert found == SpooledFile(None, 0, "is not valid base64.", None), chunk


def test_a_data_url_whose_header_passes_long_string_is_judged_the_same_wherever_the_read_chunks_end(
    tmp_path, monkeypatch
):
    image = os.urandom(3000)
    url = "data:image/png;" + "x=y;" * (LONG_STRING // 2) + "base64," + base64.b64encode(image).decode()
    body = json.dumps({"images": [{"image_url": url}]}).encode()
    expected, expected_files = split(tmp_path / "one-chunk", body)
    assert (expected, expected_files) == (json.loads(body), {})  # its header passes LONG_STRING: kept as text
    monkeypatch.setattr(bodies, "READ_CHUNK", 1000)
    data, files = split(tmp_path / "chunked", body)
    assert numbered(data, files) == numbered(expected, expected_files)


def test_a_data_url_anywhere_but_under_image_url_is_a_400_naming_its_field(tmp_path):
    url = data_url(os.urandom(LONG_STRING))
    for n, (template, field) in enumerate(
        [
            ('{"prompt": %s}', "prompt"),
            ('{"images": [{"url": %s}]}', "images[0].url"),
            ('{"images": [{"image_url": "x"}, %s]}', "images[1]"),
            ('{"x": [[1, %s]]}', "x[0][1]"),
            ('{"image_url": {"image_url": "y", "b": %s}}', "image_url.b"),
        ]
    ):
        error = refused(tmp_path / str(n), (template % url).encode())
        assert error.param == field and "only an image_url takes one" in error.message, field
    key = refused(tmp_path / "key", f"{{{url}: 1}}".encode())
    assert key.code == "invalid_json" and "name is a data URL" in key.message
    short = "data:image/png;base64," + base64.b64encode(b"x" * 30).decode()
    assert split(tmp_path / "short", json.dumps({"prompt": short}).encode()) == ({"prompt": short}, {})


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "abc',
        b'{"prompt": "abc\\',
        b'{"prompt": "abc\\"}',
        b'{"prompt": "' + "é".encode() * 3000,
        b'{"images": [{"image_url": "data:image/png;base64,' + b"AAAA" * 2000,
        b'{"images": [{"image_url": "data:image/png;base64,' + b"AAAA" * 2000 + b"\\",
    ],
    ids=["short", "escape", "escaped-quote", "long-text", "data-url", "data-url-escape"],
)
def test_a_body_that_ends_inside_a_string_is_a_400(tmp_path, body):
    error = refused(tmp_path, body)
    assert error.code == "invalid_json" and "ends inside a string" in error.message


def test_a_body_refused_inside_a_data_url_leaves_neither_its_file_nor_an_open_handle(tmp_path):
    """The data URL being decoded when the body is refused: its file closed and removed at once, not when the
    garbage collector finds the scanner (which the refusal's traceback keeps alive)."""
    error = refused(tmp_path, b'{"images": [{"image_url": "data:image/png;base64,' + b"AAAA" * 2000)
    assert "ends inside a string" in error.message
    assert left_in(tmp_path) == ["body"]
    assert not [name for name in open_files() if "data-url" in name]


def open_files() -> list[str]:
    """What this process's file descriptors point to."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, gone once listed
            names.append(os.readlink(f"/proc/self/fd/{fd}"))
    return names


def test_a_body_that_ends_after_a_string_is_not_said_to_end_inside_one(tmp_path):
    error = refused(tmp_path, b'{"prompt": "abc\\\\"')  # the string ends: its last backslash is escaped
    assert error.code == "invalid_json" and "ends inside a string" not in error.message


def test_more_than_max_data_urls_long_data_urls_is_a_400(tmp_path):
    """Each long data URL is a file and a line of the reply: no request needs more than MAX_DATA_URLS."""
    url = "data:image/png;base64," + base64.b64encode(os.urandom(LONG_STRING)).decode()
    at_cap = json.dumps({"images": [{"image_url": url}] * MAX_DATA_URLS}).encode()
    assert len(split(tmp_path / "at-cap", at_cap)[1]) == MAX_DATA_URLS
    over = json.dumps({"images": [{"image_url": url}] * (MAX_DATA_URLS + 1)}).encode()
    error = refused(tmp_path / "over", over)
    assert error.code == "invalid_json" and f"more than {MAX_DATA_URLS} long data URLs" in error.message


def test_part_headers_count_with_the_text_fields_against_max_rest(tmp_path):
    """Parts' names come back to the server: python-multipart bounds each header line, not how many parts carry
    them, so their bytes count with the text fields'."""
    name = b"n" * 4000

    def form(parts: int) -> bytes:
        one = b'--b\r\nContent-Disposition: form-data; name="' + name + b'"\r\n\r\nv\r\n'
        return one * parts + b"--b--\r\n"

    limits, content_type = FormLimits(1, 1000, 1024, 1024), "multipart/form-data; boundary=b"
    assert len(parse_form([form(200)], content_type, limits, tmp_path / "body")) == 200
    with pytest.raises(APIError) as err:
        parse_form([form(300)], content_type, limits, tmp_path / "body")  # 1.2 MB of names
    assert err.value.code == "invalid_multipart" and "part headers hold more than 1024 KiB" in err.value.message
