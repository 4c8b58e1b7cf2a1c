"""An edit's input images: from multipart files or JSON image references, their structure read and checked.

This runs after the request has its place in the queue: remote images are fetched only then, one at a time
and all before the request's deadline. Only the first image is edited (the engines take one); the others are
checked from their structure (format, size, cost) and never decoded, and their bytes are dropped once
checked. The pixel budget (MAX_INPUT_PIXELS) counts every image and the mask. What reads caller bytes (base64,
structure walks) runs off the event loop, through `off_loop`.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from server.budget import Reservation
from server.config import Settings
from server.errors import bad_request
from server.images import InputImage, check_mask, check_pixels, decode_data_url, fetch_remote, inspect

OffLoop = Callable[..., Awaitable[Any]]  # runs a function in a worker thread and awaits its result


@dataclass(frozen=True)
class EditInputs:
    images: list[InputImage]  # only the first keeps its bytes: it is the one decoded
    mask: InputImage | None

    @property
    def image(self) -> InputImage:
        return self.images[0]

    @property
    def decoded_bytes(self) -> int:
        """What the edited image and the mask hold once decoded: RGB, and one byte a pixel of the mask."""
        return 3 * self.image.pixels + (self.mask.pixels if self.mask is not None else 0)


def _image_param(index: int, count: int) -> str:
    return f"image[{index}]" if count > 1 else "image"


def _inspected(data: bytes, param: str, s: Settings, keep: bool) -> InputImage:
    """Worker thread: the file's structure; its bytes kept only if it will be decoded."""
    image = inspect(data, param, s.max_jpeg_scans)
    return image if keep else replace(image, data=b"")


async def from_uploads(images: list[bytes], mask: bytes | None, s: Settings, off_loop: OffLoop) -> EditInputs:
    """Multipart: `image` or `image[]` files and an optional `mask` file."""
    if not images:
        raise bad_request("Missing required parameter: 'image'.", "image", "missing_required_parameter")
    inspected = [
        await off_loop(_inspected, data, _image_param(i, len(images)), s, i == 0) for i, data in enumerate(images)
    ]
    mask_image = await off_loop(_inspected, mask, "mask", s, True) if mask is not None else None
    return _checked(inspected, mask_image, s)


async def from_refs(request, s: Settings, deadline: float, off_loop: OffLoop, memory: Reservation) -> EditInputs:
    """JSON: `images: [{"image_url": ...}]` and an optional `mask`, as data URLs or URLs of allowed hosts. Each
    remote image holds MAX_IMAGE_MB of the request's input memory while it is fetched, then its size if kept."""
    if not request.images:
        raise bad_request("Missing required parameter: 'images'.", "images", "missing_required_parameter")
    images = [
        await _ref_image(ref, f"images[{i}]", s, deadline, off_loop, memory, i == 0)
        for i, ref in enumerate(request.images)
    ]
    mask = None if request.mask is None else await _ref_image(request.mask, "mask", s, deadline, off_loop, memory, True)
    return _checked(images, mask, s)


async def _ref_image(
    ref, param: str, s: Settings, deadline: float, off_loop: OffLoop, memory: Reservation, keep: bool
) -> InputImage:
    data = await ref_bytes(ref, param, s, deadline, off_loop, memory)
    image = await off_loop(_inspected, data, param, s, keep)
    if not keep and not ref.image_url.startswith("data:"):
        memory.give(len(data))  # a fetched image only checked: dropped
    return image


async def ref_bytes(
    ref, param: str, s: Settings, deadline: float, off_loop: OffLoop, memory: Reservation | None
) -> bytes:
    """A reference's bytes: a data URL decoded off the event loop (its body is counted already), or a remote
    image fetched by `deadline`, holding MAX_IMAGE_MB of `memory` while it is fetched (429 before the fetch when
    the input memory, or the tenant's share of it, is full), then its size."""
    limit = int(s.max_image_mb * 2**20)
    if ref.file_id is not None or not ref.image_url:
        raise bad_request(f"'{param}': file_id is not supported here; send image_url (a data URL).", param)
    if ref.image_url.startswith("data:"):
        return await off_loop(decode_data_url, ref.image_url, f"{param}.image_url", limit)
    if memory is not None:
        memory.take(limit)
    data = await fetch_remote(ref.image_url, f"{param}.image_url", s.remote_hosts, limit, deadline)
    if memory is not None:
        memory.give(limit - len(data))
    return data


def _checked(images: list[InputImage], mask: InputImage | None, s: Settings) -> EditInputs:
    check_pixels(images + ([mask] if mask is not None else []), s.max_input_pixels)
    if mask is not None:
        check_mask(mask, images[0])
    return EditInputs(images, mask)
