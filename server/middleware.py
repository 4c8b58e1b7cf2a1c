"""The HTTP middleware, outermost first: RequestLog (request id, metrics, one log line, the last word on
errors), BodyLimit (413 before reading what is too big).

RequestLog is outermost so that every answer, a 413 decided from Content-Length and a 500 from a bug
included, carries `x-request-id`, a log line and a metric. 429 and 503 close the connection: a Kubernetes
Service balances connections, so the client's retry reconnects and may land on another pod.
"""

import logging
import re
import secrets
import time

from starlette.requests import ClientDisconnect

from server.errors import APIError, internal_error
from server.metrics import Metrics
from server.plugins import RouteLimit

log = logging.getLogger("server")
access_log = logging.getLogger("server.access")

QUIET_PATHS = ("/health", "/ready", "/metrics")
CLOSE_STATUSES = (429, 503)
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:/+=-]{1,64}$")


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's X-Request-ID when it is a plain token (it goes into logs and headers), else a new one."""
    sent = dict(headers).get(b"x-request-id", b"")
    return sent.decode("ascii") if _REQUEST_ID.match(sent) else "req_" + secrets.token_hex(8)


class RequestLog:
    """One line per request (id, status, queue wait, generation, post-processing) and the request metrics."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id(scope["headers"])
        started = time.monotonic()
        sent = {"status": 0}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
                extra = [(b"x-request-id", rid.encode())]
                if message["status"] in CLOSE_STATUSES:
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            sent["status"] = sent["status"] or 499  # the client left while sending its body: nobody to answer
        except Exception:
            log.exception("request %s failed", rid)
            if not sent["status"]:
                await internal_error().response()(scope, receive, send_with_id)
            sent["status"] = sent["status"] or 500
        finally:
            self._record(scope, sent["status"] or 499, rid, time.monotonic() - started)

    def _record(self, scope, status: int, rid: str, seconds: float) -> None:
        route = scope.get("route")
        label = route.path if route is not None else "unmatched"
        self.metrics.requests.labels(label, str(status)).inc()
        path = scope["path"]
        state = scope.get("state", {})
        fields = {
            "request_id": rid,
            "method": scope["method"],
            "path": path,
            "status": status,
            "seconds": round(seconds, 4),
            **({"tenant": state["tenant"]} if "tenant" in state else {}),  # a key's label, never the key
            **{f"{k}_seconds": round(v, 4) for k, v in state.get("timings", {}).items()},
        }
        level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        access_log.log(level, text, extra={"fields": fields})


class BodyLimit:
    """Refuses bodies over the limit: at once from Content-Length, else as soon as the count passes it."""

    def __init__(self, app, limit: int, routes: dict[str, RouteLimit]) -> None:
        self.app = app
        self.default = RouteLimit(limit, f"The request body is larger than {limit / 2**20:g} MiB.")
        self.routes = routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.routes.get(scope["path"], self.default)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit.bytes:
            return await _too_large(limit).response()(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.bytes:
                    raise _too_large(limit)
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit: RouteLimit) -> APIError:
    return APIError(413, limit.message, code="request_too_large")
