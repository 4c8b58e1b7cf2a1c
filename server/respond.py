"""From generated images to an OpenAI ImagesResponse: plugins, encoding, delivery, b64_json or URLs.

Two steps run in the post-processing pool (CPU work) and one on the event loop (delivery, which waits on
the network): `finish_images` -> `Plugins.deliver` -> `assemble`. The bench's in-process side uses the same
functions, so it measures what the server does.
"""

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from server.errors import APIError
from server.images import encode_image
from server.metrics import Metrics
from server.plugins import PluginSet
from server.protocol import ImageData, ImagesResponse, Usage
from server.rules import Output, image_tokens
from server.spec import GenerationSpec
from server.storage import ImageStore


class Abandoned(Exception):
    """The request was cancelled (its client left, its deadline passed) while its images were finished."""


@dataclass
class Finished:
    """A request's images after the plugins, encoded; `items` gathers each image's response fields."""

    encoded: list[bytes | None]  # None: withheld by a plugin
    items: list[dict]
    size: str
    usage: Usage


def finish_images(
    plugins: PluginSet,
    images: list[Image.Image],
    spec: GenerationSpec,
    output: Output,
    metrics: Metrics | None = None,
    abandoned: Callable[[], bool] = lambda: False,
) -> Finished:
    """Post-processing pool: the plugins' postprocess, then the encoder; `Abandoned` between steps once the
    request is gone (a thread cannot be stopped, but it can stop itself)."""
    items: list[dict] = [{"seed": seed} for seed in spec.seeds[: len(images)]]
    kept = list(images)
    for step in plugins.postprocess_steps(spec.options, items):
        _check(abandoned)
        kept = step(kept)
    if all(image is None for image in kept):
        raise APIError(
            400,
            "Your request was rejected by the safety system: every generated image was flagged.",
            code="moderation_blocked",
        )
    started = time.monotonic()
    encoded = [None if image is None else _encoded(image, output, abandoned) for image in kept]
    if metrics is not None:
        metrics.encode.observe(time.monotonic() - started)
    first = next(image for image in kept if image is not None)
    return Finished(encoded, items, f"{first.width}x{first.height}", usage(spec))


def usage(spec: GenerationSpec) -> Usage:
    """What the model worked on (see `Usage`): an edit's input image and every image generated, withheld ones
    included, at the size generated (before any upscale)."""
    tokens = image_tokens(spec.width, spec.height)
    return Usage.of_images(0 if spec.mode == "text2img" else tokens, tokens * spec.n)


def _check(abandoned: Callable[[], bool]) -> None:
    if abandoned():
        raise Abandoned()


def _encoded(image: Image.Image, output: Output, abandoned: Callable[[], bool]) -> bytes:
    _check(abandoned)
    return encode_image(image, output.format, output.compression)


def assemble(finished: Finished, delivered: list[bool], output: Output, store: ImageStore) -> ImagesResponse:
    """Post-processing pool: each image not delivered elsewhere as b64_json or a URL of this server."""
    data = []
    for encoded, done, item in zip(finished.encoded, delivered, finished.items, strict=True):
        if encoded is not None and not done:
            item.update(_inline(encoded, output, store))
        data.append(ImageData(**item))
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        background="opaque",
        output_format=output.format,
        size=finished.size,
        quality=output.quality,
        usage=finished.usage,
    )


def _inline(encoded: bytes, output: Output, store: ImageStore) -> dict:
    if output.response_format != "url":
        return {"b64_json": b64(encoded)}
    try:
        return {"url": f"{output.base_url}/v1/images/{store.save(encoded, output.format)}"}
    except ValueError:  # larger than the whole IMAGE_DIR_MAX_MB: the image is not lost
        return {"b64_json": b64(encoded), "url_error": "the image is larger than IMAGE_DIR_MAX_MB; it is inline"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
