"""What an attacker sends, and the hostile endpoints an attacker runs: shared by bench/isolation.py and
tests/e2e/test_isolation.py, so that the benchmark measures exactly what the tests reproduce.

Files built to cost: a PNG padded with empty chunks (every decoder walks each one), a progressive JPEG with
thousands of scans (each scan walks every block of the image). Endpoints on loopback: a server that trickles
an image a byte at a time, one that answers an upload with a huge error body, and clients that send headers
and then nothing, or never read their answer. It imports nothing from the server or the tests.
"""

import os
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _png_chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def padded_png(side: int = 64, padding: int = 1_000_000) -> bytes:
    """A valid gray PNG of side x side pixels with `padding` empty ancillary chunks before its pixels (12 bytes
    each: a million is 12 MB)."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    pixels = _png_chunk(b"IDAT", zlib.compress(b"\0" * (side + 1) * side))
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"teXt") * padding + pixels + _png_chunk(b"IEND")


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _bits(codes: list[tuple[int, int]]) -> bytes:
    """Entropy-coded bits (value, length) as bytes, padded with ones, 0xFF stuffed with 0x00."""
    acc, count, out = 0, 0, bytearray()
    for value, length in codes:
        acc, count = (acc << length) | value, count + length
    pad = (8 - count % 8) % 8
    acc, count = (acc << pad) | ((1 << pad) - 1), count + pad
    for byte in acc.to_bytes(count // 8, "big"):
        out.append(byte)
        if byte == 0xFF:
            out.append(0)
    return bytes(out)


def many_scan_jpeg(side: int = 2048, scans: int = 5000) -> bytes:
    """A progressive gray JPEG of side x side (a multiple of 128) with `scans` AC scans of ~40 bytes each:
    every block ends at once (one end-of-band run per 16384 blocks), yet a decoder walks all blocks per scan."""
    blocks = (side // 8) ** 2
    assert side % 128 == 0, "side must be a multiple of 128 (whole end-of-band runs)"
    one_code = bytes([1] + [0] * 15)  # Huffman table: one code of length 1
    dc_scan = _bits([(0, 1)] * blocks)  # every DC difference is 0
    ac_scan = _bits([(0, 1), (0, 14)] * (blocks // 16384))  # EOB14 with extra bits 0: a run of 16384 blocks
    return b"".join(
        [
            b"\xff\xd8",
            _jpeg_segment(0xDB, b"\x00" + b"\x01" * 64),  # one quantisation table of ones
            _jpeg_segment(0xC2, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00"),  # progressive, gray
            _jpeg_segment(0xC4, b"\x00" + one_code + b"\x00"),  # DC table 0: category 0
            _jpeg_segment(0xC4, b"\x10" + one_code + b"\xe0"),  # AC table 0: EOB14
            _jpeg_segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + dc_scan,
            (_jpeg_segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + ac_scan) * scans,
            b"\xff\xd9",
        ]
    )


# -- hostile endpoints -----------------------------------------------------------------------------------


def lower_priority(niceness: int) -> None:
    """The calling thread's CPU priority lowered by `niceness` (on Linux a thread has its own): an attacker's
    clients and servers stand for machines elsewhere, whose CPU is not the server's to share."""
    if niceness:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)


class HostileServer(ThreadingHTTPServer):
    """A loopback HTTP server that answers every GET with `image` at full speed or, without one, with a trickle
    (a byte every `interval` seconds, never finishing), and every PUT with `error_bytes` of a 400 error body;
    it counts what it was asked. Its threads run at `niceness`."""

    daemon_threads = True

    def __init__(self, interval: float = 1.0, error_bytes: int = 0, image: bytes = b"", niceness: int = 0) -> None:
        super().__init__(("127.0.0.1", 0), _Hostile)
        self.niceness = niceness
        self.interval = interval
        self.error_bytes = error_bytes
        self.image = image
        self.requests = 0
        self.sent = 0  # body bytes written, all answers together
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "HostileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    def process_request_thread(self, request, client_address) -> None:
        lower_priority(self.niceness)
        super().process_request_thread(request, client_address)


class _Hostile(BaseHTTPRequestHandler):
    server: HostileServer

    def do_GET(self) -> None:
        self.server.requests += 1
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.server.image) or 10**9))
        self.end_headers()
        if self.server.image:
            self.wfile.write(self.server.image)
            return
        try:
            while True:
                self.wfile.write(b"\0")
                self.wfile.flush()
                self.server.sent += 1
                time.sleep(self.server.interval)
        except OSError:
            pass  # the server under test gave up

    def do_PUT(self) -> None:
        self.server.requests += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(400)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(self.server.error_bytes))
        self.end_headers()
        block = b"<Error><Code>Huge</Code></Error>" + b" " * (2**20 - 32)
        left = self.server.error_bytes
        try:
            while left > 0:
                self.wfile.write(block[: min(left, len(block))])
                self.server.sent += min(left, len(block))
                left -= len(block)
        except OSError:
            pass  # the uploader read what it needed and closed

    def log_message(self, *args) -> None:
        pass


# -- hostile clients --------------------------------------------------------------------------------------


def raw_request(method: str, path: str, host: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    fields = {"Host": host, "Content-Length": str(len(body)), **(headers or {})}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return (head + "\r\n").encode() + body


def connect(url: str, receive_buffer: int = 4096) -> socket.socket:
    """A client socket to the server at `url` with a small receive window: a client that never reads stops the
    server's writes after a few KB, as a slow or hostile client on a real network does."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((host, int(port)))
    return sock


def non_reading(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> socket.socket:
    """Sends a whole request and never reads the answer; the caller closes the socket (or keeps it open)."""
    sock = connect(url)
    fields = {"Content-Type": "application/json", **(headers or {})}
    sock.sendall(raw_request(method, path, url.removeprefix("http://"), body, fields))
    return sock


def headers_then_nothing(
    url: str, path: str, promised: int = 1000, sent: bytes = b"", headers: dict | None = None
) -> socket.socket:
    """Sends a request's headers, promising `promised` bytes of body, and `sent` of them."""
    sock = connect(url)
    headers = {"Content-Type": "application/json", "Content-Length": str(promised), **(headers or {})}
    sock.sendall(raw_request("POST", path, url.removeprefix("http://"), headers=headers) + sent)
    return sock


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closed the connection within `within` seconds (reading and discarding what it sent)."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if not sock.recv(1 << 16):
                return True
        except TimeoutError:
            continue
        except OSError:  # reset
            return True
    return False
