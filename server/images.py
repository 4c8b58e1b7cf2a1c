"""Image bytes in and out: input images (files, data URLs, allowed remote URLs) and the encoded outputs.

Inputs are files in the request's spool (server/spool.py), looked at twice, each time in a decode process
(server/decoders.py), only after the request has its place in the queue: `inspect_job` walks a file's structure
(format, size, and what decoding would cost; no pixels), so that every limit is checked before anything is
decoded; `decode_job` then decodes the one edited. Pillow is the encoder: its wheels
carry libjpeg-turbo, and on a 1024x1024 image it matched simplejpeg within noise (bench/encode.py).
"""

import asyncio
import base64
import binascii
import io
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from PIL import Image

from server.config import host_allowed
from server.decoders import Job, WorkerDied, timed_out_while
from server.errors import APIError, bad_request
from server.imagecost import CostlyImage, UnreadableImage, structure
from server.spool import RequestSpool

log = logging.getLogger(__name__)

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_OPENERS = ("PNG", "JPEG", "WEBP")  # Pillow's plugins tried, no other (JPEG opens MPO files too)
_BASE64_STEP = 1 << 20  # characters of base64 decoded per call (a multiple of 4)


@dataclass(frozen=True)
class InputImage:
    """An input file, its header read: what it costs to decode is known before it is decoded."""

    path: Path
    param: str
    format: str
    width: int
    height: int
    has_alpha: bool

    @property
    def pixels(self) -> int:
        return self.width * self.height


def inspect_job(path: Path, param: str, max_scans: int) -> Job:
    """Reading a file's structure in a decode process (the walk is a loop over what a caller sent)."""
    header = {"op": "inspect", "path": str(path), "param": param, "max_scans": max_scans}

    def finish(reply: dict, blobs: list[bytearray]) -> InputImage:
        return InputImage(path, param, reply["format"], reply["width"], reply["height"], reply["has_alpha"])

    return Job(header, [], 0, finish)


def inspect_frame(header: dict, blobs: list[bytearray]) -> tuple[dict, list[bytes]]:
    """Decode process: format, size and alpha from the file's structure (server/imagecost.py), and what decoding
    it would cost: a 400 for anything that is not a PNG, JPEG or WebP, or that costs more to decode than any image
    is worth."""
    param = header["param"]
    try:
        found = structure(Path(header["path"]).read_bytes(), header["max_scans"])
    except CostlyImage as exc:
        raise bad_request(f"'{param}' would cost too much to decode: {exc}.", param, "image_too_costly") from None
    except UnreadableImage as exc:
        raise bad_request(f"'{param}' is not a readable PNG, JPEG or WebP image ({exc}).", param) from None
    except OSError as exc:  # gone meanwhile (a remixed video's reference, its video deleted)
        raise unreadable_image(param, exc) from None
    if found.width < 1 or found.height < 1:
        raise bad_request(f"'{param}' has no pixels ({found.width}x{found.height}).", param)
    reply = {"format": found.format, "width": found.width, "height": found.height, "has_alpha": found.has_alpha}
    return reply, []


def check_pixels(images: list[InputImage], budget: int) -> None:
    """All the input images of one request together must decode within MAX_INPUT_PIXELS."""
    total = sum(image.pixels for image in images)
    if total > budget:
        sizes = ", ".join(f"{i.width}x{i.height}" for i in images)
        raise bad_request(
            f"The input images hold {total} pixels ({sizes}); this server decodes at most {budget} per request "
            "(MAX_INPUT_PIXELS). Send smaller images.",
            images[0].param,
            "image_too_large",
        )


