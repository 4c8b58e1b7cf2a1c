"""The image service: from a validated request to an OpenAI ImagesResponse.

It turns a request into a GenerationSpec (defaults, limits, seeds, plugin
options), runs it through the scheduler, then post-processes, encodes and
delivers the images in the post-processing pool, off the event loop and off
the engine thread.
"""

import asyncio
import base64
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from server.config import Settings
from server.errors import APIError, bad_request, unavailable
from server.images import encode_image
from server.metrics import Metrics
from server.plugins import PluginSet
from server.protocol import ImageRequest, request_models
from server.scheduler import Scheduler
from server.spec import GenerationSpec
from server.storage import ImageStore

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_RANDOM_SEED_LIMIT = 2**31  # random seeds stay small enough for every tool to reproduce them


@dataclass
class Output:
    """How the images of one request are returned."""

    format: str
    compression: int
    response_format: str
    base_url: str
    quality: str


@dataclass
class Result:
    body: bytes
    timings: dict[str, float] = field(default_factory=dict)


class ImageService:
    def __init__(self, settings: Settings, engine, plugins: PluginSet, metrics: Metrics) -> None:
        self.settings = settings
        self.engine = engine
        self.plugins = plugins
        self.metrics = metrics
        self.store = ImageStore(settings.images_path, settings.image_ttl)
        self.ready = False
        self.draining = False
        self.default_steps, self.default_guidance = 28, 3.5
        self.scheduler: Scheduler | None = None
        self.in_flight = 0  # accepted and not yet answered (the event loop alone changes it)
        self.generation_model, self.edit_model = request_models(plugins.fields)
        self._pool = ThreadPoolExecutor(settings.postprocess_workers, thread_name_prefix="post")

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """On the event loop, before serving."""
        s = self.settings
        self.scheduler = Scheduler(
            self._generate,
            self.metrics,
            max_queue=s.max_queue,
            max_batch=s.max_batch,
            batch_window=s.batch_window_ms / 1000,
            max_bypass=s.max_bypass,
            timeout=s.request_timeout,
            can_batch=self.engine.can_batch,
            expect_company=lambda: self.in_flight > 1,
        )
        self.scheduler.start()

    def load(self) -> None:
        """Blocking: load the engine and the plugins, warm up. Runs in a thread while /health already answers."""
        started = time.monotonic()
        self.engine.load()
        steps, guidance = self.engine.defaults()
        self.default_steps = self.settings.default_steps or steps
        self.default_guidance = guidance if self.settings.default_guidance < 0 else self.settings.default_guidance
        self.plugins.load()
        if self.settings.warmup:
            self.engine.warmup()
        log.info(
            "ready in %.1fs: model %s, %s, default steps %d, guidance %g",
            time.monotonic() - started,
            self.engine.name,
            self.engine.info,
            self.default_steps,
            self.default_guidance,
        )

    async def drain(self) -> None:
        self.draining = True
        self.metrics.ready.set(0)
        if self.scheduler:
            await self.scheduler.drain(self.settings.drain_timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        close_engine = getattr(self.engine, "close", None)  # an engine with a child process stops it here
        if close_engine is not None:
            close_engine()

    @property
    def engine_healthy(self) -> bool:
        """An out-of-process engine (SGLang) can die and come back; an in-process one is up once loaded."""
        return getattr(self.engine, "healthy", True)

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining and self.engine_healthy

    def check_accepting(self) -> None:
        if self.draining:
            raise unavailable("The server is shutting down; retry on another instance.", "shutting_down", 1)
        if not self.ready:
            raise unavailable("The model is still loading; retry shortly.", "model_loading", 10)
        if not self.engine_healthy:
            retry_after = getattr(self.engine, "retry_after", 10)
            raise unavailable("The generation engine is restarting; retry shortly.", "engine_restarting", retry_after)

    # -- request -> spec -------------------------------------------------

    def spec(self, req: ImageRequest, image: Image.Image | None = None, mask: Image.Image | None = None):
        if req.background == "transparent":
            raise bad_request(
                "Transparent backgrounds are not supported: this model cannot produce an alpha channel.",
                "background",
                "unsupported",
            )
        n = req.n or 1
        width, height = self._size(req.size, image)
        steps = req.num_inference_steps or self.default_steps
        if steps > self.settings.max_steps:
            raise bad_request(f"'num_inference_steps' may be at most {self.settings.max_steps}.", "num_inference_steps")
        strength = getattr(req, "strength", None)
        if image is not None and strength is not None and int(steps * strength) < 1:
            raise bad_request(
                f"'strength' {strength} with {steps} steps leaves no denoising step; raise either.", "strength"
            )
        options = self.plugins.options(req)
        return GenerationSpec(
            prompt=req.prompt,
            n=n,
            width=width,
            height=height,
            steps=steps,
            guidance=self.default_guidance if req.guidance_scale is None else req.guidance_scale,
            seeds=_seeds(req.seed, n),
            negative_prompt=req.negative_prompt,
            true_cfg=req.true_cfg_scale,
            strength=strength,
            image=image,
            mask=mask,
            prep=self.plugins.prep(options),
            options=options,
        )

    def _size(self, size: str | None, image: Image.Image | None) -> tuple[int, int]:
        s = self.settings
        if size in (None, "auto"):
            return _fit(*image.size, s) if image is not None else _parse_size(s.default_size)
        match = _SIZE.match(size)
        if not match:
            raise bad_request(f"Invalid value for 'size': {size!r}; use WIDTHxHEIGHT, e.g. 1024x1024, or auto.", "size")
        width, height = int(match[1]), int(match[2])
        if width % 16 or height % 16:
            raise bad_request(f"Invalid value for 'size': {size}; width and height must be multiples of 16.", "size")
        if not s.min_pixels <= width * height <= s.max_pixels or max(width, height) > s.max_side:
            raise bad_request(
                f"Invalid value for 'size': {size}; width*height must be between {s.min_pixels} and "
                f"{s.max_pixels} pixels and no side longer than {s.max_side}.",
                "size",
            )
        return width, height

    def output(self, req: ImageRequest, base_url: str) -> Output:
        fmt = req.output_format or "jpeg"
        quality = req.output_compression if req.output_compression is not None else self.settings.jpeg_quality
        response_format = "b64_json" if req.stream else req.response_format or "b64_json"  # events carry b64_json
        return Output(fmt, quality, response_format, base_url, req.quality or "auto")

    # -- running ---------------------------------------------------------

    def _generate(self, specs: list[GenerationSpec], prep: tuple, should_stop) -> list[list[Image.Image]]:
        """Engine thread."""
        self.plugins.prepare(prep)
        return self.engine.generate(specs, should_stop)

    async def run(self, spec: GenerationSpec, output: Output, disconnected: Awaitable | None) -> Result:
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            job = await self.scheduler.run(spec, disconnected)
            started = time.monotonic()
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(self._pool, self._respond, job.images, spec, output)
            post = time.monotonic() - started
            self.metrics.postprocess.observe(post)
            return Result(body, {"queue": job.queue_wait, "gen": job.generation_time, "post": post})
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    def _respond(self, images: list[Image.Image], spec: GenerationSpec, output: Output) -> bytes:
        """Post-processing pool: plugins, encoding, delivery; returns the JSON body."""
        items: list[dict] = [{} for _ in images]
        kept = self.plugins.postprocess(list(images), spec.options, items)
        if all(image is None for image in kept):
            raise APIError(
                400,
                "Your request was rejected by the safety system: every generated image was flagged.",
                code="moderation_blocked",
            )
        started = time.monotonic()
        encoded = [None if image is None else encode_image(image, output.format, output.compression) for image in kept]
        self.metrics.encode.observe(time.monotonic() - started)
        delivered = self.plugins.deliver(encoded, output.format, spec.options, items)
        for index, (data, done, item) in enumerate(zip(encoded, delivered, items, strict=True)):
            item["seed"] = spec.seeds[index]
            if data is None or done:
                continue
            if output.response_format == "url":
                item["url"] = output.base_url + "/v1/images/" + self.store.save(data, output.format)
            else:
                item["b64_json"] = _b64(data)
        first = next(image for image in kept if image is not None)
        response = {
            "created": int(time.time()),
            "data": items,
            "background": "opaque",
            "output_format": output.format,
            "size": f"{first.width}x{first.height}",
            "quality": output.quality,
        }
        return json.dumps(response).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _parse_size(size: str) -> tuple[int, int]:
    width, _, height = size.partition("x")
    return int(width), int(height)


def _fit(width: int, height: int, s: Settings) -> tuple[int, int]:
    """An input image's size, scaled into the allowed range and rounded down to multiples of 16."""
    scale = min(1.0, (s.max_pixels / (width * height)) ** 0.5, s.max_side / max(width, height))
    scale = max(scale, (s.min_pixels / (width * height)) ** 0.5)
    return max(16, int(width * scale) // 16 * 16), max(16, int(height * scale) // 16 * 16)


def _seeds(seed: int | list[int] | None, n: int) -> list[int]:
    if seed is None:
        return [secrets.randbelow(_RANDOM_SEED_LIMIT) for _ in range(n)]
    if isinstance(seed, int):
        return [(seed + i) % 2**63 for i in range(n)]
    if len(seed) != n:
        raise bad_request(
            f"'seed' lists {len(seed)} seeds for n={n} images; give one per image or a single seed.", "seed"
        )
    return list(seed)
