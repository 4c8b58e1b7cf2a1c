"""server/engines/sglang/process.py: the child's /health answer is read within MAX_ANSWER, as its other answers."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from server.engines.sglang.errors import MAX_ANSWER
from server.engines.sglang.process import SGLangProcess

ANSWERS = {
    "/ok": (200, b""),
    "/warming": (503, b""),
    "/broken": (503, b"CUDA error"),
    "/huge": (200, b"x" * (4 * MAX_ANSWER)),  # a child that misbehaves: the rest is never read
}


class Child(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = ANSWERS[self.path.removesuffix("/health")]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def child():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Child)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(
    ("path", "state", "why"),
    [
        ("/ok", "ok", ""),
        ("/warming", "starting", ""),
        ("/broken", "broken", "CUDA error"),
        ("/huge", "broken", f"sglang answered /health with more than {MAX_ANSWER} bytes"),
    ],
)
def test_health_answers_are_read_within_the_bound(child, path, state, why):
    process = SGLangProcess(lambda ports: [], env={}, cwd=".", start_timeout=1)
    process.base_url = child + path
    assert process._health() == state
    assert process._why == why
