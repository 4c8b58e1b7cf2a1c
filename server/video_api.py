"""The OpenAI Videos endpoints (/v1/videos): read the HTTP request, make one call into the video service.

`POST /v1/videos` takes JSON or multipart (the SDK always sends multipart; `input_reference` is then a file),
and answers at once with the queued job; the client polls `GET /v1/videos/{id}` and downloads the content
once it has completed. Every route sees only the jobs of the caller's API key.
"""

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse

from server.api import Tenant, accepting, deadline_of, form_parts, json_body, read_body, spool_of
from server.auth import owner, require_api_key
from server.bodies import FormLimits, form_fields, media_type_of
from server.errors import ErrorResponse, bad_request
from server.protocol import Video, VideoDeleted, VideoList
from server.video_store import ASSETS
from server.videos import VideoCall, VideoService

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}

router = APIRouter(dependencies=[Depends(require_api_key)], responses=_ERRORS)


def _videos(request: Request) -> VideoService:
    return request.app.state.videos


@router.post("/v1/videos", dependencies=[Depends(accepting)])
async def create_video(request: Request, tenant: Tenant) -> Video:
    media_type = media_type_of(request.headers.get("content-type"))
    if media_type == "multipart/form-data":
        call = await _multipart(request, tenant)
    elif media_type == "application/json":
        payload = await json_body(request, await read_body(request))
        call = VideoCall(owner(request), payload, deadline_of(request), spool_of(request), tenant=tenant)
    else:
        raise bad_request(
            "Send the video request as multipart/form-data or application/json.", None, "unsupported_media_type"
        )
    return await _videos(request).create(call)


async def _multipart(request: Request, tenant: str) -> VideoCall:
    """The form parsed in a decode process, as an edit's is."""
    limits = FormLimits(1, 50, 2**20, int(request.app.state.settings.max_image_mb * 2**20), "image_too_large")
    parts = await form_parts(request, limits)
    payload = form_fields([(p.name, p.text) for p in parts if p.filename is None])
    upload = next((p.path for p in parts if p.name == "input_reference" and p.path is not None), None)
    return VideoCall(
        owner(request), payload, deadline_of(request), spool_of(request), upload, multipart=True, tenant=tenant
    )


@router.get("/v1/videos")
async def list_videos(
    request: Request,
    after: str | None = Query(default=None, max_length=64),
    limit: int = Query(default=20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
) -> VideoList:
    return _videos(request).page(owner(request), after, limit, order)


@router.get("/v1/videos/{video_id}")
async def retrieve_video(request: Request, video_id: str) -> Video:
    return _videos(request).get(owner(request), video_id)


@router.delete("/v1/videos/{video_id}")
async def delete_video(request: Request, video_id: str) -> VideoDeleted:
    return await _videos(request).delete(owner(request), video_id)


@router.get("/v1/videos/{video_id}/content", response_class=FileResponse)
async def video_content(
    request: Request, video_id: str, variant: Literal["video", "thumbnail", "spritesheet"] = "video"
) -> FileResponse:
    path = _videos(request).content(owner(request), video_id, variant)
    return FileResponse(path, media_type=ASSETS[variant][1])


@router.post("/v1/videos/{video_id}/remix", dependencies=[Depends(accepting)])
async def remix_video(request: Request, video_id: str, tenant: Tenant) -> Video:
    payload = await json_body(request, await read_body(request))
    videos, deadline = _videos(request), deadline_of(request)
    return await videos.remix(owner(request), tenant, video_id, payload, deadline, spool_of(request))
