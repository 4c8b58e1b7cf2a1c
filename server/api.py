"""The OpenAI Images endpoints: parse the HTTP request, hand it to the service, answer."""

import asyncio
import json
import re
from collections.abc import Awaitable

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from server.auth import require_api_key
from server.errors import bad_request, from_validation
from server.images import as_rgb, decode_data_url, decode_image, fetch_remote, mask_from_alpha
from server.scheduler import ClientGone
from server.service import ImageService

router = APIRouter(dependencies=[Depends(require_api_key)])

MAX_INPUT_IMAGES = 16


def _service(request: Request) -> ImageService:
    return request.app.state.service


@router.post("/v1/images/generations")
async def create_image(request: Request) -> Response:
    svc = _service(request)
    svc.check_accepting()
    req = _validate(svc.generation_model, await _json_body(request))
    spec = await asyncio.to_thread(svc.spec, req)  # plugins may look up hosts (upload) or files (lora)
    return await _run(request, svc, req, spec)


@router.post("/v1/images/edits")
async def edit_image(request: Request) -> Response:
    svc = _service(request)
    svc.check_accepting()
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        req, image_bytes, mask_bytes = await _multipart_edit(request, svc)
    elif content_type.startswith("application/json"):
        req, image_bytes, mask_bytes = await _json_edit(request, svc)
    else:
        raise bad_request("Send the edit as multipart/form-data or application/json.", None, "unsupported_media_type")
    image, mask = await asyncio.to_thread(_decode_edit_inputs, image_bytes, mask_bytes)
    spec = await asyncio.to_thread(svc.spec, req, image, mask)
    return await _run(request, svc, req, spec)


async def _run(request: Request, svc: ImageService, req, spec) -> Response:
    output = svc.output(req, _base_url(request, svc.settings.public_url))
    try:
        result = await svc.run(spec, output, _disconnected(request))
    except ClientGone:
        request.state.timings = {}
        return Response(status_code=499)
    request.state.timings = result.timings
    timing = ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in result.timings.items())
    headers = {"Server-Timing": timing}
    if req.stream:
        event = "image_edit.completed" if request.url.path.endswith("/edits") else "image_generation.completed"
        return Response(_sse(result.body, event), media_type="text/event-stream", headers=headers)
    return Response(result.body, media_type="application/json", headers=headers)


def _sse(body: bytes, event: str) -> bytes:
    """stream=true: one completed event per image, as OpenAI streams them (no partial images: a diffusion
    model's intermediate steps are noise), then [DONE]."""
    response = json.loads(body)
    usage = {
        "input_tokens": 0,
        "output_tokens": 0,
        "total_tokens": 0,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    }
    shared = {k: response[k] for k in ("size", "quality", "background", "output_format")}
    lines = []
    for item in response["data"]:
        payload = {"type": event, "created_at": response["created"], **shared, "usage": usage, **item}
        lines.append(f"event: {event}\ndata: {json.dumps(payload)}\n\n")
    lines.append("data: [DONE]\n\n")
    return "".join(lines).encode()


# -- parsing ---------------------------------------------------------------


def _validate(model: type[BaseModel], data: object):
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation(exc) from None


async def _json_body(request: Request) -> object:
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"We could not parse the JSON body of your request: {exc}", None, "invalid_json") from None


async def _multipart_edit(request: Request, svc: ImageService):
    form = await request.form(max_files=MAX_INPUT_IMAGES + 1, max_fields=200, max_part_size=2**20)
    files = [f for key in ("image", "image[]") for f in form.getlist(key) if isinstance(f, UploadFile)]
    if not files:
        raise bad_request("Missing required parameter: 'image'.", "image", "missing_required_parameter")
    if len(files) > MAX_INPUT_IMAGES:
        raise bad_request(f"At most {MAX_INPUT_IMAGES} images may be sent.", "image")
    mask_file = form.get("mask")
    if mask_file is not None and not isinstance(mask_file, UploadFile):
        raise bad_request("'mask' must be a file (a PNG with an alpha channel).", "mask")
    req = _validate(svc.edit_model, form_fields(form.multi_items()))
    limit = int(svc.settings.max_image_mb * 2**20)
    images = [await _read_upload(f, "image", limit) for f in files]
    mask = await _read_upload(mask_file, "mask", limit) if mask_file is not None else None
    return req, images, mask


