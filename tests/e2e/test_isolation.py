"""Isolation between callers through the real server: each class of the isolation issue reproduced, and shown
to cost its sender alone.

No caller may hold the event loop, a decode worker past its bound, memory, a queue place it does not need, or
the server past REQUEST_TIMEOUT; a client that leaves or stops reading releases its request at once. Each test
asserts what does not depend on the machine's speed (a status, a bound with a wide margin, memory growth, a
count); bench/isolation.py measures the latencies. After every test the model still makes the same image from
the same seed, and no answer was a 500.
"""

import base64
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bench.attacks import (
    HostileServer,
    closed_by_server,
    connect,
    headers_then_nothing,
    many_scan_jpeg,
    non_reading,
    padded_png,
    raw_request,
)
from bench.harness import peak_rss_mib, reset_peak_rss
from tests.support.images import gradient, png_bytes
from tests.support.waiting import until

REQUEST_TIMEOUT = 15.0
WRITE_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
MARGIN = 4.0  # seconds: a bound on top of each deadline, far above what the server takes to act on it
FAST = {"num_inference_steps": 2, "seed": 3}
WRITE_DROPS = ("image_server_connections_dropped_total", 'reason="write_timeout"')


@pytest.fixture(scope="module")
def server():
    from tests.support.server import ServerProcess

    env = {
        "REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
        "WRITE_TIMEOUT": str(WRITE_TIMEOUT),
        "BODY_TIMEOUT": str(BODY_TIMEOUT),
        "REMOTE_IMAGE_HOSTS": "127.0.0.1:*",
        "PLUGINS": "upload",
        "UPLOAD_ALLOWED_HOSTS": "127.0.0.1:*",
        "UPLOAD_RETRIES": "0",
    }
    srv = ServerProcess(env).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def strict():
    """One queue place; JPEG scans unbounded and decodes cut at 1 s, to show the cut itself."""
    from tests.support.server import ServerProcess

    env = {
        "MAX_QUEUE": "1",
        "REQUEST_TIMEOUT": "5",
        "REMOTE_IMAGE_HOSTS": "127.0.0.1:*",
        "MAX_JPEG_SCANS": "1000000",
        "DECODE_TIMEOUT": "1",
    }
    srv = ServerProcess(env).start()
    yield srv
    srv.stop()


def reference(srv) -> bytes:
    body = {"prompt": "the same fox", "size": "64x64", "output_format": "png", **FAST}
    response = httpx.post(srv.url + "/v1/images/generations", json=body, timeout=60)
    assert response.status_code == 200
    return base64.b64decode(response.json()["data"][0]["b64_json"])


@pytest.fixture
def unharmed(server):
    """The server after the test: the same image from the same seed, no 500, nothing left in flight."""
    before = reference(server)
    yield server
    assert reference(server) == before
    assert server.metric("image_server_requests_total", 'status="500"') == 0
    until(lambda: server.metric("image_server_in_flight") == 0, timeout=30, what="nothing in flight")


def edit_json(srv, images: list[str], timeout: float = 60, **fields) -> httpx.Response:
    body = {"prompt": "p", "size": "64x64", "images": [{"image_url": u} for u in images], **FAST, **fields}
    return httpx.post(srv.url + "/v1/images/edits", json=body, timeout=timeout)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# -- 1, 2. what costs more to parse or decode than it is worth is refused from its structure ---------------


