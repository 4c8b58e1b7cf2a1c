"""The FastAPI app: wiring, lifecycle, probes, models, metrics and the HTTP middleware."""

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from server import api, errors
from server.auth import require_api_key
from server.config import Settings
from server.engines import create_engine
from server.errors import APIError
from server.images import CONTENT_TYPES
from server.metrics import Metrics
from server.plugins import PluginSet
from server.service import ImageService

log = logging.getLogger("server")
access_log = logging.getLogger("server.access")

_STARTED = int(time.time())
_QUIET_PATHS = ("/health", "/ready", "/metrics")


def create_app(settings: Settings, engine=None, plugins: PluginSet | None = None) -> FastAPI:
    metrics = Metrics()
    engine = engine if engine is not None else create_engine(settings)
    plugins = plugins if plugins is not None else PluginSet(settings, engine)
    service = ImageService(settings, engine, plugins, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        tasks = [asyncio.create_task(_load(app, service)), asyncio.create_task(_expire_images(service))]
        yield
        for task in tasks:
            task.cancel()
        if not service.draining:
            await service.drain()
        service.close()

    app = FastAPI(title="image-server", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = metrics
    app.state.on_fatal = None  # set by the CLI: how to stop the process when the model cannot load
    errors.install(app)
    app.include_router(api.router)
    app.include_router(_ops_router())
    app.include_router(_models_router())
    for router in plugins.routers():
        app.include_router(router)
    for router in getattr(engine, "routers", list)():  # engine-specific endpoints (SGLang: /v1/videos)
        app.include_router(router)
    app.add_middleware(AccessLog, metrics=metrics)
    app.add_middleware(BodyLimit, limit=int(settings.max_body_mb * 2**20), overrides=plugins.body_limits())
    return app


async def _load(app: FastAPI, service: ImageService) -> None:
    try:
        await service.scheduler.call(service.load)  # on the engine thread, where the pipeline will run
    except BaseException as exc:  # SystemExit from a bad MODEL_PATH included
        log.error("model failed to load: %s", exc, exc_info=not isinstance(exc, SystemExit))
        if app.state.on_fatal:
            app.state.on_fatal()
        return
    service.ready = not service.draining
    service.metrics.ready.set(1 if service.ready else 0)


async def _expire_images(service: ImageService) -> None:
    period = max(1.0, min(60.0, service.store.ttl / 2))
    while True:
        await asyncio.to_thread(service.store.expire)
        await asyncio.sleep(period)


def _ops_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict:
        """Liveness: the process answers. Never depends on the model or a busy GPU."""
        return {"status": "ok"}

    @router.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        svc: ImageService = request.app.state.service
        if svc.serving:
            return JSONResponse({"status": "ready", "queue_depth": svc.scheduler.depth})
        status = "draining" if svc.draining else "loading" if not svc.ready else "engine_restarting"
        error = APIError(503, f"not ready: {status}", code=status, headers={"Retry-After": "5"})
        return error.response()

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        request.app.state.metrics.ready.set(1 if request.app.state.service.serving else 0)
        return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")

    @router.get("/v1/images/{name:image_name}")
    async def image_file(name: str, request: Request) -> FileResponse:
        """Images returned with response_format=url; the unguessable name is the credential."""
        path = request.app.state.service.store.path(name)
        if path is None:
            raise APIError(404, f"No image named {name!r} (it may have expired).", code="not_found")
        return FileResponse(path, media_type=CONTENT_TYPES[path.suffix[1:]])

    return router


def _models_router() -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_api_key)])

    def card(svc: ImageService) -> dict:
        return {
            "id": svc.engine.name,
            "object": "model",
            "created": _STARTED,
            "owned_by": "image-server",
            "ready": svc.serving,
            "engine": svc.engine.info,
            "defaults": {"num_inference_steps": svc.default_steps, "guidance_scale": svc.default_guidance},
            "plugins": [p.name for p in svc.plugins.plugins],
        }

    @router.get("/v1/models")
    async def list_models(request: Request) -> dict:
        return {"object": "list", "data": [card(request.app.state.service)]}

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        svc: ImageService = request.app.state.service
        if model_id != svc.engine.name:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return card(svc)

    return router


class BodyLimit:
    """Refuses bodies over `limit` bytes: at once from Content-Length, else as soon as the count passes it."""

    def __init__(self, app, limit: int, overrides: dict[str, int]) -> None:
        self.app = app
        self.limit = limit
        self.overrides = overrides

    @staticmethod
    def _error(limit: int) -> APIError:
        return APIError(413, f"The request body is larger than {limit // 2**20} MiB.", code="request_too_large")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.overrides.get(scope["path"], self.limit)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._error(limit).response()(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise self._error(limit)
            return message

        await self.app(scope, limited_receive, send)


class AccessLog:
    """One line per request (id, status, queue wait, generation, post-processing) and the request metrics."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")[:64]
        request_id = request_id or "req_" + secrets.token_hex(8)
        started = time.monotonic()
        status = 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, status, request_id, time.monotonic() - started)

    def _record(self, scope, status: int, request_id: str, seconds: float) -> None:
        route = scope.get("route")
        label = route.path if route is not None else "unmatched"
        self.metrics.requests.labels(label, str(status)).inc()
        path = scope["path"]
        timings = scope.get("state", {}).get("timings", {})
        fields = {
            "request_id": request_id,
            "method": scope["method"],
            "path": path,
            "status": status,
            "seconds": round(seconds, 4),
            **{f"{k}_seconds": round(v, 4) for k, v in timings.items()},
        }
        level = logging.DEBUG if path in _QUIET_PATHS else logging.INFO
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        access_log.log(level, text, extra={"fields": fields})
