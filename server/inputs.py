"""An edit's input images: from multipart files or JSON image references, their structure read and checked.

This runs after the request has its place in the queue. Every input is a file in the request's spool
(server/spool.py): a form's files and a large body's data URLs are there already, a short body's data URL is
decoded into it, and remote images are fetched into it, one at a time and all before the request's deadline.
Only the first image is edited (the engines take one); the others are checked from their structure (format,
size, cost) in a decode process and never decoded, and their files are dropped once checked. The pixel budget
(MAX_INPUT_PIXELS) counts every image and the mask.
"""

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.config import Settings
from server.decoders import DecoderPool
from server.errors import bad_request
from server.images import InputImage, check_mask, check_pixels, decode_data_url, fetch_remote, fitted, inspect_job
from server.spool import RequestSpool

OffLoop = Callable[..., Awaitable[Any]]  # runs a function in a worker thread and awaits its result


@dataclass(frozen=True)
class EditInputs:
    images: list[InputImage]  # only the first keeps its file: it is the one decoded
    mask: InputImage | None

    @property
    def image(self) -> InputImage:
        return self.images[0]

    def decoded_bytes(self, max_pixels: int) -> int:
        """What the edited image and the mask hold once decoded (at most `max_pixels` each, images.fitted): RGB,
        and one byte a pixel of the mask."""
        image = math.prod(fitted(self.image.width, self.image.height, max_pixels))
        return 3 * image + (image if self.mask is not None else 0)


@dataclass(frozen=True)
class Reader:
    """What reading inputs needs: the settings, the request's deadline and spool, the decode processes, and a
    worker thread for what runs in the server (a short body's base64)."""

    settings: Settings
    deadline: float
    spool: RequestSpool
    decoders: DecoderPool
    off_loop: OffLoop

    async def inspect(self, path: Path, param: str, keep: bool) -> InputImage:
        """The file's structure, from a decode process; the file dropped unless it will be decoded."""
        job = inspect_job(path, param, self.settings.max_jpeg_scans)
        image = await self.decoders.run(job, self.deadline, f"'{param}'", param)
        if not keep:
            self.spool.drop(path)
        return image


def _image_param(index: int, count: int) -> str:
    return f"image[{index}]" if count > 1 else "image"


async def from_uploads(images: list[Path], mask: Path | None, reader: Reader) -> EditInputs:
    """Multipart: `image` or `image[]` files and an optional `mask` file."""
    if not images:
        raise bad_request("Missing required parameter: 'image'.", "image", "missing_required_parameter")
    inspected = [await reader.inspect(path, _image_param(i, len(images)), i == 0) for i, path in enumerate(images)]
    mask_image = await reader.inspect(mask, "mask", True) if mask is not None else None
    return _checked(inspected, mask_image, reader.settings)


async def from_refs(request, reader: Reader) -> EditInputs:
    """JSON: `images: [{"image_url": ...}]` and an optional `mask`, as data URLs or URLs of allowed hosts."""
    if not request.images:
        raise bad_request("Missing required parameter: 'images'.", "images", "missing_required_parameter")
    images = [
        await reader.inspect(await ref_file(ref, f"images[{i}]", reader), f"images[{i}]", i == 0)
        for i, ref in enumerate(request.images)
    ]
    mask = None
    if request.mask is not None:
        mask = await reader.inspect(await ref_file(request.mask, "mask", reader), "mask", True)
    return _checked(images, mask, reader.settings)


async def ref_file(ref, param: str, reader: Reader) -> Path:
    """A reference's file in the request's spool: a large body's data URL as its decode process wrote it, a short
    body's decoded here off the event loop, or a remote image fetched by the deadline."""
    s, spool = reader.settings, reader.spool
    limit = int(s.max_image_mb * 2**20)
    if ref.file_id is not None or not ref.image_url:
        raise bad_request(f"'{param}': file_id is not supported here; send image_url (a data URL).", param)
    where = f"{param}.image_url"
    if (path := spool.data_url(ref.image_url, where)) is not None:
        return path
    if ref.image_url.startswith("data:"):
        data = await reader.off_loop(decode_data_url, ref.image_url, where, limit)
        spool.disk.take(len(data))
        path = spool.path("data-url")
        await reader.off_loop(path.write_bytes, data)
        return path
    return await fetch_remote(ref.image_url, where, s.remote_hosts, limit, reader.deadline, spool)


def _checked(images: list[InputImage], mask: InputImage | None, s: Settings) -> EditInputs:
    check_pixels(images + ([mask] if mask is not None else []), s.max_input_pixels)
    if mask is not None:
        check_mask(mask, images[0])
    return EditInputs(images, mask)
