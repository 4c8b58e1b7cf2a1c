"""The HTTP middleware, outermost first: RequestLog (request id, metrics, one log line, the last word on
errors), RequestLife (each request's deadline and its one owner), BodyLimit (413 before reading what is too
big).

RequestLog is outermost so that every answer, a 413 decided from Content-Length and a 500 from a bug
included, carries `x-request-id`, a log line and a metric. 429 and 503 close the connection: a Kubernetes
Service balances connections, so the client's retry reconnects and may land on another pod.
"""

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Callable

from starlette.requests import ClientDisconnect

from server.errors import APIError, internal_error, timed_out
from server.http import CONNECTION
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


class Life:
    """A request's deadline (monotonic time; REQUEST_TIMEOUT from its first byte) and what must run when it
    ends, however it ends. The app finds it in `request.state.life`."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._on_end: list[Callable[[], None]] = []

    def on_end(self, callback: Callable[[], None]) -> None:
        self._on_end.append(callback)

    def end(self) -> None:
        """Every callback runs, the last registered first; one that raises is logged and stops none of the others."""
        while self._on_end:
            try:
                self._on_end.pop()()
            except Exception:
                log.exception("a request's cleanup failed")


class RequestLife:
    """The one owner of each request's life. The request runs as a task; when its client goes (the connection
    closed, or dropped for a body or write timeout) or its deadline passes, the task is cancelled, and its own
    cleanup releases what it holds at once: its queue place or job, a decode process, its stream. Then the
    callbacks it registered run. Past the deadline, the owner answers 504 itself if the app has not begun to
    answer (the app answers its own 504 at the deadline; this one allows `grace` seconds more), else drops the
    connection."""

    def __init__(self, app, timeout: float, grace: float = 1.0) -> None:
        self.app = app
        self.timeout = timeout
        self.grace = grace

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        life = scope.setdefault("state", {})["life"] = Life(time.monotonic() + self.timeout)
        connection = scope.get("extensions", {}).get(CONNECTION)
        answer = {"started": False, "complete": False}

        async def tracked_send(message) -> None:
            answer["started"] = True
            answer["complete"] = message["type"] == "http.response.body" and not message.get("more_body")
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, tracked_send))
        try:
            end = await self._run(task, connection, life.deadline + self.grace, answer)
        finally:
            life.end()
        if end == "deadline" and not answer["started"]:
            await timed_out(self.timeout).response()(scope, receive, send)
        elif end == "deadline" and connection is not None:
            connection.abort()

    async def _run(self, task: asyncio.Task, connection, cutoff: float, answer: dict) -> str:
        """How the request ended: "answered" by the app (its exception, if any, raised here for RequestLog),
        or cancelled when its client was "gone" or its "deadline" passed, its cleanup done."""
        gone = asyncio.ensure_future(connection.gone.wait()) if connection is not None else asyncio.Future()
        try:
            timeout = max(0.0, cutoff - time.monotonic())
            await asyncio.wait({task, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done() and not answer["complete"]:
                task.cancel()
            await asyncio.wait({task})  # its cleanup runs now, and an outer cancellation waits for it
        if not task.cancelled():
            task.result()
            return "answered"
        return "gone" if connection is not None and connection.gone.is_set() else "deadline"


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
