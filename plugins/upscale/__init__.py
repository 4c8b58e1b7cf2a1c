"""Upscale (the legacy `upscale: 2 | 4` parameter): enlarge each image before encoding.

Lanczos resampling: sharp and cheap. A learned super-resolution model can replace it later through the same
postprocess hook. The upscaled size is declared up front (`output_size`), so MAX_OUTPUT_PIXELS and the
encoders' limits are checked before generation.
"""

from typing import Literal

from PIL import Image
from pydantic import BaseModel

from server.plugins import Plugin


class UpscaleFields(BaseModel):
    upscale: Literal[1, 2, 4] | None = None


class UpscalePlugin(Plugin):
    name = "upscale"
    fields = UpscaleFields
    order = 20  # after the NSFW check, which looks at what the model made

    def option(self, request) -> int:
        return request.upscale or 1

    def output_size(self, option: int, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] * option, size[1] * option

    def postprocess(self, images: list[Image.Image | None], option: int, items: list[dict]) -> list:
        if option == 1:
            return images
        return [
            None if image is None else image.resize((image.width * option, image.height * option), Image.LANCZOS)
            for image in images
        ]
