"""The OpenAI Images endpoints: read the HTTP request, make one call into the service, render its answer.

JSON bodies are parsed off the event loop when they are large; multipart bodies are read by Starlette with
bounded parts. The answer is JSON, or server-sent events for `stream=true`.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from server.auth import require_api_key
from server.bodies import FILE_FIELDS, form_fields, media_type_of, parse_json
from server.errors import APIError, bad_request
from server.inputs import check_upload_size
from server.protocol import ErrorResponse, ImagesResponse, StreamEvent
from server.scheduler import ClientGone
from server.service import LARGE_PAYLOAD, EventStream, ImageCall, ImageService, Result

MAX_INPUT_IMAGES = 16


def _service(request: Request) -> ImageService:
    return request.app.state.service


async def accepting(request: Request) -> None:
    """503 before the body is read, while the model loads or the server drains."""
    _service(request).lifecycle.check_accepting()


_RESPONSES = {
    200: {
        "model": ImagesResponse,
        "content": {"text/event-stream": {"schema": StreamEvent.model_json_schema()}},
        "description": "The images, or with stream=true their events",
    },
    **{status: {"model": ErrorResponse} for status in (400, 401, 413, 429, 500, 503, 504)},
}

router = APIRouter(dependencies=[Depends(require_api_key), Depends(accepting)])


@router.post("/v1/images/generations", responses=_RESPONSES)
async def create_image(request: Request) -> Response:
    body = await request.body()
    payload = await parse_body(body)
    call = ImageCall(False, payload, _base_url(request), len(body), disconnected=_disconnected(request))
    return await _answer(request, call)


@router.post("/v1/images/edits", responses=_RESPONSES)
async def edit_image(request: Request) -> Response:
    media_type = media_type_of(request.headers.get("content-type"))
    if media_type == "multipart/form-data":
        call = await _multipart_edit(request)
    elif media_type == "application/json":
        body = await request.body()
        payload = await parse_body(body)
        call = ImageCall(True, payload, _base_url(request), len(body), disconnected=_disconnected(request))
    else:
        raise bad_request("Send the edit as multipart/form-data or application/json.", None, "unsupported_media_type")
    return await _answer(request, call)


async def _answer(request: Request, call: ImageCall) -> Response:
    svc = _service(request)
    try:
        answer = await svc.images(call)
    except ClientGone:
        request.state.timings = {}
        return Response(status_code=499)
    if isinstance(answer, EventStream):
        return StreamingResponse(_sse(answer.events), media_type="text/event-stream", headers=_NO_BUFFERING)
    return await _json(request, answer)


async def _json(request: Request, result: Result) -> Response:
    request.state.timings = result.timings
    timing = ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in result.timings.items())
    body = await asyncio.to_thread(result.response.model_dump_json, exclude_unset=True)
    return Response(body, media_type="application/json", headers={"Server-Timing": timing})


# Proxies (nginx) buffer responses unless told not to; events must arrive as they happen.
_NO_BUFFERING = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _sse(events: AsyncIterator[StreamEvent | None]) -> AsyncIterator[bytes]:
    """Events as OpenAI streams them; an SSE comment keeps the connection alive while the request waits; an
    error after the stream began is an `error` event, which the SDK raises."""
    try:
        async for event in events:
            if event is None:
                yield b": keep-alive\n\n"
                continue
            data = await asyncio.to_thread(event.model_dump_json, exclude_none=True)
            yield f"event: {event.type}\ndata: {data}\n\n".encode()
    except APIError as exc:
        yield f"event: error\ndata: {json.dumps({'type': 'error', **exc.body()})}\n\n".encode()
        return
    yield b"data: [DONE]\n\n"


# -- reading requests -----------------------------------------------------------------


async def parse_body(body: bytes) -> dict:
    if len(body) > LARGE_PAYLOAD:
        return await asyncio.to_thread(parse_json, body)
    return parse_json(body)


async def _multipart_edit(request: Request) -> ImageCall:
    settings = _service(request).settings
    form = await request.form(max_files=MAX_INPUT_IMAGES + 1, max_fields=200, max_part_size=2**20)
    files = [f for key in ("image", "image[]") for f in form.getlist(key) if isinstance(f, UploadFile)]
    if len(files) > MAX_INPUT_IMAGES:
        raise bad_request(f"At most {MAX_INPUT_IMAGES} images may be sent.", "image")
    masks = form.getlist("mask")
    if len(masks) > 1 or (masks and not isinstance(masks[0], UploadFile)):
        raise bad_request("'mask' must be one file (a PNG with an alpha channel).", "mask")
    for upload in [*files, *masks]:
        check_upload_size("mask" if upload in masks else "image", upload.size, settings)
    payload = form_fields([(k, v) for k, v in form.multi_items() if k not in FILE_FIELDS])
    return ImageCall(
        True,
        payload,
        _base_url(request),
        multipart=True,
        uploads=[await f.read() for f in files],
        mask_upload=await masks[0].read() if masks else None,
        disconnected=_disconnected(request),
    )


def _base_url(request: Request) -> str:
    public_url = _service(request).settings.public_url
    if public_url:
        return public_url.rstrip("/")
    proto = request.headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    host = request.headers.get("x-forwarded-host") or request.headers.get("host") or request.url.netloc
    return f"{proto}://{host.split(',')[0].strip()}"


def _disconnected(request: Request) -> Callable[[], Awaitable[None]]:
    """A factory, not a coroutine: a request refused before it waits must leave nothing un-awaited."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait
