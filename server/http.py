"""uvicorn's HTTP/1.1 protocol (h11) with the two limits a shared server needs per connection, and one rule of
framing.

- A deadline for each request's headers (HEADER_TIMEOUT): uvicorn arms its keep-alive timer only after a
  response, so a connection that sends nothing, or its headers a byte at a time, would stay open forever.
- A number of requests per connection (MAX_REQUESTS_PER_CONNECTION), after which the response says
  `Connection: close`: a Kubernetes Service balances connections, not requests, and SDK clients keep theirs
  open for hours; closing now and then lets them spread over the pods.
- A request with both Content-Length and Transfer-Encoding is a 400 and the connection closes (RFC 9112
  6.1 allows it): h11 would let Transfer-Encoding win, and a proxy in front that trusted Content-Length would
  then see another request where this server sees the body (request smuggling).
"""

import asyncio
import json

import h11
from uvicorn import Config
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.config import Settings
from server.errors import bad_request

_CLOSE = (b"connection", b"close")


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
    max_requests = 100

    @classmethod
    def configured(cls, settings: Settings) -> type["ServerProtocol"]:
        return type(
            "ConfiguredServerProtocol",
            (cls,),
            {"header_timeout": settings.header_timeout, "max_requests": settings.max_requests_per_connection},
        )

    def __init__(self, config: Config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        size = config.h11_max_incomplete_event_size
        self.conn = _Connection(h11.SERVER) if size is None else _Connection(h11.SERVER, size)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._requests = 0
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not cycle:  # a request's headers arrived
            self._disarm_header_deadline()
            self._requests += 1
            if self._requests >= self.max_requests:
                self.cycle.default_headers = [*self.cycle.default_headers, _CLOSE]

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, OpenAI-shaped, and the connection closed."""
        body = json.dumps(bad_request(self.conn.refusal or msg, None, "invalid_http_request").body()).encode()
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
