"""The OpenAI Images endpoints: read the HTTP request, make one call into the service, render its answer.

Bodies are parsed off the event loop: JSON above LARGE_BODY and every multipart body are written to the request's
spool (server/spool.py) as they arrive and parsed there by a decode process (server/decoders.py), within the
request's deadline. The answer is JSON, or server-sent events for
`stream=true`. The request's life (its deadline, its client, its cleanup) is owned by RequestLife
(server/middleware.py).
"""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from server.auth import require_api_key
from server.bodies import (
    FILE_FIELDS,
    LARGE_BODY,
    FormLimits,
    FormPart,
    boundary_of,
    form_fields,
    media_type_of,
    read_form,
    read_json,
)
from server.budget import Reservation
from server.errors import APIError, ErrorResponse, bad_request
from server.middleware import Life
from server.protocol import MAX_INPUT_IMAGES, STREAM_EVENTS, ImagesResponse, StreamEvent
from server.service import EventStream, ImageCall, ImageService, Result
from server.spool import RequestSpool


def _service(request: Request) -> ImageService:
    return request.app.state.service


async def accepting(request: Request) -> None:
    """503 before the body is read, while the model loads or the server drains."""
    _service(request).lifecycle.check_accepting()


_RESPONSES = {
    200: {
        "model": ImagesResponse,
        "content": {"text/event-stream": {"schema": STREAM_EVENTS}},
        "description": "The images, or with stream=true their events",
    },
    **{status: {"model": ErrorResponse} for status in (400, 401, 413, 429, 500, 503, 504)},
}

router = APIRouter(dependencies=[Depends(require_api_key), Depends(accepting)])
Tenant = Annotated[str, Depends(require_api_key)]  # the same call as the router's: FastAPI runs it once


@router.post("/v1/images/generations", responses=_RESPONSES)
async def create_image(request: Request, tenant: Tenant) -> Response:
    return await _answer(request, await _json_call(request, False, tenant))


@router.post("/v1/images/edits", responses=_RESPONSES)
async def edit_image(request: Request, tenant: Tenant) -> Response:
    media_type = media_type_of(request.headers.get("content-type"))
    if media_type == "multipart/form-data":
        call = await _multipart_edit(request, tenant)
    elif media_type == "application/json":
        call = await _json_call(request, True, tenant)
    else:
        raise bad_request("Send the edit as multipart/form-data or application/json.", None, "unsupported_media_type")
    return await _answer(request, call)


async def _answer(request: Request, call: ImageCall) -> Response:
    answer = await _service(request).images(call)
    if isinstance(answer, EventStream):
        _life(request).on_end(answer.release)  # however the request ends, even before its answer begins
        return EventStreamResponse(answer)
    return await _json(request, answer)


async def _json(request: Request, result: Result) -> Response:
    request.state.timings = result.timings
    timing = ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in result.timings.items())
    body = await asyncio.to_thread(result.response.model_dump_json, exclude_unset=True)
    return Response(body, media_type="application/json", headers={"Server-Timing": timing})


# Proxies (nginx) buffer responses unless told not to; events must arrive as they happen.
_NO_BUFFERING = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStreamResponse(StreamingResponse):
    """Server-sent events that close their source when the response ends in any way (finished, the client
    gone, the deadline): the generators never wait, suspended, for the garbage collector."""

    def __init__(self, stream: EventStream) -> None:
        super().__init__(_sse(stream.events), media_type="text/event-stream", headers=_NO_BUFFERING)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


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
        yield f"event: error\ndata: {exc.event().model_dump_json()}\n\n".encode()
        return
    finally:
        await events.aclose()
    yield b"data: [DONE]\n\n"


# -- reading requests -----------------------------------------------------------------


def _life(request: Request) -> Life:
    return request.state.life


def deadline_of(request: Request) -> float:
    """The request's deadline (monotonic), from its owner (RequestLife)."""
    return _life(request).deadline


def memory_of(request: Request) -> Reservation:
    """The request's share of the input memory (server/budget.py), released by its owner when it ends."""
    if getattr(request.state, "memory", None) is None:
        request.state.memory = _service(request).memory.reservation(request.state.tenant)
        _life(request).on_end(request.state.memory.release)
    return request.state.memory


