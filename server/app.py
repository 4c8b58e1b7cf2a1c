"""The FastAPI app: wiring, the background tasks of its life, probes, models and metrics."""

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute

from server import api, errors, video_api
from server.auth import require_api_key
from server.config import Settings
from server.engines import create_engine
from server.engines.base import Engine
from server.errors import APIError
from server.images import CONTENT_TYPES
from server.metrics import Metrics
from server.middleware import BodyLimit, RequestLife, RequestLog
from server.plugins import PluginSet
from server.protocol import openapi_bodies
from server.service import ImageService
from server.storage import ImageStore
from server.video_store import VideoStore
from server.videos import VideoService

log = logging.getLogger("server")

_STARTED = int(time.time())
PROBES = ("/health", "/ready", "/metrics")  # also answer HEAD, as GET without the body: load balancers probe so


def create_app(settings: Settings, engine: Engine | None = None, plugins: PluginSet | None = None) -> FastAPI:
    metrics = Metrics()
    engine = engine if engine is not None else create_engine(settings)
    plugins = plugins if plugins is not None else PluginSet(settings)
    service = ImageService(settings, engine, plugins, metrics)
    videos = VideoService(service)

    async def drain() -> None:
        """SIGTERM: queued and running work gets DRAIN_TIMEOUT in all, video jobs' encoding included."""
        deadline = time.monotonic() + settings.drain_timeout
        await service.drain()
        await videos.drain(deadline)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        loaded = await asyncio.to_thread(videos.store.load)
        log.info("video jobs kept from earlier runs: %d", loaded)
        tasks = [asyncio.create_task(_load(app, service))]
        tasks += [asyncio.create_task(_expire(store)) for store in (service.store, videos.store)]
        yield
        for task in tasks:
            task.cancel()
        if not service.lifecycle.draining:
            await drain()
        service.close()

    app = FastAPI(title="image-server", version="0.2.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.service = service
    app.state.videos = videos
    app.state.drain = drain
    app.state.metrics = metrics
    app.state.on_fatal = None  # set by the CLI: how to stop the process when the model cannot load
    errors.install(app)
    for router in (api.router, video_api.router, _ops_router(), _models_router(), *plugins.routers()):
        app.include_router(router)
    _publish_request_bodies(app, service)
    app.add_middleware(BodyLimit, limit=int(settings.max_body_mb * 2**20), routes=plugins.route_limits())
    app.add_middleware(RequestLife, timeout=settings.request_timeout)
    app.add_middleware(RequestLog, metrics=metrics)  # added last: outermost
    return app


def _publish_request_bodies(app: FastAPI, service: ImageService) -> None:
    """/openapi.json with the image routes' request bodies, the enabled plugins' fields included."""
    bodies, schemas = openapi_bodies(service.generation_model, service.edit_model)
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = generate()  # cached by FastAPI: what is added here is added once
            document["components"]["schemas"].update(schemas)
            for path, body in bodies.items():
                document["paths"][path]["post"].update(body)
        return app.openapi_schema

    app.openapi = openapi


async def _load(app: FastAPI, service: ImageService) -> None:
    try:
        await service.load()
    except BaseException as exc:  # SystemExit from a bad MODEL_PATH included
        log.error("model failed to load: %s", exc, exc_info=not isinstance(exc, SystemExit))
        if app.state.on_fatal:
            app.state.on_fatal()


async def _expire(store: ImageStore | VideoStore) -> None:
    period = max(1.0, min(60.0, store.ttl / 2))
    while True:
        await asyncio.to_thread(store.expire)
        await asyncio.sleep(period)


def _ops_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Liveness: the process answers. Never depends on the model or a busy GPU; only a model left in an
        unknown state (a failed LoRA set that could not be undone) asks the orchestrator for a restart."""
        if request.app.state.service.engine.broken:
            return APIError(
                503, "The model is in an unknown state; restart the server.", code="engine_broken"
            ).response()
        return JSONResponse({"status": "ok"})

    @router.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        svc: ImageService = request.app.state.service
        if not svc.lifecycle.serving:
            return svc.lifecycle.not_ready().response()
        return JSONResponse({"status": "ready", "queue_depth": svc.scheduler.depth})

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")

    @router.get("/v1/images/{name:image_name}")
    async def image_file(name: str, request: Request) -> FileResponse:
        """Images returned with response_format=url; the unguessable name is the credential."""
        path = request.app.state.service.store.path(name)
        if path is None:
            raise APIError(404, f"No image named {name!r} (it may have expired).", code="not_found")
        return FileResponse(path, media_type=CONTENT_TYPES[path.suffix[1:]])

    for route in [r for r in router.routes if isinstance(r, APIRoute) and r.path in PROBES]:
        router.add_api_route(route.path, route.endpoint, methods=["HEAD"], include_in_schema=False)
    return router


def _models_router() -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_api_key)])

    def card(svc: ImageService) -> dict:
        return {
            "id": svc.engine.name,
            "object": "model",
            "created": _STARTED,
            "owned_by": "image-server",
            "ready": svc.lifecycle.serving,
            "engine": svc.engine.info,
            "defaults": {"num_inference_steps": svc.default_steps, "guidance_scale": svc.default_guidance},
            "plugins": svc.plugins.names,
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
