"""The decode processes: where the bytes callers send are parsed and decoded, and where a runaway is killed.

A thread cannot be stopped, and a long C call in one (json.loads of a 64 MB body, a progressive JPEG's scans)
holds the GIL and so the event loop. So JSON bodies above LARGE_BODY, multipart bodies and input images are
handled by DECODE_WORKERS child processes (`python -m server.decoders`), one job at a time each. A job has
a deadline, the request's and at most DECODE_TIMEOUT: a worker still busy past it is killed and replaced,
and the request gets its answer (400 past DECODE_TIMEOUT, 504 past the request's deadline). A worker's
address space is capped, so a decoder that allocates without end fails alone.

The pipes carry frames: a 4-byte length, a JSON header, then the blobs the header lists. The server never
unpickles what a worker sends: a worker holds caller bytes, and the frame format gives it nothing to run.
Pixels come back raw (RGB or L) and are checked against the size the structure walk read, fitted to
MAX_PIXELS (server/images.py).
"""

import asyncio
import json
import logging
import os
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from PIL import Image

from server.errors import APIError, bad_request

log = logging.getLogger(__name__)

MAX_HEADER = 1 << 20  # bytes of a frame's JSON header
# A decode process's CPU priority below the server's: what callers send yields the CPU to the event loop and the
# engine (at 10 a busy decode gets about a tenth of a core another thread wants; an idle CPU it gets whole)
DECODE_NICENESS = 10
_LENGTH = struct.Struct(">I")
_CHANNELS = {"RGB": 3, "L": 1}


class WorkerDied(Exception):
    """The worker process ended mid-job: killed for its deadline, or crashed."""


# -- frames ---------------------------------------------------------------------------------------------


def write_frame(out: BinaryIO, header: dict, blobs: list[bytes]) -> None:
    head = json.dumps({**header, "blobs": [len(b) for b in blobs]}).encode()
    out.write(_LENGTH.pack(len(head)) + head)
    for blob in blobs:
        out.write(blob)
    out.flush()


def _read_exactly(source: BinaryIO, size: int) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = source.readinto(view[got:])
        if not n:
            raise WorkerDied("the worker's pipe closed")
        got += n
    return buffer


def read_frame(source: BinaryIO, max_blob_bytes: int) -> tuple[dict, list[bytearray]]:
    (size,) = _LENGTH.unpack(_read_exactly(source, _LENGTH.size))
    if size > MAX_HEADER:
        raise WorkerDied(f"a frame header of {size} bytes")
    header = json.loads(_read_exactly(source, size))
    sizes = header.get("blobs", [])
    if sum(sizes) > max_blob_bytes:
        raise WorkerDied(f"{sum(sizes)} bytes of blobs, more than the {max_blob_bytes} expected")
    return header, [_read_exactly(source, n) for n in sizes]


