"""uvicorn's HTTP/1.1 protocol (h11) with the two limits a shared server needs per connection.

- A deadline for each request's headers (HEADER_TIMEOUT): uvicorn arms its keep-alive timer only after a
  response, so a connection that sends nothing, or its headers a byte at a time, would stay open forever.
- A number of requests per connection (MAX_REQUESTS_PER_CONNECTION), after which the response says
  `Connection: close`: a Kubernetes Service balances connections, not requests, and SDK clients keep theirs
  open for hours; closing now and then lets them spread over the pods.
"""

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

from server.config import Settings

_CLOSE = (b"connection", b"close")


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
