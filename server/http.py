"""uvicorn's HTTP/1.1 protocol (h11) with the limits a shared server needs per connection, and one rule of framing.

- A deadline for each request's headers (HEADER_TIMEOUT): uvicorn arms its keep-alive timer only after a
  response, so a connection that sends nothing, or its headers a byte at a time, would stay open forever.
- A deadline for each request's body (BODY_TIMEOUT), from its headers to its last byte: a client that
  promises a body and sends nothing, or a byte now and then, is dropped.
- A write timeout (WRITE_TIMEOUT): when the answer fills the socket's buffers and the client reads nothing
  for that long, the connection is aborted (its buffered bytes dropped), so a client that does not read holds
  neither a socket nor the answer's memory.
- A number of requests per connection (MAX_REQUESTS_PER_CONNECTION), after which the response says
  `Connection: close`: a Kubernetes Service balances connections, not requests, and SDK clients keep theirs
  open for hours; closing now and then lets them spread over the pods.
- A request with both Content-Length and Transfer-Encoding is a 400 and the connection closes (RFC 9112
  6.1 allows it): h11 would let Transfer-Encoding win, and a proxy in front that trusted Content-Length would
  then see another request where this server sees the body (request smuggling).

The app learns of its connection through the scope (`CONNECTION`): an event set when the client has gone,
which the request's owner (server/middleware.py, RequestLife) waits on, and a way to drop the connection.
Each connection dropped for a deadline is counted, by which (`image_server_connections_dropped_total`).
"""

import asyncio
import fcntl
import socket
import struct
import termios

import h11
from prometheus_client import Counter
from uvicorn import Config
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.config import Settings
from server.errors import bad_request

_CLOSE = (b"connection", b"close")
CONNECTION = "image_server.connection"  # the scope extension that holds a request's `Connection`


_NO_LINGER = struct.pack("ii", 1, 0)


def drop(transport: asyncio.Transport) -> None:
    """Close at once with a reset, the unsent bytes discarded: a plain close would leave them in the kernel,
    queued behind a window the client keeps shut, and the client would never learn the connection ended."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
    transport.abort()


class Connection:
    """What a request may know of its connection: whether the client has gone, and how to drop it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.gone = asyncio.Event()
        self._transport = transport

    def abort(self) -> None:
        drop(self._transport)


class _Connection(h11.Connection):
    """h11's server side, refusing ambiguous framing before the request reaches the app."""

    refusal = ""  # why the last request was refused, for the 400's message

    def next_event(self):
        event = super().next_event()
        if isinstance(event, h11.Request):
            names = {name.lower() for name, _ in event.headers}
            if {b"content-length", b"transfer-encoding"} <= names:
                self.refusal = "A request may not carry both Content-Length and Transfer-Encoding."
                raise h11.RemoteProtocolError(self.refusal, error_status_hint=400)
        return event


class ServerProtocol(H11Protocol):
    header_timeout = 30.0
    body_timeout = 120.0
    write_timeout = 30.0
    max_requests = 100
    dropped: Counter | None = None  # connections dropped, by the deadline that dropped them

    @classmethod
    def configured(cls, settings: Settings, dropped: Counter | None = None) -> type["ServerProtocol"]:
        limits = {
            "header_timeout": settings.header_timeout,
            "body_timeout": settings.body_timeout,
            "write_timeout": settings.write_timeout,
            "max_requests": settings.max_requests_per_connection,
            "dropped": dropped,
        }
        return type("ConfiguredServerProtocol", (cls,), limits)

    def _drop(self, reason: str) -> None:
        drop(self.transport)
        if self.dropped is not None:
            self.dropped.labels(reason).inc()

    def __init__(self, config: Config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        size = config.h11_max_incomplete_event_size
        self.conn = _Connection(h11.SERVER) if size is None else _Connection(h11.SERVER, size)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._requests = 0
        self._connection = Connection(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._body_deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_deadline, self._body_deadline, self._write_deadline):
            if timer is not None:
                timer.cancel()
        self._connection.gone.set()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not cycle:  # a request's headers arrived
            self._new_request()
        if self._body_deadline is not None and self.cycle is not None and not self.cycle.more_body:
            self._body_deadline.cancel()  # the whole body arrived
            self._body_deadline = None

    def _new_request(self) -> None:
        self._disarm_header_deadline()
        self.cycle.scope.setdefault("extensions", {})[CONNECTION] = self._connection  # before the app runs
        self._body_deadline = self.loop.call_later(self.body_timeout, self._body_too_slow, self.cycle)
        self._requests += 1
        if self._requests >= self.max_requests:
            self.cycle.default_headers = [*self.cycle.default_headers, _CLOSE]

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, OpenAI-shaped, and the connection closed."""
        body = bad_request(self.conn.refusal or msg, None, "invalid_http_request").body().model_dump_json().encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), _CLOSE]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # the next request may come after an idle keep-alive wait, then has HEADER_TIMEOUT for its headers
        self._arm_header_deadline(self.timeout_keep_alive + self.header_timeout)

    def _arm_header_deadline(self, seconds: float) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(seconds, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        waiting_for_headers = self.cycle is None or self.cycle.response_complete
        if waiting_for_headers and not self.transport.is_closing():
            self.transport.close()
            if self.dropped is not None:
                self.dropped.labels("header_timeout").inc()

    def _body_too_slow(self, cycle) -> None:
        self._body_deadline = None
        if cycle is self.cycle and cycle.more_body and not cycle.response_complete:
            self._drop("body_timeout")

    # -- writes: asyncio pauses us when the transport's buffer is full, resumes us when it drains ----------

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_writes(self._unsent())

    def resume_writing(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None
        super().resume_writing()

    def _watch_writes(self, buffered: int) -> None:
        self._write_deadline = self.loop.call_later(self.write_timeout, self._writes_stalled, buffered)

    def _writes_stalled(self, unsent: int) -> None:
        """WRITE_TIMEOUT after a pause: a client that read something since gets another WRITE_TIMEOUT (a large
        answer drains slowly over a slow link); one that read nothing is dropped."""
        now = self._unsent()
        if now < unsent:
            self._watch_writes(now)
        else:
            self._write_deadline = None
            self._drop("write_timeout")

    def _unsent(self) -> int:
        """Bytes written and not yet taken by the client: in the transport's buffer, and in the kernel's send
        queue (which the client empties as it reads; the transport's moves only in large steps)."""
        queued = 0
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            except OSError:
                pass
        return self.transport.get_write_buffer_size() + queued
