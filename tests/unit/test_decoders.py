"""server/decoders.py: real decode processes, their frames, and a runaway killed and replaced. What a job reads
(a spooled body, an input image) is a file, as in the server: the decode process is sent its path."""

import asyncio
import base64
import io
import json
import os
import time

import pytest

from bench.attacks import many_scan_jpeg
from server.bodies import MAX_REST, FormLimits, form_file_job, json_job, read_form, read_json
from server.budget import InputBudget
from server.decoders import DECODE_NICENESS, DecoderPool, WorkerDied, read_frame, write_frame
from server.errors import APIError
from server.images import InputImage, decode_job, inspect_job
from server.metrics import Metrics
from server.spool import Spool, SpooledFile
from tests.support.images import gradient, png_bytes

MAX_PIXELS = 2048 * 2048  # the server's default: what an input is decoded to at most


@pytest.fixture(scope="module")
def runaway(tmp_path_factory) -> InputImage:
    """A progressive JPEG of 40,000 scans: ~15 s of decoding."""
    path = tmp_path_factory.mktemp("runaway") / "image.jpg"
    path.write_bytes(many_scan_jpeg(2048, 40_000))
    return InputImage(path, "image", "JPEG", 2048, 2048, False)


def png_file(tmp_path, width: int, height: int, name: str = "image.png") -> InputImage:
    path = tmp_path / name
    path.write_bytes(png_bytes(gradient(width, height)))
    return InputImage(path, "image", "PNG", width, height, False)


def pool_run(jobs, decode_timeout: float = 10.0, request_seconds: float = 30.0, workers: int = 1):
    """Runs `jobs(pool, deadline)` (a coroutine) with a started pool; returns its result and the pool."""

    async def main():
        pool = DecoderPool(workers, decode_timeout, 50_000_000, Metrics().decodes_killed)
        pool.start()
        while pool._idle.qsize() < workers:  # started: a worker's start never counts against a job
            await asyncio.sleep(0.05)
        try:
            return await jobs(pool, time.monotonic() + request_seconds), pool
        finally:
            pool.close()

    return asyncio.run(main())


def test_a_spooled_json_body_comes_back_whole_with_its_data_urls_in_files(tmp_path):
    images = [os.urandom(100_000), os.urandom(100_001)]
    urls = ["data:image/png;base64," + base64.b64encode(data).decode() for data in images]
    payload = {"prompt": "x", "images": [{"image_url": url} for url in urls], "deep": [[["é" * 5000]]]}
    text = json.dumps(payload, ensure_ascii=False)  # the é as UTF-8: 10,000 bytes, under MAX_LONG_TEXT
    odd = json.dumps("\ud800" + "z" * 5000)  # a lone surrogate, which JSON allows (escaped: not UTF-8)
    body = tmp_path / "body"
    body.write_bytes((text[:-1] + ', "odd": ' + odd + "}").encode())
    folder = tmp_path / "spool"
    folder.mkdir()

    async def jobs(pool, deadline):
        return await pool.run(json_job(body, folder, 1 << 20), deadline, "the JSON body", None)

    (data, files), _ = pool_run(jobs)
    markers = [image["image_url"] for image in data["images"]]
    assert list(files) == markers and len(set(markers)) == 2
    assert [files[m].path.read_bytes() for m in markers] == images  # the exact bytes, each in its own file
    assert [(files[m].size, files[m].error) for m in markers] == [(100_000, ""), (100_001, "")]
    assert {p.name for p in folder.iterdir()} == {files[m].path.name for m in markers}
    for image in data["images"]:
        spooled = files[image["image_url"]].path.read_bytes()
        image["image_url"] = "data:image/png;base64," + base64.b64encode(spooled).decode()
    assert data == json.loads(body.read_bytes())
    assert data["odd"][0] == "\ud800" and data["deep"] == [[["é" * 5000]]]


def test_a_spooled_data_url_that_is_not_base64_comes_back_as_an_error_for_its_marker(tmp_path):
    body = tmp_path / "body"
    body.write_text(json.dumps({"prompt": "x", "images": [{"image_url": "data:image/png;base64," + "@" * 5000}]}))

    async def jobs(pool, deadline):
        return await pool.run(json_job(body, tmp_path, 1 << 20), deadline, "the JSON body", None)

    (data, files), _ = pool_run(jobs)
    marker = data["images"][0]["image_url"]
    assert files == {marker: SpooledFile(None, 0, "is not valid base64.", None)}
    assert [p.name for p in tmp_path.iterdir()] == ["body"]


