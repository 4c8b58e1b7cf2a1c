"""Image bytes in and out: decoding inputs (files, data URLs, allowed remote URLs) and encoding outputs.

Pillow is the encoder: its wheels carry libjpeg-turbo, and on a 1024x1024
image it matched simplejpeg within noise (bench/encode.py), so a second
binding buys nothing.
"""

import base64
import binascii
import io
from urllib.parse import urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from server.errors import bad_request

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}

# Decompression bombs: refuse anything over 64 megapixels before decoding it.
Image.MAX_IMAGE_PIXELS = 64 * 1024 * 1024


def decode_image(data: bytes, param: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        raise bad_request(f"'{param}' is not a readable PNG, JPEG or WebP image ({exc}).", param) from None
    if image.format not in ("PNG", "JPEG", "WEBP", "MPO"):
        raise bad_request(f"'{param}' must be a PNG, JPEG or WebP image, not {image.format}.", param)
    return image


def decode_data_url(url: str, param: str, max_bytes: int) -> bytes:
    header, _, payload = url.partition(",")
    if not header.startswith("data:") or ";base64" not in header:
        raise bad_request(f"'{param}' must be a base64 data URL (data:image/png;base64,...).", param)
    if len(payload) * 3 // 4 > max_bytes:
        raise bad_request(f"'{param}' is larger than {max_bytes // 2**20} MiB.", param, "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"'{param}' is not valid base64.", param) from None


async def fetch_remote(url: str, param: str, allowed_hosts: tuple[str, ...], max_bytes: int) -> bytes:
    """Fetch an http(s) image URL, only from hosts the operator allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad_request(f"'{param}' must be a data URL or an http(s) URL.", param)
    if parts.hostname not in allowed_hosts:
        raise bad_request(
            f"'{param}': fetching images from {parts.hostname} is not allowed on this server "
            "(send the image as a data URL or a file, or ask the operator to add the host to REMOTE_IMAGE_HOSTS).",
            param,
            "remote_image_not_allowed",
        )
    try:
        async with (
            httpx.AsyncClient(follow_redirects=False, timeout=30) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise bad_request(f"'{param}': {url} answered {response.status_code}.", param)
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise bad_request(f"'{param}' is larger than {max_bytes // 2**20} MiB.", param)
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise bad_request(f"'{param}': could not fetch {url}: {exc}", param) from None
    return b"".join(chunks)


def as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def mask_from_alpha(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """OpenAI's mask (alpha 0 = repaint) as a diffusers mask (white = repaint)."""
    if mask.size != size:
        raise bad_request(
            f"The mask is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}; they must match.",
            "mask",
        )
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise bad_request(
            "The mask must be a PNG with an alpha channel: fully transparent pixels mark the area to edit.", "mask"
        )
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
