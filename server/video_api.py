"""The OpenAI Videos endpoints (/v1/videos): read the HTTP request, make one call into the video service.

`POST /v1/videos` takes JSON or multipart (the SDK always sends multipart; `input_reference` is then a file),
and answers at once with the queued job; the client polls `GET /v1/videos/{id}` and downloads the content
once it has completed. Every route sees only the jobs of the caller's API key.
"""

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from server.api import accepting, parse_body
from server.auth import owner, require_api_key
from server.bodies import form_fields, media_type_of
from server.errors import bad_request
from server.inputs import check_upload_size
from server.protocol import ErrorResponse, Video, VideoDeleted, VideoList
from server.video_store import ASSETS
from server.videos import VideoCall, VideoService

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 503)}

router = APIRouter(dependencies=[Depends(require_api_key)], responses=_ERRORS)


def _videos(request: Request) -> VideoService:
    return request.app.state.videos


@router.post("/v1/videos", dependencies=[Depends(accepting)])
async def create_video(request: Request) -> Video:
    media_type = media_type_of(request.headers.get("content-type"))
    if media_type == "multipart/form-data":
        call = await _multipart(request)
    elif media_type == "application/json":
        call = VideoCall(owner(request), await parse_body(await request.body()))
    else:
        raise bad_request(
            "Send the video request as multipart/form-data or application/json.", None, "unsupported_media_type"
        )
    return await _videos(request).create(call)


async def _multipart(request: Request) -> VideoCall:
    form = await request.form(max_files=1, max_fields=50, max_part_size=2**20)
    upload = form.get("input_reference")
    if isinstance(upload, UploadFile):
        check_upload_size("input_reference", upload.size, request.app.state.settings)
    payload = form_fields([(k, v) for k, v in form.multi_items() if not isinstance(v, UploadFile)])
    data = await upload.read() if isinstance(upload, UploadFile) else None
    return VideoCall(owner(request), payload, data, multipart=True)


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
async def remix_video(request: Request, video_id: str) -> Video:
    payload = await parse_body(await request.body())
    return await _videos(request).remix(owner(request), video_id, payload)