def spool_of(request: Request) -> RequestSpool:
    """The request's spool folder (server/spool.py), removed by its owner when it ends."""
    if getattr(request.state, "spool", None) is None:
        request.state.spool = _service(request).spool.request(request.state.tenant)
        _life(request).on_end(request.state.spool.remove)
    return request.state.spool


async def read_body(request: Request, to_disk: bool = False) -> bytes | Path:
    """The body: in memory up to LARGE_BODY, else (or `to_disk`) written to the request's spool as it arrives,
    each chunk reserved of the input disk before it is kept (429, as a full queue answers, when the disk or the
    tenant's share of it is full). A Content-Length that could not fit twice (the body, then what its parse
    writes) is refused before the first byte; it reserves nothing itself, so a client that promises a body and
    sends none holds nothing."""
    length = request.headers.get("content-length", "")
    spool = spool_of(request)
    if length.isdigit() and (to_disk or int(length) > LARGE_BODY):
        spool.disk.check(2 * int(length))  # the body, and what its parse may write beside it (server/bodies.py)
    chunks = aiter(request.stream())
    head = bytearray()
    async for chunk in chunks:
        head += chunk
        if to_disk or len(head) > LARGE_BODY:
            break
    else:
        if not to_disk:
            return bytes(head)
    return await spool.write(_joined(head, chunks), "body")  # its size bounded by BodyLimit (413)


async def _joined(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield head
    async for chunk in rest:
        yield chunk


async def _json_call(request: Request, edit: bool, tenant: str) -> ImageCall:
    body = await read_body(request)
    size = body.stat().st_size if isinstance(body, Path) else len(body)
    payload = await json_body(request, body)
    return ImageCall(
        edit,
        payload,
        _base_url(request),
        deadline_of(request),
        size,
        tenant=tenant,
        memory=memory_of(request),
        spool=spool_of(request),
    )


async def json_body(request: Request, body: bytes | Path) -> dict:
    """A JSON body, parsed off the event loop when large (server/bodies.py), by the request's deadline."""
    service = _service(request)
    max_image_bytes = int(service.settings.max_image_mb * 2**20)
    return await read_json(body, spool_of(request), service.decoders, deadline_of(request), max_image_bytes)


async def form_parts(request: Request, limits: FormLimits) -> list[FormPart]:
    """A multipart body's parts, spooled and parsed in a decode process by the request's deadline."""
    content_type = request.headers.get("content-type", "")
    boundary_of(content_type)  # refused before its body is written anywhere
    body = await read_body(request, to_disk=True)
    decoders = _service(request).decoders
    return await read_form(body, content_type, limits, spool_of(request), decoders, deadline_of(request))


async def _multipart_edit(request: Request, tenant: str) -> ImageCall:
    settings = _service(request).settings
    limits = FormLimits(MAX_INPUT_IMAGES + 1, 200, 2**20, int(settings.max_image_mb * 2**20), "image_too_large")
    parts = await form_parts(request, limits)
    files = [p.path for p in parts if p.name in ("image", "image[]") and p.path is not None]
    if len(files) > MAX_INPUT_IMAGES:
        raise bad_request(f"At most {MAX_INPUT_IMAGES} images may be sent.", "image")
    masks = [p for p in parts if p.name == "mask"]
    if len(masks) > 1 or (masks and masks[0].path is None):
        raise bad_request("'mask' must be one file (a PNG with an alpha channel).", "mask")
    payload = form_fields([(p.name, p.text) for p in parts if p.filename is None and p.name not in FILE_FIELDS])
    return ImageCall(
        True,
        payload,
        _base_url(request),
        deadline_of(request),
        multipart=True,
        uploads=files,
        mask_upload=masks[0].path if masks else None,
        tenant=tenant,
        memory=memory_of(request),
        spool=spool_of(request),
    )


def _base_url(request: Request) -> str:
    public_url = _service(request).settings.public_url
    if public_url:
        return public_url.rstrip("/")
    proto = request.headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    host = request.headers.get("x-forwarded-host") or request.headers.get("host") or request.url.netloc
    return f"{proto}://{host.split(',')[0].strip()}"
