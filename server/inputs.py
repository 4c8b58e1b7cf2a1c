"""An edit's input images: from multipart files or JSON image references, their headers read and checked.

Only the first image is edited (the engines take one); the others are checked from their headers (format,
size) and never decoded. The pixel budget (MAX_INPUT_PIXELS) counts every image and the mask.
"""

from dataclasses import dataclass

from server.config import Settings
from server.errors import bad_request
from server.images import InputImage, check_mask, check_pixels, decode_data_url, fetch_remote, probe


@dataclass(frozen=True)
class EditInputs:
    images: list[InputImage]
    mask: InputImage | None

    @property
    def image(self) -> InputImage:
        return self.images[0]


def check_upload_size(param: str, size: int | None, s: Settings) -> None:
    limit = int(s.max_image_mb * 2**20)
    if size is not None and size > limit:
        raise bad_request(f"'{param}' is larger than {s.max_image_mb:g} MiB.", param, "image_too_large")


def _image_param(index: int, count: int) -> str:
    return f"image[{index}]" if count > 1 else "image"


def from_uploads(images: list[bytes], mask: bytes | None, s: Settings) -> EditInputs:
    """Multipart: `image` or `image[]` files and an optional `mask` file."""
    if not images:
        raise bad_request("Missing required parameter: 'image'.", "image", "missing_required_parameter")
    probed = [probe(data, _image_param(i, len(images))) for i, data in enumerate(images)]
    return _checked(probed, probe(mask, "mask") if mask is not None else None, s)


async def from_refs(request, s: Settings) -> EditInputs:
    """JSON: `images: [{"image_url": ...}]` and an optional `mask`, as data URLs or URLs of allowed hosts."""
    if not request.images:
        raise bad_request("Missing required parameter: 'images'.", "images", "missing_required_parameter")
    images = [probe(await ref_bytes(ref, f"images[{i}]", s), f"images[{i}]") for i, ref in enumerate(request.images)]
    mask = probe(await ref_bytes(request.mask, "mask", s), "mask") if request.mask is not None else None
    return _checked(images, mask, s)


async def ref_bytes(ref, param: str, s: Settings) -> bytes:
    limit = int(s.max_image_mb * 2**20)
    if ref.file_id is not None or not ref.image_url:
        raise bad_request(f"'{param}': file_id is not supported here; send image_url (a data URL).", param)
    if ref.image_url.startswith("data:"):
        return decode_data_url(ref.image_url, f"{param}.image_url", limit)
    return await fetch_remote(ref.image_url, f"{param}.image_url", s.remote_hosts, limit)


def _checked(images: list[InputImage], mask: InputImage | None, s: Settings) -> EditInputs:
    check_pixels(images + ([mask] if mask is not None else []), s.max_input_pixels)
    if mask is not None:
        check_mask(mask, images[0])
    return EditInputs(images, mask)
