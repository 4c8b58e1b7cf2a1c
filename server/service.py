"""The image service: one call per request, from what the HTTP layer read to a typed answer.

`images(call)` validates the request, plans it (rules, plugin options, every limit), takes its place in the
queue, decodes its inputs, waits for the engine, then finishes the images in the post-processing pool and
delivers them before the request's deadline. It returns an `ImagesResponse`, or for `stream=true` the events
to send as they come.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ValidationError

from server import respond, rules
from server.config import Settings, parse_quality_steps
from server.engines.base import Engine
from server.errors import from_validation
from server.images import as_rgb, decode, encode_image, mask_from_alpha
from server.inputs import EditInputs, from_refs, from_uploads
from server.lifecycle import Lifecycle
from server.metrics import Metrics
from server.plugins import PluginSet
from server.protocol import ImageRequest, ImagesResponse, StreamEvent, form_payload, request_models
from server.rules import Output
from server.scheduler import Job, Scheduler
from server.spec import GenerationSpec
from server.storage import ImageStore

log = logging.getLogger(__name__)

LARGE_PAYLOAD = 64 * 1024  # bytes of body above which validation leaves the event loop


@dataclass
class ImageCall:
    """One request to /v1/images/generations or /v1/images/edits, as the HTTP layer read it."""

    edit: bool
    payload: dict
    base_url: str
    body_bytes: int = 0
    multipart: bool = False
    uploads: list[bytes] = field(default_factory=list)  # multipart edits: the image files
    mask_upload: bytes | None = None
    disconnected: Callable[[], Awaitable[None]] | None = None  # resolves when the client has gone


@dataclass
class Plan:
    spec: GenerationSpec  # without its input images: they are decoded after admission
    output: Output
    inputs: EditInputs | None


@dataclass
class Result:
    response: ImagesResponse
    timings: dict[str, float]


@dataclass
class EventStream:
    """stream=true: the request is admitted; `events` yields keep-alive comments (None) and events."""

    events: AsyncIterator[StreamEvent | None]


class ImageService:
    def __init__(self, settings: Settings, engine: Engine, plugins: PluginSet, metrics: Metrics) -> None:
        self.settings = settings
        self.engine = engine
        self.plugins = plugins
        self.metrics = metrics
        self.lifecycle = Lifecycle(engine, metrics)
        self.store = ImageStore(settings.images_path, settings.image_ttl, int(settings.image_dir_max_mb * 2**20))
        self.default_steps, self.default_guidance = 28, 3.5
        self.quality_steps = parse_quality_steps(settings.quality_steps)
        self.scheduler: Scheduler | None = None
        self.in_flight = 0  # accepted and not yet answered (the event loop alone changes it)
        self.generation_model, self.edit_model = request_models(plugins.fields)
        self._pool = ThreadPoolExecutor(settings.postprocess_workers, thread_name_prefix="post")
        self._preview_pool = ThreadPoolExecutor(1, thread_name_prefix="preview")  # one: previews stay in order
        self._decoding = asyncio.Semaphore(settings.decode_workers)

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """On the event loop, before serving."""
        s = self.settings
        self.scheduler = Scheduler(
            self._execute,
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

    async def load(self) -> None:
        """The engine and the plugins, on the engine thread, while /health already answers."""
        await self.engine.call(self.load_now)
        self.lifecycle.loaded = True

    def load_now(self) -> None:
        """Blocking (the engine thread, or a benchmark that drives the engine itself)."""
        started = time.monotonic()
        self.engine.load(self.plugins)
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

    async def _execute(self, specs: list[GenerationSpec], progress) -> list:
        """The scheduler's way to the engine: one batch on the engine thread."""
        return await self.engine.call(lambda: self.engine.run(specs, progress))

    async def drain(self) -> None:
        self.lifecycle.draining = True
        if self.scheduler:
            await self.scheduler.drain(self.settings.drain_timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._preview_pool.shutdown(wait=True)
        self.engine.close()

    # -- one request -----------------------------------------------------

    async def images(self, call: ImageCall) -> Result | EventStream:
        """The whole request: APIError for anything refused (4xx, 429, 503, 504, 500), ClientGone if the client
        left while its request waited or ran."""
        deadline = time.monotonic() + self.settings.request_timeout
        request = await self._validate(call)
        inputs = await self._inputs(request, call) if call.edit else None
        plan = await asyncio.to_thread(self.plan, request, inputs, call.base_url)
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            job = await self._submit(plan, deadline)
        except BaseException:
            self._done()
            raise
        if request.stream:
            return EventStream(self._events(job, plan, call, deadline))
        try:
            return await self._answer(job, plan, call, deadline)
        finally:
            self._done()

    def _done(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.dec()

    async def _validate(self, call: ImageCall) -> ImageRequest:
        model = self.edit_model if call.edit else self.generation_model
        if call.body_bytes > LARGE_PAYLOAD:
            return await asyncio.to_thread(validate, model, call.payload, call.multipart)
        return validate(model, call.payload, call.multipart)

    async def _inputs(self, request, call: ImageCall) -> EditInputs:
        if call.multipart:
            return await asyncio.to_thread(from_uploads, call.uploads, call.mask_upload, self.settings)
        return await from_refs(request, self.settings)

    def plan(self, request: ImageRequest, inputs: EditInputs | None, base_url: str) -> Plan:
        """Worker thread (plugins may look at files or resolve hosts): every rule and limit, before queueing."""
        s = self.settings
        rules.check_background(request.background)
        image_size = (inputs.image.width, inputs.image.height) if inputs else None
        width, height = rules.requested_size(request.size, image_size, s)
        preset = rules.quality_preset(request.quality)
        steps = rules.steps(request.num_inference_steps, preset, self.default_steps, self.quality_steps, s.max_steps)
        strength = request.strength if inputs is not None else None  # a generation's `strength` is an unknown field
        rules.check_strength(strength, steps)
        options = self.plugins.options(request)
        output = self._output(request, base_url, preset)
        rules.check_output(*self.plugins.output_size(options, (width, height)), output.format, s)
        n = request.n or 1
        spec = GenerationSpec(
            prompt=request.prompt,
            n=n,
            width=width,
            height=height,
            steps=steps,
            guidance=self.default_guidance if request.guidance_scale is None else request.guidance_scale,
            seeds=rules.seeds(request.seed, n),
            negative_prompt=request.negative_prompt,
            true_cfg=request.true_cfg_scale,
            strength=strength,
            mode=_mode(inputs),
            loras=self.plugins.loras(options),
            previews=output.partial_images if request.stream else 0,
            options=options,
        )
        self.engine.check(spec)
        return Plan(spec, output, inputs)

    def _output(self, request: ImageRequest, base_url: str, preset: str) -> Output:
        fmt = request.output_format or "jpeg"
        compression = (
            request.output_compression if request.output_compression is not None else self.settings.jpeg_quality
        )
        response_format = "b64_json" if request.stream else request.response_format or "b64_json"  # events carry b64
        return Output(fmt, compression, response_format, base_url, preset, request.partial_images or 0)

    async def _submit(self, plan: Plan, deadline: float) -> Job:
        """A place in the queue first (429 decodes nothing), then the input images, then the job."""
        admission = self.scheduler.admit()
        try:
            spec = await self._decoded(plan.spec, plan.inputs)
            return admission.submit(spec, deadline, asyncio.Queue() if spec.previews else None)
        finally:
            admission.release()

    async def _decoded(self, spec: GenerationSpec, inputs: EditInputs | None) -> GenerationSpec:
        if inputs is None:
            return spec
        async with self._decoding:
            image, mask = await asyncio.to_thread(_decode_inputs, inputs)
        return replace(spec, image=image, mask=mask)

    async def _answer(self, job: Job, plan: Plan, call: ImageCall, deadline: float) -> Result:
        images = await self.scheduler.wait(job, call.disconnected)
        started = time.monotonic()
        response = await self._finish(images, plan, deadline)
        post = time.monotonic() - started
        self.metrics.postprocess.observe(post)
        return Result(response, {"queue": job.queue_wait, "gen": job.generation_time, "post": post})

    async def _finish(self, images, plan: Plan, deadline: float) -> ImagesResponse:
        finished = await self._in_pool(
            respond.finish_images, self.plugins, images, plan.spec, plan.output, self.metrics
        )
        delivered = await self._deliver(finished, plan, deadline)
        return await self._in_pool(respond.assemble, finished, delivered, plan.output, self.store)

    async def _deliver(self, finished: respond.Finished, plan: Plan, deadline: float) -> list[bool]:
        """Nothing accepted is lost: a delivery that fails outright leaves every image in the response."""
        try:
            return await self.plugins.deliver(
                finished.encoded, plan.output.format, plan.spec.options, finished.items, deadline
            )
        except Exception:
            log.exception("delivery failed; the images are returned in the response")
            return [False] * len(finished.encoded)

    async def _in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- streaming -------------------------------------------------------

    async def _events(
        self, job: Job, plan: Plan, call: ImageCall, deadline: float
    ) -> AsyncIterator[StreamEvent | None]:
        """Keep-alives (None) while the request waits, its previews as they form, then one completed event per
        image: for each image, its partial images in order, then its completed event."""
        waiting = asyncio.ensure_future(self.scheduler.wait(job))
        previews = Previews(job.previews, self._preview_pool, plan, call.edit)
        try:
            while not waiting.done():
                event = await previews.next(waiting, self.settings.stream_keepalive)
                if event is not None or not waiting.done():
                    yield event  # a preview, or a keep-alive while the request waits
            async for preview in previews.rest():
                yield preview
            response = await self._finish(waiting.result(), plan, deadline)
            for event in completed_events(response, call.edit):
                yield event
        finally:
            if not waiting.done():  # the client left mid-stream: its share of the work stops
                waiting.cancel()
                self.scheduler.cancel(job)
            self._done()


class Previews:
    """A streamed request's partial images: decoded and encoded on the preview thread, numbered per image."""

    def __init__(self, queue: asyncio.Queue | None, pool: ThreadPoolExecutor, plan: Plan, edit: bool) -> None:
        self.queue = queue
        self.pool = pool
        self.output = plan.output
        self.size = f"{plan.spec.width}x{plan.spec.height}"
        self.kind = "image_edit.partial_image" if edit else "image_generation.partial_image"
        self.count = [0] * plan.spec.n
        self.seeds = plan.spec.seeds

    async def next(self, waiting: asyncio.Future, keepalive: float) -> StreamEvent | None:
        """The next preview, or None (a keep-alive) when none came within `keepalive` or the job finished."""
        if self.queue is None:
            await asyncio.wait({waiting}, timeout=keepalive)
            return None
        getter = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({getter, waiting}, timeout=keepalive, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            return None
        return await self._event(*getter.result())

    async def rest(self) -> AsyncIterator[StreamEvent]:
        """Previews queued before the job finished (the engine hands them over before its result)."""
        while self.queue is not None and not self.queue.empty():
            event = await self._event(*self.queue.get_nowait())
            if event is not None:
                yield event

    async def _event(self, index: int, render: Callable) -> StreamEvent | None:
        """The preview as an event; None when it could not be made (a preview is never worth failing a request)."""
        fmt, compression = self.output.format, self.output.compression
        try:
            encoded = await asyncio.get_running_loop().run_in_executor(
                self.pool, lambda: encode_image(render(), fmt, compression)
            )
        except Exception:
            log.exception("a preview could not be made; the stream goes on without it")
            return None
        self.count[index] += 1
        return StreamEvent(
            type=self.kind,
            b64_json=respond.b64(encoded),
            created_at=int(time.time()),
            size=self.size,
            quality=self.output.quality,
            output_format=fmt,
            partial_image_index=self.count[index] - 1,
            seed=self.seeds[index],  # which image of the request, as in its completed event
        )


def validate(model: type[BaseModel], payload: dict, form: bool = False) -> ImageRequest:
    """Strictly, as JSON is meant (`true` is not 1, "2" is not 2); a form's text is converted by type first."""
    try:
        return model.model_validate(form_payload(model, payload) if form else payload, strict=True)
    except ValidationError as exc:
        raise from_validation(exc) from None


def completed_events(response: ImagesResponse, edit: bool) -> list[StreamEvent]:
    kind = "image_edit.completed" if edit else "image_generation.completed"
    return [
        StreamEvent(
            type=kind,
            created_at=response.created,
            size=response.size,
            quality=response.quality,
            background=response.background,
            output_format=response.output_format,
            usage=response.usage,  # the request's, as the response carries it
            **{"b64_json": "", **item.model_dump(exclude_unset=True)},  # "": delivered elsewhere (upload)
        )
        for item in response.data
    ]


def _mode(inputs: EditInputs | None) -> str:
    if inputs is None:
        return "text2img"
    return "img2img" if inputs.mask is None else "inpaint"


def _decode_inputs(inputs: EditInputs):
    """Worker thread: the first image (the one edited) and the mask; the other images were only checked."""
    image = as_rgb(decode(inputs.image))
    mask = mask_from_alpha(decode(inputs.mask)) if inputs.mask is not None else None
    return image, mask
