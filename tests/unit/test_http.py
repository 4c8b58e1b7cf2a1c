"""server/http.py: uvicorn's protocol with deadlines for request headers and bodies, a write timeout, and a
bound on requests per connection, on a real socket."""

import json
import socket
import time

import httpx
import pytest

from server.config import from_env
from server.http import CONNECTION
from tests.support.loopback import exchange, serving

BIG = b"x" * (8 * 2**20)  # more than the kernel's socket buffers hold
WRITE_TIMEOUT = 1.0
connections_gone: list[bool] = []


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b"ok"
    if scope["path"] == "/big":
        body = BIG
    elif scope["path"] == "/body":
        while (await receive())["more_body"]:
            pass
    elif scope["path"] == "/gone":  # answers once the client has left (the owner's signal)
        await scope["extensions"][CONNECTION].gone.wait()
        connections_gone.append(True)
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def url():
    settings = from_env(
        header_timeout=1.0, body_timeout=1.0, write_timeout=WRITE_TIMEOUT, max_requests_per_connection=3, keep_alive=1.0
    )
    with serving(app, settings, timeout_keep_alive=1) as running:
        yield running


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


def connect(url: str, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    return sock


def test_a_body_that_never_comes_is_dropped(url):
    with connect(url) as sock:
        sock.sendall(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        assert closed_by_server(sock)


def test_a_body_sent_a_byte_at_a_time_is_cut_off(url):
    with connect(url) as sock:
        sock.sendall(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n")
        assert closed_by_server(sock, b"a" * 400)


def test_a_body_on_time_is_answered(url):
    response = httpx.post(url + "/body", content=b"a" * 10_000)
    assert response.status_code == 200


def test_an_answer_the_client_never_reads_is_dropped_at_the_write_timeout(url):
    with connect(url, receive_buffer=4096) as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(WRITE_TIMEOUT + 3)  # reading nothing meanwhile: reading is what keeps a connection
        assert closed_by_server(sock)


def test_a_slow_reader_that_keeps_reading_gets_the_whole_answer(url):
    received = b""
    with connect(url, receive_buffer=2**20) as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        while not _whole_answer(received):
            chunk = sock.recv(2**20)
            if not chunk:
                break
            received += chunk
            time.sleep(WRITE_TIMEOUT * 0.6)  # slower than the server writes, never idle for a write timeout
    assert _whole_answer(received)


def _whole_answer(received: bytes) -> bool:
    """The headers and every byte of BIG after them."""
    head, _, body = received.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 200") and len(body) == len(BIG)


def test_the_app_learns_that_its_client_has_gone(url):
    before = len(connections_gone)
    with connect(url) as sock:
        sock.sendall(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while len(connections_gone) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(connections_gone) == before + 1


def test_content_length_with_transfer_encoding_is_a_400_and_the_connection_closes(url):
    """RFC 9112 6.1: such a message may be refused; h11 alone lets Transfer-Encoding win, so a proxy that trusts
    Content-Length would see the chunked body's next "request" where this server sees a body (smuggling)."""
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = exchange(url, head + body)
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 400 Bad Request"
    assert answer.count(b"HTTP/1.1") == 1  # nothing else was answered on the connection: it closed
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert "Content-Length and Transfer-Encoding" in error["message"] and error["code"] == "invalid_http_request"


@pytest.mark.parametrize(
    "framing", [b"Content-Length: 2\r\n\r\nhi", b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"]
)
def test_either_framing_alone_is_served(url, framing):
    answer = exchange(url, b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + framing)
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\nok")
