"""server/http.py: uvicorn's protocol with a deadline for request headers and a bound on requests per
connection, on a real socket."""

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from bench.harness import free_port
from server.config import from_env
from server.http import ServerProtocol


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(scope="module")
def url():
    port = free_port()
    settings = from_env(header_timeout=1.0, max_requests_per_connection=3, keep_alive=1.0)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=ServerProtocol.configured(settings),
        log_config=None,
        timeout_keep_alive=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def closed_by_server(sock: socket.socket, drip: bytes = b"") -> bool:
    """Sends `drip` a byte at a time, 0.1 s apart, then waits; True once the server closes the connection."""
    sock.settimeout(0.1)
    deadline = time.monotonic() + 20
    sent = 0
    while time.monotonic() < deadline:
        if sent < len(drip):
            try:
                sock.send(drip[sent : sent + 1])
            except OSError:
                return True
            sent += 1
        try:
            if sock.recv(1024) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_a_connection_that_sends_nothing_is_closed(url):
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
        assert closed_by_server(sock)


def test_headers_sent_a_byte_at_a_time_are_cut_off(url):
    request = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 400 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
        assert closed_by_server(sock, request)


def test_the_nth_request_of_a_connection_closes_it(url):
    with httpx.Client() as client:
        answers = [client.get(url) for _ in range(4)]
    assert [r.headers.get("connection") for r in answers] == [None, None, "close", None]