def test_a_bad_body_is_the_400_its_parser_gives(tmp_path):
    body = tmp_path / "body"
    body.write_bytes(b'{"prompt": ' + b"[" * 100_000)

    async def jobs(pool, deadline):
        with pytest.raises(APIError) as err:
            await pool.run(json_job(body, tmp_path, 1 << 20), deadline, "the JSON body", None)
        return err.value

    error, _ = pool_run(jobs)
    assert error.status == 400 and error.code == "invalid_json"


def multipart(boundary: str, parts: list[tuple[str, str | None, bytes]]) -> bytes:
    return (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'.encode()
            + (f'; filename="{filename}"\r\nContent-Type: image/png'.encode() if filename else b"")
            + b"\r\n\r\n"
            + data
            + b"\r\n"
            for name, filename, data in parts
        )
        + f"--{boundary}--\r\n".encode()
    )


def test_a_multipart_body_is_parsed_within_its_limits(tmp_path):
    boundary = "b0undary"
    parts = [("prompt", None, b"a fox"), ("image", "a.png", png_bytes(gradient(8, 8))), ("image", "b.png", b"x" * 10)]
    body = tmp_path / "body.1"
    body.write_bytes(multipart(boundary, parts))
    content_type = f"multipart/form-data; boundary={boundary}"
    kept, refused = tmp_path / "kept", tmp_path / "refused"
    kept.mkdir()
    refused.mkdir()

    async def jobs(pool, deadline):
        found = await pool.run(
            form_file_job(body, content_type, FormLimits(2, 10, 1024, 1024), kept), deadline, "form", None
        )
        with pytest.raises(APIError) as err:
            await pool.run(
                form_file_job(body, content_type, FormLimits(1, 10, 1024, 1024), refused), deadline, "form", None
            )
        return found, err.value

    (found, error), _ = pool_run(jobs)
    assert [(p.name, p.filename) for p in found] == [(name, filename) for name, filename, _ in parts]
    assert found[0].text == "a fox" and found[0].path is None  # a text field comes back in memory
    assert [(p.data, p.path.parent, p.path.read_bytes()) for p in found[1:]] == [(b"", kept, d) for *_, d in parts[1:]]
    assert found[1].content_type == "image/png"
    assert sorted(p.name for p in kept.iterdir()) == ["body.1.0", "body.1.1"]
    assert error.status == 400 and "At most 1 files" in error.message
    assert list(refused.iterdir()) == []  # the file it had written before the second was refused is gone