def fitted(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The size an input is decoded to: its own, or scaled down, its aspect kept, to at most `max_pixels`
    (MAX_PIXELS: no engine uses more of an input than the largest image it makes)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def decode_job(image: InputImage, mask: bool, max_pixels: int) -> Job:
    """Decoding an input in a decode process, at most `max_pixels` of it (`fitted`): its pixels come back as RGB,
    or for a mask as the diffusers mask."""
    mode = "L" if mask else "RGB"
    size = fitted(image.width, image.height, max_pixels)
    header = {"op": "image", "path": str(image.path), "param": image.param, "mask": mask}
    header |= {"size": [image.width, image.height], "out": list(size)}
    reply_bytes = size[0] * size[1] * len(mode)

    def finish(reply: dict, blobs: list[bytearray]) -> Image.Image:
        if reply != {"mode": mode, "size": list(size), "blobs": [reply_bytes]}:
            raise WorkerDied(f"a decoder answered {reply} for a {size} {mode} image")
        return Image.frombytes(mode, size, blobs[0])

    return Job(header, [], reply_bytes, finish)


def decode_frame(header: dict, blobs: list[bytearray]) -> tuple[dict, list[bytes]]:
    """Decode process: the pixels of an inspected file, once Pillow reads the size its structure gave."""
    param = header["param"]
    try:
        with warnings.catch_warnings(), Image.open(header["path"], formats=_OPENERS) as image:
            warnings.simplefilter("ignore")
            if list(image.size) != header["size"]:
                raise UnreadableImage(f"its header says {image.size}, its structure {header['size']}")
            out = tuple(header["out"])
            image.draft(None, out)  # a JPEG is decoded at 1/2, 1/4 or 1/8 of its size when that still covers `out`
            image.load()
            decoded = mask_from_alpha(image) if header["mask"] else as_rgb(image)
            if decoded.size != out:
                reduce = Image.Resampling.NEAREST if header["mask"] else Image.Resampling.LANCZOS
                decoded = decoded.resize(out, reduce, reducing_gap=3.0)
    except Exception as exc:  # a hostile file may make a Pillow plugin fail in any way: the file's fault
        raise unreadable_image(param, exc) from None
    return {"mode": decoded.mode, "size": list(decoded.size)}, [decoded.tobytes()]


def unreadable_image(param: str, exc: Exception) -> APIError:
    """Pillow's words (object addresses, its internals) go to the log; the caller learns which image."""
    log.info("%s is not a readable image: %r", param, exc)
    return bad_request(f"'{param}' is not a readable PNG, JPEG or WebP image.", param)


def decode_data_url(url: str, param: str, max_bytes: int) -> bytes:
    """A short body's base64 data URL's bytes (a large body's are decoded in a decode process, server/bodies.py),
    decoded a MiB at a time: one long C call would hold the GIL, and with it the event loop."""
    start = url.find(",") + 1  # the payload is read in place: no copy of it is made
    header = url[: start - 1] if start else url
    if not start or not header.startswith("data:") or ";base64" not in header:
        raise bad_request(f"'{param}' must be a base64 data URL (data:image/png;base64,...).", param)
    if (len(url) - start) * 3 // 4 > max_bytes:
        raise image_too_large(param, max_bytes)
    out = io.BytesIO()  # its buffer becomes the result: no second copy of the bytes either
    try:
        for i in range(start, len(url), _BASE64_STEP):
            out.write(base64.b64decode(url[i : i + _BASE64_STEP], validate=True))
        return out.getvalue()
    except (binascii.Error, ValueError):
        raise bad_request(f"'{param}' is not valid base64.", param) from None


async def fetch_remote(
    url: str, param: str, allowed_hosts: tuple[str, ...], max_bytes: int, deadline: float, spool: RequestSpool
) -> Path:
    """Fetch an http(s) image URL into the request's spool, only from hosts the operator allowed, all of it
    before the request's deadline (a host that trickles a byte now and then is cut there, not per read). Once
    the host is allowed, `max_bytes` of the disk is reserved (429 when the spool, or the tenant's share of it,
    cannot hold it), the rest given back after: a fetch once begun is never cut short by what others hold."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise bad_request(f"'{param}' is not a valid URL.", param) from None
    if parts.scheme not in ("http", "https") or not host:
        raise bad_request(f"'{param}' must be a data URL or an http(s) URL.", param)
    if not host_allowed(allowed_hosts, parts.scheme, host, port):
        raise bad_request(
            f"'{param}': fetching images from {host}{f':{port}' if port else ''} is not allowed on this server "
            "(send the image as a data URL or a file, or ask the operator to add the host to REMOTE_IMAGE_HOSTS).",
            param,
            "remote_image_not_allowed",
        )
    spool.disk.take(max_bytes)
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            path = await _download(url, param, max_bytes, spool)
    except TimeoutError:
        raise timed_out_while(f"fetching '{param}'") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        log.info("%s: fetching %s failed: %r", param, url, exc)
        raise bad_request(f"'{param}': could not fetch the image from {host}.", param) from None
    spool.disk.give(max_bytes - path.stat().st_size)
    return path


async def _download(url: str, param: str, max_bytes: int, spool: RequestSpool) -> Path:
    async with (
        httpx.AsyncClient(follow_redirects=False, timeout=30) as client,
        client.stream("GET", url) as response,
    ):
        if response.status_code != 200:
            raise bad_request(f"'{param}': {url} answered {response.status_code}.", param)
        too_large = (max_bytes, lambda: image_too_large(param, max_bytes))
        return await spool.write(response.aiter_bytes(), "fetched", too_large, reserved=True)


def image_too_large(param: str, max_bytes: int) -> APIError:
    return bad_request(f"'{param}' is larger than {max_bytes / 2**20:g} MiB.", param, "image_too_large")


def as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def check_mask(mask: InputImage, image: InputImage) -> None:
    """From the headers: OpenAI's mask is a PNG with an alpha channel, the size of the image."""
    if (mask.width, mask.height) != (image.width, image.height):
        raise bad_request(
            f"The mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; they must match.",
            "mask",
        )
    if not mask.has_alpha:
        raise bad_request(
            "The mask must be a PNG with an alpha channel: fully transparent pixels mark the area to edit.", "mask"
        )


def mask_from_alpha(mask: Image.Image) -> Image.Image:
    """OpenAI's mask (alpha 0 = repaint) as a diffusers mask (white = repaint)."""
    alpha = mask.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)


def encode_image(image: Image.Image, fmt: str, quality: int) -> bytes:
    """Encode without metadata (Pillow writes none unless asked)."""
    out = io.BytesIO()
    image = as_rgb(image)
    if fmt == "png":
        image.save(out, "PNG", compress_level=1)
    else:
        image.save(out, _PIL_FORMATS[fmt], quality=quality)
    return out.getvalue()
