"""An ASGI app behind uvicorn with the server's own HTTP protocol (server/http.py) on a loopback port, in a thread
of the test process: real sockets for curl and raw HTTP, without a server process."""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from bench.harness import free_port
from server.config import Settings
from server.http import ServerProtocol


@contextmanager
def serving(app, settings: Settings, **config) -> Iterator[str]:
    """Yields the URL while `app` serves; `config` goes to uvicorn.Config."""
    port = free_port()
    protocol = ServerProtocol.configured(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, log_config=None, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn stopped before it served")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def exchange(url: str, request: bytes) -> bytes:
    """Sends raw bytes; everything the server answers until it closes the connection (or 5 s pass)."""
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(request)
        sock.settimeout(5)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
    return answer