async def _read_upload(upload: UploadFile, param: str, limit: int) -> bytes:
    if upload.size is not None and upload.size > limit:
        raise bad_request(f"'{param}' is larger than {limit // 2**20} MiB.", param, "image_too_large")
    return await upload.read()


async def _json_edit(request: Request, svc: ImageService):
    req = _validate(svc.edit_model, await _json_body(request))
    if not req.images:
        raise bad_request("Missing required parameter: 'images'.", "images", "missing_required_parameter")
    images = [await _image_ref(svc, ref, f"images[{i}]") for i, ref in enumerate(req.images)]
    mask = await _image_ref(svc, req.mask, "mask") if req.mask is not None else None
    return req, images, mask


async def _image_ref(svc: ImageService, ref, param: str) -> bytes:
    limit = int(svc.settings.max_image_mb * 2**20)
    if ref.file_id is not None or not ref.image_url:
        raise bad_request(f"'{param}': file_id is not supported here; send image_url (a data URL).", param)
    if ref.image_url.startswith("data:"):
        return decode_data_url(ref.image_url, f"{param}.image_url", limit)
    return await fetch_remote(ref.image_url, f"{param}.image_url", svc.settings.remote_hosts, limit)


def _decode_edit_inputs(images: list[bytes], mask: bytes | None):
    """Worker thread: decode every input (so a broken second image is a 400 too); the first is edited."""
    decoded = [decode_image(data, f"image[{i}]" if len(images) > 1 else "image") for i, data in enumerate(images)]
    first = as_rgb(decoded[0])
    if mask is None:
        return first, None
    return first, mask_from_alpha(decode_image(mask, "mask"), first.size)


_LIST_KEY = re.compile(r"^(\w+)\[\](?:\[(\w+)\])?$")
_DICT_KEY = re.compile(r"^(\w+)\[(\w+)\]$")


def form_fields(items: list[tuple[str, object]]) -> dict:
    """Multipart fields as the JSON the sender meant: `a[]` lists, `a[][k]` lists of objects, `a[k]` objects,
    and JSON text for list or object fields sent by hand (curl -F 'loras=[...]')."""
    out: dict = {}
    seen: dict[tuple[str, str], int] = {}
    for key, value in items:
        if not isinstance(value, str) or key in ("image", "image[]", "mask"):
            continue
        if match := _LIST_KEY.match(key):
            name, sub = match.groups()
            values = out.setdefault(name, [])
            if sub is None:
                values.append(_maybe_json(value))
                continue
            # the i-th `a[][k]` belongs to element i: right for curl's interleaved order and for the
            # SDK's, which sends every a[][name] before every a[][weight]
            index = seen[(name, sub)] = seen.get((name, sub), -1) + 1
            while len(values) <= index:
                values.append({})
            values[index][sub] = value
        elif match := _DICT_KEY.match(key):
            out.setdefault(match[1], {})[match[2]] = value
        else:
            out[key] = _maybe_json(value)
    return out


def _maybe_json(value: str) -> object:
    if value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _base_url(request: Request, public_url: str) -> str:
    if public_url:
        return public_url.rstrip("/")
    proto = request.headers.get("x-forwarded-proto", request.url.scheme).split(",")[0].strip()
    host = request.headers.get("x-forwarded-host") or request.headers.get("host") or request.url.netloc
    return f"{proto}://{host.split(',')[0].strip()}"


def _disconnected(request: Request) -> Awaitable[None]:
    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait()
