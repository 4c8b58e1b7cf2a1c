"""From generated images to what a request is answered with: plugins, encoding, delivery, b64_json or URLs.

Two steps run in the post-processing pool (CPU work) and one on the event loop (delivery, which waits on the
network): `finish_images` -> `RequestPlugins.deliver` (`with_deliveries`) -> `response` for a JSON answer, or
`completed_events` for a stream; each is built from `Finished`, once. The bench's in-process side uses the same
functions, so it measures what the server does.
"""

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image
from pydantic import BaseModel

from server.errors import APIError
from server.images import encode_image
from server.metrics import Metrics
from server.plugins import Delivered, Processed, RequestPlugins
from server.protocol import ImageData, ImagesResponse, StreamEvent, Usage
from server.rules import Output, image_tokens
from server.spec import GenerationSpec
from server.storage import ImageStore


class Abandoned(Exception):
    """The request was cancelled (its client left, its deadline passed) while its images were finished."""


@dataclass
class Finished:
    """A request's images after the plugins, encoded, and after delivery: what its answer says of each."""

    encoded: list[bytes | None]  # None: withheld by a plugin
    seeds: list[int]
    added: list[list[BaseModel]]  # what the plugins add to each image's data[i], in the order they ran
    delivered: list[bool]  # sent elsewhere by a plugin: no b64_json or url
    size: str
    usage: Usage

    def fields(self, index: int) -> dict:
        """The image's data[i] fields but its bytes: its seed, and the plugins' fields as they were set."""
        fields: dict = {"seed": self.seeds[index]}
        for added in self.added[index]:
            fields.update(added.model_dump(exclude_unset=True))
        return fields


def finish_images(
    plugins: RequestPlugins,
    images: list[Image.Image],
    spec: GenerationSpec,
    output: Output,
    metrics: Metrics | None = None,
    abandoned: Callable[[], bool] = lambda: False,
) -> Finished:
    """Post-processing pool: the plugins' postprocess, then the encoder; `Abandoned` between steps once the
    request is gone (a thread cannot be stopped, but it can stop itself)."""
    kept: list[Image.Image | None] = list(images)
    added: list[list[BaseModel]] = [[] for _ in images]
    for step in plugins.postprocess_steps():
        _check(abandoned)
        processed = step(kept)
        _add(added, processed)
        kept = [p.image for p in processed]
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
    seeds = spec.seeds[: len(images)]
    return Finished(encoded, seeds, added, [False] * len(encoded), f"{first.width}x{first.height}", usage(spec))


def with_deliveries(finished: Finished, deliveries: list[list[Delivered]]) -> Finished:
    """Each plugin's deliveries (one list per plugin, one entry per image) taken into `finished`."""
    for delivered in deliveries:
        _add(finished.added, delivered)
        finished.delivered = [a or b.done for a, b in zip(finished.delivered, delivered, strict=True)]
    return finished


def _add(added: list[list[BaseModel]], outcomes: list[Processed] | list[Delivered]) -> None:
    for fields, outcome in zip(added, outcomes, strict=True):
        if outcome.fields is not None:
            fields.append(outcome.fields)


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


def response(finished: Finished, output: Output, store: ImageStore) -> ImagesResponse:
    """Post-processing pool: the JSON answer, each image not delivered elsewhere as b64_json or a URL of this
    server."""
    data = []
    for index, (encoded, done) in enumerate(zip(finished.encoded, finished.delivered, strict=True)):
        inline = _inline(encoded, output, store) if encoded is not None and not done else {}
        data.append(ImageData(**finished.fields(index), **inline))
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        background="opaque",
        output_format=output.format,
        size=finished.size,
        quality=output.quality,
        usage=finished.usage,
    )


def completed_events(finished: Finished, output: Output, edit: bool) -> list[StreamEvent]:
    """Post-processing pool: a stream's completed event for each image, its b64_json "" when it was withheld
    or delivered elsewhere (upload)."""
    kind = "image_edit.completed" if edit else "image_generation.completed"
    created = int(time.time())
    events = []
    for index, (encoded, done) in enumerate(zip(finished.encoded, finished.delivered, strict=True)):
        events.append(
            StreamEvent(
                type=kind,
                b64_json=b64(encoded) if encoded is not None and not done else "",
                created_at=created,
                size=finished.size,
                quality=output.quality,
                output_format=output.format,
                usage=finished.usage,  # the request's, as a JSON answer carries it
                **finished.fields(index),
            )
        )
    return events


def _inline(encoded: bytes, output: Output, store: ImageStore) -> dict:
    if output.response_format != "url":
        return {"b64_json": b64(encoded)}
    try:
        return {"url": f"{output.base_url}/v1/images/{store.save(encoded, output.format)}"}
    except ValueError:  # larger than the whole IMAGE_DIR_MAX_MB: the image is not lost
        return {"b64_json": b64(encoded), "url_error": "the image is larger than IMAGE_DIR_MAX_MB; it is inline"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