# -- the pool (server side) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One job for a worker: what it is sent, what may come back, and how the answer becomes a result (in
    the I/O thread, off the event loop)."""

    header: dict
    blobs: list[bytes]
    max_reply_bytes: int
    finish: Callable[[dict, list[bytearray]], Any]


class Worker:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def started(self) -> "Worker":
        """I/O thread: waits for the worker's first frame, sent once its imports are done (a job's time
        counts from then, never the start of Python)."""
        try:
            read_frame(self.proc.stdout, 0)
        except (OSError, ValueError, WorkerDied):
            self.reap()
            raise WorkerDied("the worker did not start") from None
        return self

    def call(self, job: Job) -> Any:
        """I/O thread: send the job, read the answer; WorkerDied when the process ends first."""
        try:
            write_frame(self.proc.stdin, job.header, job.blobs)
            reply, blobs = read_frame(self.proc.stdout, job.max_reply_bytes)
        except (OSError, ValueError, WorkerDied) as exc:
            log.info("decode process %d lost mid-job: %r", self.proc.pid, exc)
            self.kill()
            raise WorkerDied("the decode process was lost") from None
        if "error" in reply:
            error = reply["error"]
            raise APIError(400, error["message"], param=error.get("param"), code=error.get("code"))
        return job.finish(reply, blobs)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def reap(self) -> None:
        self.kill()
        self.proc.wait()


class DecoderPool:
    """DECODE_WORKERS processes, started with the server; each job waits for a free one within its deadline."""

    def __init__(self, workers: int, decode_timeout: float, max_pixels: int, killed) -> None:
        self.size = workers
        self.decode_timeout = decode_timeout
        self.killed = killed  # a counter: workers killed for their deadline
        memory = (1 << 30) + 16 * max_pixels  # Python and Pillow, a chunk of a body, and an RGBA image with its copies
        self.argv = [sys.executable, "-m", "server.decoders", str(max_pixels), str(memory)]
        # the worker idle last goes first: jobs one at a time keep one process's memory warm, not every one's
        self._idle: asyncio.LifoQueue[Worker] | None = None
        self._threads = ThreadPoolExecutor(2 * workers, thread_name_prefix="decode-io")  # jobs, starts and ends

    def start(self) -> None:
        """On the event loop."""
        self._idle = asyncio.LifoQueue()
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> None:
        """A new worker, idle once it has started."""
        starting = asyncio.get_running_loop().run_in_executor(self._threads, Worker(self.argv).started)
        starting.add_done_callback(self._started)

    def _started(self, starting: asyncio.Future) -> None:
        if starting.exception() is not None:
            log.error("a decode process failed to start: one decode worker fewer until the server restarts")
            return
        self._idle.put_nowait(starting.result())

    async def run(self, job: Job, deadline: float, what: str, param: str | None) -> Any:
        """The job's result; 400 (its answer, or `what` past DECODE_TIMEOUT), 504 past the request's deadline.
        A worker still busy at either, or when the request is cancelled, is killed and replaced."""
        worker = await self._take(deadline)
        limit = time.monotonic() + self.decode_timeout  # from when a worker has the job
        call = asyncio.get_running_loop().run_in_executor(self._threads, worker.call, job)
        call.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved, whoever waits
        try:
            return await asyncio.wait_for(asyncio.shield(call), max(0.0, min(limit, deadline) - time.monotonic()))
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise timed_out_while(f"decoding {what}") from None
            raise too_slow(what, self.decode_timeout, param) from None
        except WorkerDied:
            raise bad_request(f"{what} could not be decoded (its decoder failed).", param) from None
        finally:
            self._give_back(worker, call)

    def _give_back(self, worker: Worker, call: asyncio.Future) -> None:
        """A worker that finished its job goes back to the pool; one still busy (or dead) is replaced."""
        if call.done() and not isinstance(call.exception(), WorkerDied):
            self._idle.put_nowait(worker)
            return
        worker.kill()
        self.killed.inc()
        self._threads.submit(worker.reap)
        self._spawn()

    async def _take(self, deadline: float) -> Worker:
        try:
            return await asyncio.wait_for(self._idle.get(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise timed_out_while("waiting for a decoder") from None

    def close(self) -> None:
        if self._idle is None:
            return
        while not self._idle.empty():
            self._idle.get_nowait().reap()  # a busy one (none after the drain) ends at its stdin's EOF
        self._threads.shutdown(wait=False, cancel_futures=True)


def too_slow(what: str, seconds: float, param: str | None) -> APIError:
    """A job past DECODE_TIMEOUT: an input image's (`param` names it) or a body's."""
    code = "image_too_costly" if param is not None else "body_too_costly"
    message = f"{what} took longer than {seconds:g} seconds to decode (DECODE_TIMEOUT); send a simpler one."
    return bad_request(message, param, code)


def timed_out_while(what: str) -> APIError:
    message = f"The request's deadline (REQUEST_TIMEOUT) passed while {what}."
    return APIError(504, message, type="timeout_error", code="timeout")


# -- the worker (child side) ------------------------------------------------------------------------------


def serve(max_pixels: int, memory: int) -> None:
    """A worker's life: frames in on stdin, frames out on stdout, until stdin closes."""
    from server import bodies, images
    from server.budget import map_large_allocations

    map_large_allocations()
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    os.nice(DECODE_NICENESS)
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own check, behind the structure walk
    source, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stdout carries frames only
    ops = {
        "json": bodies.split_json,
        "form": bodies.split_form,
        "inspect": images.inspect_frame,
        "image": images.decode_frame,
    }
    write_frame(out, {"ready": True}, [])
    while _serve_one(ops, source, out):
        pass


def _serve_one(ops: dict, source: BinaryIO, out: BinaryIO) -> bool:
    """One job: its frame in, its answer out; False once stdin has closed. Nothing of a job outlives it (its
    answer's blobs held until the next job's end would double what a worker holds)."""
    try:
        header, blobs = read_frame(source, 1 << 40)
    except WorkerDied:
        return False
    try:
        reply, out_blobs = ops[header["op"]](header, blobs)
    except APIError as exc:
        reply, out_blobs = {"error": {"message": exc.message, "param": exc.param, "code": exc.code}}, []
    except MemoryError:
        reply, out_blobs = {"error": {"message": "decoding it needs more memory than any input may use"}}, []
    write_frame(out, reply, out_blobs)
    return True


if __name__ == "__main__":
    serve(*(int(arg) for arg in sys.argv[1:3]))
