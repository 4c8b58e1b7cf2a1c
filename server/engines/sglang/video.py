"""/v1/videos for video models (Wan 2.2 T2V, I2V, TI2V): SGLang's asynchronous video jobs, passed through.

image-server adds what SGLang lacks: the API key, readiness (503 while loading, restarting or draining) and a
bound on unfinished jobs (429 with Retry-After, MAX_QUEUE, counted from SGLang's own job list). Only the
documented request fields go through: SGLang would also take server file paths (`output_path`, `video_path`,
model paths), which a client must not choose. Server paths are taken out of the answers.

A model without video answers 400 here. Not run on this project's CI: video models need GPUs and their
weights.
"""

import json
import logging
import re

import httpx
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile

from server.auth import require_api_key
from server.bodies import parse_json
from server.engines.sglang.errors import refused
from server.errors import APIError, bad_request, unavailable

log = logging.getLogger("server.engines.sglang")

FIELDS = {
    "prompt", "model", "n", "seconds", "size", "fps", "num_frames", "seed", "width", "height",
    "num_inference_steps", "guidance_scale", "guidance_scale_2", "true_cfg_scale", "negative_prompt",
    "input_reference",
}  # fmt: skip
_PRIVATE = ("file_path", "file_paths")  # server paths in SGLang's job objects
_FINISHED = {"completed", "failed"}
_VIDEO_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def _job(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in _PRIVATE}


def relay(response: httpx.Response) -> Response:
    """SGLang's answer in our shapes: the job without server paths, or an OpenAI-shaped error (SGLang's reason
    goes to the log: it may name its paths)."""
    if response.status_code == 200:
        body = response.json()
        if isinstance(body.get("data"), list):
            body["data"] = [_job(job) for job in body["data"]]
        return Response(json.dumps(_job(body)), media_type="application/json")
    message = refused("the video request", response)
    if response.status_code in (400, 404, 422):
        raise APIError(400 if response.status_code == 422 else response.status_code, message, code="sglang_refused")
    raise APIError(502, message, code="engine_error")


class VideoRoutes:
    """The /v1/videos routes of one SGLang engine."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.client = httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(60.0, connect=5.0))

    def base_url(self, request: Request) -> str:
        request.app.state.service.lifecycle.check_accepting()
        if not self.engine.can_video:
            family = self.engine.info.get("family")
            raise bad_request(f"This model ({family}) does not generate video.", None, "unsupported")
        return self.engine.process.base_url + "/v1/videos"

    def video_url(self, request: Request, video_id: str) -> str:
        if not _VIDEO_ID.match(video_id):
            raise APIError(404, f"No video {video_id!r}.", code="not_found")
        return f"{self.base_url(request)}/{video_id}"

    async def send(self, method: str, url: str, stream: bool = False, **kwargs) -> httpx.Response:
        """A dead or unreachable child is a 503 with Retry-After, as for images."""
        try:
            return await self.client.send(self.client.build_request(method, url, **kwargs), stream=stream)
        except httpx.TransportError as exc:
            log.warning("lost the connection to SGLang: %r", exc)
            message = "The generation engine is restarting (lost the connection to it); retry shortly."
            raise unavailable(message, "engine_restarting", self.engine.retry_after) from None

    async def check_capacity(self, url: str, limit: int) -> None:
        response = await self.send("GET", url, params={"limit": 100})
        if response.status_code != 200:
            relay(response)
        listed = response.json().get("data", [])
        unfinished = sum(1 for job in listed if job.get("status") not in _FINISHED)
        if unfinished >= limit:
            raise APIError(
                429,
                f"{unfinished} video jobs are unfinished (the limit is {limit}); retry later.",
                code="queue_full",
                headers={"Retry-After": "30"},
            )

    async def create(self, request: Request) -> Response:
        url = self.base_url(request)
        await self.check_capacity(url, request.app.state.settings.max_queue)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await self._create_multipart(request, url)
        body = parse_json(await request.body())
        reference = body.get("input_reference")
        if reference is not None and not str(reference).startswith("data:"):
            raise bad_request(
                "'input_reference' must be a data: URL, or a file in a multipart body.", "input_reference"
            )
        return relay(await self.send("POST", url, json={k: v for k, v in body.items() if k in FIELDS}))

    async def _create_multipart(self, request: Request, url: str) -> Response:
        form = await request.form(max_files=1, max_fields=50)
        data = {k: v for k, v in form.items() if k in FIELDS and isinstance(v, str)}
        upload = form.get("input_reference")
        files = None
        if isinstance(upload, UploadFile):
            files = {"input_reference": (upload.filename or "reference", await upload.read(), upload.content_type)}
        return relay(await self.send("POST", url, data=data, files=files))

    async def content(self, request: Request, video_id: str) -> Response:
        params = {"variant": request.query_params["variant"]} if "variant" in request.query_params else {}
        upstream = await self.send("GET", self.video_url(request, video_id) + "/content", stream=True, params=params)
        if upstream.status_code != 200:
            await upstream.aread()
            await upstream.aclose()
            return relay(upstream)
        return StreamingResponse(
            upstream.aiter_bytes(),
            media_type=upstream.headers.get("content-type", "video/mp4"),
            background=BackgroundTask(upstream.aclose),
        )

    def router(self) -> APIRouter:
        router = APIRouter(dependencies=[Depends(require_api_key)])
        router.add_api_route("/v1/videos", self.create, methods=["POST"])
        router.add_api_route("/v1/videos/{video_id}/content", self.content, methods=["GET"])

        @router.get("/v1/videos")
        async def list_videos(request: Request) -> Response:
            params = {k: v for k, v in request.query_params.items() if k in ("after", "limit", "order")}
            return relay(await self.send("GET", self.base_url(request), params=params))

        @router.get("/v1/videos/{video_id}")
        async def get_video(request: Request, video_id: str) -> Response:
            return relay(await self.send("GET", self.video_url(request, video_id)))

        @router.delete("/v1/videos/{video_id}")
        async def delete_video(request: Request, video_id: str) -> Response:
            return relay(await self.send("DELETE", self.video_url(request, video_id)))

        return router
