"""server/decoders.py: real decode processes, their frames, and a runaway killed and replaced."""

import asyncio
import io
import json
import os
import time

import pytest

from bench.attacks import many_scan_jpeg
from server.bodies import FormLimits, form_job, json_job
from server.decoders import DecoderPool, WorkerDied, read_frame, write_frame
from server.errors import APIError
from server.images import InputImage, decode_job
from server.metrics import Metrics
from tests.support.images import gradient, png_bytes

RUNAWAY = InputImage(many_scan_jpeg(2048, 40_000), "image", "JPEG", 2048, 2048, False)  # ~15 s of decoding


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


def test_a_json_body_comes_back_whole_with_its_long_strings_outside_the_json():
    long = "data:image/png;base64," + "A" * 100_000
    payload = {"prompt": "x", "images": [{"image_url": long}, {"image_url": long + "B"}], "deep": [[["é" * 5000]]]}
    payload["odd"] = "\ud800" + "z" * 5000  # a lone surrogate, which JSON allows
    body = json.dumps(payload).encode()

    async def jobs(pool, deadline):
        return await pool.run(json_job(body), deadline, "the JSON body", None)

    parsed, _ = pool_run(jobs)
    assert parsed == json.loads(body)


def test_a_bad_body_is_the_400_its_parser_gives():
    async def jobs(pool, deadline):
        with pytest.raises(APIError) as err:
            await pool.run(json_job(b'{"prompt": ' + b"[" * 100_000), deadline, "the JSON body", None)
        return err.value

    error, _ = pool_run(jobs)
    assert error.status == 400 and error.code == "invalid_json"


def test_a_multipart_body_is_parsed_within_its_limits():
    boundary = "b0undary"
    parts = [("prompt", None, b"a fox"), ("image", "a.png", png_bytes(gradient(8, 8))), ("image", "b.png", b"x" * 10)]
    body = (
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
    content_type = f"multipart/form-data; boundary={boundary}"

    async def jobs(pool, deadline):
        found = await pool.run(form_job(body, content_type, FormLimits(2, 10, 1024, 1024)), deadline, "form", None)
        with pytest.raises(APIError) as err:
            await pool.run(form_job(body, content_type, FormLimits(1, 10, 1024, 1024)), deadline, "form", None)
        return found, err.value

    (found, error), _ = pool_run(jobs)
    assert [(p.name, p.filename, p.data) for p in found] == parts
    assert found[0].text == "a fox" and found[1].content_type == "image/png"
    assert error.status == 400 and "At most 1 files" in error.message


def test_pixels_come_back_as_decoded():
    image = InputImage(png_bytes(gradient(64, 48)), "image", "PNG", 64, 48, False)

    async def jobs(pool, deadline):
        return await pool.run(decode_job(image, False), deadline, "'image'", "image")

    decoded, _ = pool_run(jobs)
    assert decoded.size == (64, 48) and decoded.tobytes() == gradient(64, 48).tobytes()


def test_a_decode_past_decode_timeout_is_killed_and_the_next_job_gets_a_new_worker():
    image = InputImage(png_bytes(gradient(64, 48)), "image", "PNG", 64, 48, False)

    async def jobs(pool, deadline):
        with pytest.raises(APIError) as err:
            await pool.run(decode_job(RUNAWAY, False), deadline, "'image'", "image")
        decoded = await pool.run(decode_job(image, False), deadline, "'image'", "image")
        return err.value, decoded.size, pool.killed._value.get()

    (error, size, killed), _ = pool_run(jobs, decode_timeout=0.5)
    assert error.status == 400 and error.code == "image_too_costly" and "DECODE_TIMEOUT" in error.message
    assert size == (64, 48) and killed == 1


def test_past_the_request_deadline_the_decode_is_killed_and_the_request_is_a_504():
    async def jobs(pool, deadline):
        with pytest.raises(APIError) as err:
            await pool.run(decode_job(RUNAWAY, False), deadline, "'image'", "image")
        return err.value

    error, pool = pool_run(jobs, request_seconds=0.5)
    assert error.status == 504 and error.code == "timeout" and pool.killed._value.get() == 1


def test_a_request_cancelled_mid_decode_kills_its_worker_at_once():
    async def jobs(pool, deadline):
        task = asyncio.ensure_future(pool.run(decode_job(RUNAWAY, False), deadline, "'image'", "image"))
        await asyncio.sleep(1.0)  # the worker is decoding
        idle = pool._idle.qsize()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return idle

    idle_during, pool = pool_run(jobs)
    assert idle_during == 0 and pool.killed._value.get() == 1


def test_a_worker_that_dies_mid_job_is_a_400_and_is_replaced():
    async def jobs(pool, deadline):
        (worker,) = pool._idle._queue  # the pool's one worker, about to take the job
        task = asyncio.ensure_future(pool.run(decode_job(RUNAWAY, False), deadline, "'image'", "image"))
        await asyncio.sleep(1.0)
        os.kill(worker.proc.pid, 9)  # as the kernel's OOM killer would
        with pytest.raises(APIError) as err:
            await task
        image = InputImage(png_bytes(gradient(8, 8)), "image", "PNG", 8, 8, False)
        return err.value, (await pool.run(decode_job(image, False), deadline, "'image'", "image")).size

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