def test_multipart_files_and_text_fields_are_bounded(tmp_path):
    boundary = "b0undary"
    content_type = f"multipart/form-data; boundary={boundary}"
    field = b"t" * (MAX_REST // 2 + 1)  # under max_field_bytes: only two of them together are too many
    bodies = {
        "fits": [("prompt", None, field), ("image", "a.png", b"x" * 1024)],
        "large-file": [("prompt", None, b"p"), ("image", "a.png", b"x" * 1025)],
        "large-text": [("prompt", None, field), ("negative_prompt", None, field)],
    }
    for name, parts in bodies.items():
        (tmp_path / name).write_bytes(multipart(boundary, parts))
    limits = FormLimits(4, 10, MAX_REST, 1024, "image_too_large")

    async def jobs(pool, deadline):
        fits = await pool.run(form_file_job(tmp_path / "fits", content_type, limits, tmp_path), deadline, "form", None)
        errors = []
        for name in ("large-file", "large-text"):
            with pytest.raises(APIError) as err:
                await pool.run(form_file_job(tmp_path / name, content_type, limits, tmp_path), deadline, "form", None)
            errors.append(err.value)
        return fits, errors

    (fits, (file_error, text_error)), _ = pool_run(jobs)
    assert fits[0].data == field and fits[1].path.read_bytes() == b"x" * 1024
    assert (file_error.status, file_error.code, file_error.param) == (400, "image_too_large", "image")
    assert (text_error.status, text_error.code) == (400, "invalid_multipart") and "text fields" in text_error.message
    # the refused bodies left no file part behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fits", "fits.0", "large-file", "large-text"]


def spooled(tmp_path, body: bytes):
    """A request's spool, on a disk budget of its own, and a coroutine that writes `body` to it as it arrives."""
    budget = InputBudget(64 << 20, 1.0, Metrics().input_disk, "disk")
    spool = Spool(str(tmp_path / "spool"), budget)
    spool.start()
    request = spool.request("tenant")

    async def chunks():
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    async def write():
        return await request.write(chunks(), "body")

    return budget, request, write


def test_a_spooled_json_body_leaves_its_decoded_data_urls_on_the_spool_and_nothing_else(tmp_path):
    image = os.urandom(200_000)
    images = [{"image_url": "data:image/png;base64," + base64.b64encode(image).decode()}]
    images.append({"image_url": "data:image/png;base64," + "@" * 5000})
    body = json.dumps({"prompt": "p", "images": images}).encode()
    budget, request, write = spooled(tmp_path, body)

    async def jobs(pool, deadline):
        path = await write()
        held = request.disk.bytes
        return path, held, await read_json(path, request, pool, deadline, 1 << 20)

    (path, held, data), _ = pool_run(jobs)
    assert held == len(body) and not path.exists()  # the body was on disk, and is gone once parsed
    good, bad = (image["image_url"] for image in data["images"])
    assert request.data_url(good, "images[0].image_url").read_bytes() == image
    assert request.disk.bytes == budget.held["tenant"] == len(image)  # what the spool holds: the file alone
    with pytest.raises(APIError) as err:
        request.data_url(bad, "images[1].image_url")
    assert (err.value.status, err.value.param) == (400, "images[1].image_url")
    assert err.value.message == "'images[1].image_url' is not valid base64."
    assert request.data_url("p", "prompt") is None  # a string that is not a marker
    request.remove()
    assert not request.folder.exists() and budget.held.total() == 0


def test_a_spooled_multipart_body_leaves_its_files_on_the_spool_and_its_text_in_memory(tmp_path):
    boundary = "b0undary"
    image = os.urandom(100_000)
    body = multipart(boundary, [("prompt", None, b"a fox"), ("image", "a.png", image)])
    budget, request, write = spooled(tmp_path, body)
    limits = FormLimits(2, 10, 1024, 1 << 20)

    async def jobs(pool, deadline):
        path = await write()
        return path, await read_form(path, f"multipart/form-data; boundary={boundary}", limits, request, pool, deadline)

    (path, (prompt, file)), _ = pool_run(jobs)
    assert not path.exists() and (prompt.data, prompt.path) == (b"a fox", None)
    assert file.path.parent == request.folder and file.path.read_bytes() == image and file.data == b""
    assert sorted(request.folder.iterdir()) == [file.path]
    assert request.disk.bytes == budget.held["tenant"] == len(image)
    request.remove()
    assert budget.held.total() == 0


def test_an_input_file_is_inspected_in_a_decode_process(tmp_path):
    image = png_file(tmp_path, 64, 48)
    not_an_image = tmp_path / "text"
    not_an_image.write_bytes(b"not an image")

    async def jobs(pool, deadline):
        found = await pool.run(inspect_job(image.path, "image[0]", 100), deadline, "'image[0]'", "image[0]")
        with pytest.raises(APIError) as err:
            await pool.run(inspect_job(not_an_image, "mask", 100), deadline, "'mask'", "mask")
        return found, err.value

    (found, error), _ = pool_run(jobs)
    assert found == InputImage(image.path, "image[0]", "PNG", 64, 48, False)
    assert (error.status, error.param) == (400, "mask")


def test_pixels_come_back_as_decoded(tmp_path):
    image = png_file(tmp_path, 64, 48)

    async def jobs(pool, deadline):
        return await pool.run(decode_job(image, False, MAX_PIXELS), deadline, "'image'", "image")

    decoded, _ = pool_run(jobs)
    assert decoded.size == (64, 48) and decoded.tobytes() == gradient(64, 48).tobytes()


def test_a_body_past_decode_timeout_is_a_body_too_costly_400_naming_no_image(tmp_path):
    """A body is no image: its parse past DECODE_TIMEOUT says so (an image's is `image_too_costly`, above)."""
    body = tmp_path / "body"
    url = "data:image/png;base64," + "A" * (32 << 20)  # 32 MB to decode into a file: not one ms
    body.write_bytes(json.dumps({"prompt": "p", "images": [{"image_url": url}]}).encode())

    async def jobs(pool, deadline):
        with pytest.raises(APIError) as err:
            await pool.run(json_job(body, tmp_path, 64 << 20), deadline, "the JSON body", None)
        return err.value

    error, _ = pool_run(jobs, decode_timeout=0.001)
    assert (error.status, error.code, error.param) == (400, "body_too_costly", None)
    assert error.message.startswith("the JSON body took longer than") and "file" not in error.message


def test_a_decode_past_decode_timeout_is_killed_and_the_next_job_gets_a_new_worker(runaway, tmp_path):
    image = png_file(tmp_path, 64, 48)

    async def jobs(pool, deadline):
        with pytest.raises(APIError) as err:
            await pool.run(decode_job(runaway, False, MAX_PIXELS), deadline, "'image'", "image")
        decoded = await pool.run(decode_job(image, False, MAX_PIXELS), deadline, "'image'", "image")
        return err.value, decoded.size, pool.killed._value.get()

    (error, size, killed), _ = pool_run(jobs, decode_timeout=0.5)
    assert error.status == 400 and error.code == "image_too_costly" and "DECODE_TIMEOUT" in error.message
    assert size == (64, 48) and killed == 1


def test_past_the_request_deadline_the_decode_is_killed_and_the_request_is_a_504(runaway):
    async def jobs(pool, deadline):
        with pytest.raises(APIError) as err:
            await pool.run(decode_job(runaway, False, MAX_PIXELS), deadline, "'image'", "image")
        return err.value

    error, pool = pool_run(jobs, request_seconds=0.5)
    assert error.status == 504 and error.code == "timeout" and pool.killed._value.get() == 1


def test_a_request_cancelled_mid_decode_kills_its_worker_at_once(runaway):
    async def jobs(pool, deadline):
        task = asyncio.ensure_future(pool.run(decode_job(runaway, False, MAX_PIXELS), deadline, "'image'", "image"))
        await asyncio.sleep(1.0)  # the worker is decoding
        idle = pool._idle.qsize()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return idle

    idle_during, pool = pool_run(jobs)
    assert idle_during == 0 and pool.killed._value.get() == 1


def test_a_worker_that_dies_mid_job_is_a_400_and_is_replaced(runaway, tmp_path):
    async def jobs(pool, deadline):
        (worker,) = pool._idle._queue  # the pool's one worker, about to take the job
        task = asyncio.ensure_future(pool.run(decode_job(runaway, False, MAX_PIXELS), deadline, "'image'", "image"))
        await asyncio.sleep(1.0)
        os.kill(worker.proc.pid, 9)  # as the kernel's OOM killer would
        with pytest.raises(APIError) as err:
            await task
        image = png_file(tmp_path, 8, 8)
        return err.value, (await pool.run(decode_job(image, False, MAX_PIXELS), deadline, "'image'", "image")).size

    (error, size), _ = pool_run(jobs)
    assert error.status == 400 and "decoder failed" in error.message and size == (8, 8)


def test_the_server_reads_frames_within_their_bounds():
    out = io.BytesIO()
    write_frame(out, {"op": "x"}, [b"abc", b"de"])
    header, blobs = read_frame(io.BytesIO(out.getvalue()), 5)
    assert header["op"] == "x" and blobs == [b"abc", b"de"]
    with pytest.raises(WorkerDied):
        read_frame(io.BytesIO(out.getvalue()), 4)  # more than the job allows
    with pytest.raises(WorkerDied):
        read_frame(io.BytesIO(b"\xff\xff\xff\xff"), 1 << 30)  # a header past MAX_HEADER


def test_decode_processes_run_below_the_server_s_cpu_priority():
    """What callers send yields the CPU to the event loop and the engine (server/decoders.py, DECODE_NICENESS)."""

    async def jobs(pool, deadline):
        return [os.getpriority(os.PRIO_PROCESS, worker.proc.pid) for worker in pool._idle._queue]

    (niceness,), _ = pool_run(jobs)
    assert niceness == min(19, os.getpriority(os.PRIO_PROCESS, 0) + DECODE_NICENESS)
