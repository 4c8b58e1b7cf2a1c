"""Upscale (the legacy `upscale: 2 | 4` parameter): enlarge each image before encoding.

Lanczos resampling: sharp and cheap. A learned super-resolution model can replace it later through the same
postprocess hook. The upscaled size is declared up front (`output_size`), so MAX_OUTPUT_PIXELS and the
encoders' limits are checked before generation.
"""

from typing import Annotated

from PIL import Image
from pydantic import AfterValidator, BaseModel, WithJsonSchema

from server.plugins import Plugin, Processed

FACTORS = (1, 2, 4)


def _factor(value: int) -> int:
    if value not in FACTORS:
        raise ValueError(f"must be {', '.join(map(str, FACTORS[:-1]))} or {FACTORS[-1]}")
    return value


# an int checked against FACTORS, not Literal[1, 2, 4]: pydantic matches int literals by equality even in strict
# mode, so `true` and 2.0 would pass as 1 and 2
Factor = Annotated[int, AfterValidator(_factor), WithJsonSchema({"type": "integer", "enum": list(FACTORS)})]


class UpscaleFields(BaseModel):
    upscale: Factor | None = None


class UpscalePlugin(Plugin[int]):
    name = "upscale"
    fields = UpscaleFields
    order = 20  # after the NSFW check, which looks at what the model made

    def option(self, request) -> int:
        return request.upscale or 1

    def output_size(self, option: int, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] * option, size[1] * option

    def postprocess(self, images: list[Image.Image | None], option: int) -> list[Processed]:
        return [Processed(_enlarged(image, option)) for image in images]


def _enlarged(image: Image.Image | None, factor: int) -> Image.Image | None:
    if image is None or factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.LANCZOS)