def test_png_padded_with_empty_chunks_is_refused_from_its_structure(unharmed):
    padded = padded_png(64, 400_000)  # 4.8 MB of empty chunks: seconds of Pillow's time per file
    response = edit_json(unharmed, [data_url(padded)] * 2)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "image_too_costly"
    assert response.json()["error"]["param"] == "images[0]"
    files = {"image": ("padded.png", padded, "image/png")}
    response = httpx.post(unharmed.url + "/v1/images/edits", files=files, data={"prompt": "p"}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["code"] == "image_too_costly"


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding(unharmed):
    files = {"image": ("scans.jpg", many_scan_jpeg(2048, 5000), "image/jpeg")}
    response = httpx.post(unharmed.url + "/v1/images/edits", files=files, data={"prompt": "p"}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "image_too_costly" and "scans" in error["message"] and error["param"] == "image"


def test_a_decode_past_its_bound_is_killed_and_its_worker_replaced(strict):
    files = {"image": ("scans.jpg", many_scan_jpeg(2048, 40_000), "image/jpeg")}  # ~15 s of decoding
    started = time.monotonic()
    response = httpx.post(strict.url + "/v1/images/edits", files=files, data={"prompt": "p"}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "image_too_costly"
    assert "DECODE_TIMEOUT" in response.json()["error"]["message"]
    assert time.monotonic() - started < 1 + MARGIN
    assert strict.metric("image_server_decodes_killed_total") == 1
    files = {"image": ("ok.png", png_bytes(gradient(64, 64)), "image/png")}
    fields = {"prompt": "p", "num_inference_steps": "2"}
    assert httpx.post(strict.url + "/v1/images/edits", files=files, data=fields, timeout=60).status_code == 200


# -- 3. every byte that comes in has a size bound and a deadline ------------------------------------------


def test_a_body_that_never_comes_is_dropped_at_the_body_deadline(unharmed):
    silent = headers_then_nothing(unharmed.url, "/v1/images/generations")
    dripping = headers_then_nothing(unharmed.url, "/v1/images/generations", sent=b'{"prompt":')
    with silent, dripping:
        assert closed_by_server(silent, BODY_TIMEOUT + MARGIN)
        for byte in b' "a slow fox", "size": "64x64"}':  # a byte every 0.3 s: slower than the deadline allows
            try:
                dripping.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.3)
        assert closed_by_server(dripping, BODY_TIMEOUT + MARGIN)


def test_a_trickling_remote_image_is_cut_at_the_request_deadline(unharmed):
    with HostileServer(interval=0.5) as target:
        started = time.monotonic()
        response = edit_json(unharmed, [target.url + "/slow.png"], timeout=REQUEST_TIMEOUT + 30)
        assert response.status_code == 504, response.text
        assert time.monotonic() - started < REQUEST_TIMEOUT + MARGIN
        assert target.requests == 1


def test_an_upload_target_answering_a_huge_error_costs_a_few_kilobytes(unharmed):
    with HostileServer(error_bytes=300 * 2**20) as target:
        reset_peak_rss(unharmed.proc.pid)
        before = peak_rss_mib(unharmed.proc.pid)
        body = {"prompt": "p", "size": "64x64", "upload_urls": [target.url + "/bucket/key"], **FAST}
        response = httpx.post(unharmed.url + "/v1/images/generations", json=body, timeout=60)
        assert response.status_code == 200
        item = response.json()["data"][0]
        assert item["upload"]["status"] == "failed" and item["upload"]["http_status"] == 400
        assert item["b64_json"]  # the image is not lost
        assert peak_rss_mib(unharmed.proc.pid) - before < 64
        assert target.sent < 32 * 2**20  # the rest was never read


# -- 4. every byte that goes out has a deadline; a request whose client left is released at once ---------


def stream_body(size: str = "1024x1024") -> bytes:
    """Events of 3.5 MB each (base64 of the demo's PNGs): more than the kernel's socket buffers hold (up to
    4 MB here), so the rest waits in the server's memory."""
    body = {"prompt": "p", "size": size, "stream": True, "partial_images": 2, "output_format": "png", **FAST}
    return json.dumps(body).encode()


def test_streams_that_never_read_are_dropped_at_the_write_timeout(unharmed):
    images = unharmed.metric("image_server_images_total")
    dropped = unharmed.metric(*WRITE_DROPS)
    sockets = [non_reading(unharmed.url, "POST", "/v1/images/generations", stream_body()) for _ in range(2)]
    try:
        until(lambda: unharmed.metric("image_server_images_total") >= images + 2, timeout=60, what="generation")
        until(lambda: unharmed.metric(*WRITE_DROPS) == dropped + 2, timeout=WRITE_TIMEOUT + MARGIN, what="drops")
        assert unharmed.metric("image_server_in_flight") == 0
        assert all(closed_by_server(s, 1) for s in sockets)  # dropped by the server: the clients kept theirs
    finally:
        for sock in sockets:
            sock.close()


def test_an_answer_to_a_client_that_never_reads_is_dropped_at_the_write_timeout(unharmed):
    body = json.dumps({"prompt": "p", "size": "768x768", "n": 2, "output_format": "png", **FAST}).encode()
    images, dropped = unharmed.metric("image_server_images_total"), unharmed.metric(*WRITE_DROPS)
    with non_reading(unharmed.url, "POST", "/v1/images/generations", body) as sock:
        until(lambda: unharmed.metric("image_server_images_total") >= images + 2, timeout=60, what="generation")
        until(lambda: unharmed.metric(*WRITE_DROPS) == dropped + 1, timeout=WRITE_TIMEOUT + MARGIN, what="drop")
        assert closed_by_server(sock, 1)  # and the answer's 4.6 MB with it


def test_url_images_fetched_by_a_client_that_never_reads_are_dropped(unharmed):
    name = "A" * 22 + ".png"  # a file of the store, larger than the kernel's socket buffers (a 4096x4096 PNG)
    (Path(unharmed.env["IMAGE_DIR"]) / name).write_bytes(os.urandom(24 * 2**20))
    dropped = unharmed.metric(*WRITE_DROPS)
    with non_reading(unharmed.url, "GET", f"/v1/images/{name}") as sock:
        until(lambda: unharmed.metric(*WRITE_DROPS) == dropped + 1, timeout=WRITE_TIMEOUT + MARGIN, what="drop")
        assert closed_by_server(sock, 1)


def test_a_stream_whose_client_left_is_released_without_waiting_for_the_garbage_collector(strict):
    images = strict.metric("image_server_images_total")
    with non_reading(strict.url, "POST", "/v1/images/generations", stream_body()):
        until(lambda: strict.metric("image_server_images_total") >= images + 1, timeout=60, what="generation")
        time.sleep(0.5)  # its events are being written, blocked by the client that does not read
    until(lambda: strict.metric("image_server_in_flight") == 0, timeout=MARGIN, what="the request released")


# -- 5. admission before work ------------------------------------------------------------------------------


def test_a_full_queue_costs_the_caller_no_fetch(strict):
    with HostileServer(interval=0.5) as target, ThreadPoolExecutor(1) as pool:
        first = pool.submit(edit_json, strict, [target.url + "/a.png"], 30)
        until(lambda: target.requests == 1, what="the first edit fetching")
        second = edit_json(strict, [target.url + "/b.png"] * 16)
        assert second.status_code == 429, second.text
        assert target.requests == 1  # the refused edit fetched nothing
        assert first.result().status_code == 504  # the trickle holds its sender's place, up to its deadline


# -- 6. one key's bodies hold at most its share of the input disk, and none of the server's memory ------------

KEYS = ("key-heavy", "key-light")
BUDGET = {"MAX_BODY_MB": 8, "MAX_IMAGE_MB": 8, "MAX_INPUT_PIXELS": 1_000_000, "INPUT_DISK_MB": 40}  # share: 20 MiB
GAUGE = "image_server_input_disk_bytes"
HOLDERS = 2  # bodies of 6.4 MB a key holds before its share is full (each checked at twice its size: its parse)


@pytest.fixture(scope="module")
def budgeted():
    """Two keys, bodies and images up to 8 MiB, 40 MiB of input disk: a key holding two bodies of 6.4 MB cannot
    start a third (its Content-Length is checked twice over: the body, then what its parse writes)."""
    from tests.support.server import ServerProcess

    srv = ServerProcess({"API_KEY": ",".join(KEYS), **{k: str(v) for k, v in BUDGET.items()}}).start()
    yield srv
    srv.stop()


def promise(srv, key: str, body: bytes, sent: int = 0) -> socket.socket:
    """A JSON edit from `key`: its headers, promising `body`, and only the first `sent` bytes of it."""
    sock = connect(srv.url)
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Authorization": f"Bearer {key}"}
    sock.sendall(raw_request("POST", "/v1/images/edits", srv.url.removeprefix("http://"), headers=headers))
    sock.sendall(body[:sent])
    return sock


def answer(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the answer on `sock`, read until the server closes it."""
    sock.settimeout(MARGIN)
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_key_past_its_share_of_input_disk_gets_429_before_its_bodies_are_read(budgeted):
    srv = budgeted
    large = json.dumps({"prompt": "p", "images": [{"image_url": data_url(padded_png(64, 400_000))}]}).encode()
    reset_peak_rss(srv.proc.pid)
    before = peak_rss_mib(srv.proc.pid)
    assert srv.metric(GAUGE) == 0
    idle = promise(srv, KEYS[0], large)  # a body promised, none of it sent: it holds nothing
    holders = [promise(srv, KEYS[0], large, len(large) - 1) for _ in range(HOLDERS)]  # reserved as they came
    until(lambda: srv.metric(GAUGE) == HOLDERS * (len(large) - 1), timeout=MARGIN, what="the bodies reserved")
    assert len(list(srv.spool.glob("*/*/body.*"))) == HOLDERS  # on disk, not in the server's memory
    with ThreadPoolExecutor(16) as pool:
        posts = [pool.submit(post_edit, srv, KEYS[0], large) for _ in range(16)]  # whole bodies, sent at once
        refused = [answer(promise(srv, KEYS[0], large)) for _ in range(4)]
        light = post_edit(srv, KEYS[1], json.dumps(normal_edit()).encode())
        light_large = post_edit(srv, KEYS[1], large)  # the other key's large body is still read and parsed
        heavy = [post.result() for post in posts]
    assert [(status, error["error"]["code"]) for status, error in refused] == [(429, "tenant_input_disk_full")] * 4
    assert light == 200 and light_large == 400  # served; and refused from its structure, not for its size
    assert set(heavy) <= {429, None}  # refused before read (None: the refusal reset the connection mid-body)
    for holder in holders:
        holder.close()  # its owner ends the request when its client goes, and removes what it held
    idle.close()
    until(lambda: srv.metric(GAUGE) == 0, timeout=MARGIN, what="the disk given back")
    until(lambda: not [p for p in srv.spool.glob("*/*") if p.is_dir()], timeout=MARGIN, what="the files removed")
    assert srv.metric("image_server_requests_total", 'status="500"') == 0
    # 19 MB of bodies came in; the server held none of them (its peak grew by its own work: a 64x64 edit)
    assert peak_rss_mib(srv.proc.pid) - before < 32


def normal_edit() -> dict:
    return {"prompt": "p", "size": "64x64", "images": [{"image_url": data_url(png_bytes(gradient(64, 64)))}], **FAST}


def post_edit(srv, key: str, body: bytes) -> int | None:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    try:
        return httpx.post(srv.url + "/v1/images/edits", content=body, headers=headers, timeout=60).status_code
    except httpx.TransportError:
        return None
