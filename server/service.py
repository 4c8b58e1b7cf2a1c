"""The image service: one call per request, from what the HTTP layer read to a typed answer.

`images(call)` validates the request, plans it (rules, plugin options, every limit), takes its place in the
queue before it fetches or decodes anything, reads its inputs (fetched, inspected, decoded in a decode
process), waits for the engine, then finishes the images in the post-processing pool and delivers them. All of
it happens before the request's deadline (a 504 at it). It returns an `ImagesResponse`, or for `stream=true`
the events to send as they come.
"""

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, ValidationError

from server import respond, rules
from server.auth import DEFAULT_TENANT
from server.bodies import LARGE_BODY
from server.budget import InputBudget, Reservation, trim_heaps
from server.config import Settings, parse_quality_steps
from server.decoders import DecoderPool
from server.engines.base import Engine
from server.errors import from_validation, timed_out
from server.families import NONE, Family
from server.images import InputImage, decode_job, encode_image
from server.inputs import Reader, from_refs, from_uploads
from server.lifecycle import Lifecycle
from server.metrics import Metrics
from server.plugins import Delivered, PluginSet, RequestPlugins
from server.protocol import ImageRequest, ImagesResponse, StreamEvent, form_payload, request_models
from server.rules import Output
from server.scheduler import Admission, Job, Scheduler, cost
from server.spec import GenerationSpec
from server.spool import RequestSpool, Spool
from server.storage import ImageStore

log = logging.getLogger(__name__)

ANSWER_RESERVE = 0.1  # of REQUEST_TIMEOUT, at most 2 s: delivery ends this early, so that the answer is on time


@dataclass
class ImageCall:
    """One request to /v1/images/generations or /v1/images/edits, as the HTTP layer read it."""

    edit: bool
    payload: dict
    base_url: str
    deadline: float  # monotonic: REQUEST_TIMEOUT from the request's first byte
    body_bytes: int = 0
    multipart: bool = False
    uploads: list[Path] = field(default_factory=list)  # multipart edits: the image files, in `spool`
    mask_upload: Path | None = None
    tenant: str = DEFAULT_TENANT  # who the request is queued as (server/auth.py)
    memory: Reservation = field(kw_only=True)  # its input memory (server/budget.py); its owner releases it
    spool: RequestSpool = field(kw_only=True)  # its folder of input files (server/spool.py); its owner removes it

    def has_mask(self, request: ImageRequest) -> bool:
        return self.mask_upload is not None if self.multipart else request.mask is not None  # an edit request


@dataclass
class Plan:
    spec: GenerationSpec  # what the engine generates; without its input images: they are read after admission
    output: Output
    plugins: RequestPlugins  # what the plugins need of the request after generation
    sized_by_input: bool = False  # an edit with size=auto: its size is known once its image's header is read
    max_pixels: int = 0  # of each image: its size, or for an auto-sized edit the most it may get (MAX_PIXELS)

    @property
    def cost(self) -> float:
        """What the request costs the engine (scheduler.cost), known before any input is read: at the most
        pixels it may get until its input's header is read."""
        return cost(self.spec) * self.max_pixels / (self.spec.width * self.spec.height)


@dataclass
class Result:
    response: ImagesResponse
    timings: dict[str, float]


@dataclass
class EventStream:
    """stream=true: the request is admitted; `events` yields keep-alive comments (None) and events. The
    owner of the request calls `release` once, when it ends: its job dropped if unfinished, its count down."""

    events: AsyncIterator[StreamEvent | None]
    release: Callable[[], None]


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
        self.memory = InputBudget(
            settings.input_memory_bytes, settings.tenant_share, metrics.input_memory, "memory", self._retry_after,
            self._trim,
        )  # fmt: skip
        share = settings.tenant_share
        disk = InputBudget(settings.input_disk_bytes, share, metrics.input_disk, "disk", self._retry_after)
        self.spool = Spool(settings.spool_dir, disk)
        self._trimming: Future | None = None
        self.generation_model, self.edit_model = request_models(plugins.fields)
        self._pool = ThreadPoolExecutor(settings.postprocess_workers, thread_name_prefix="post")
        # partial images decoded (PREVIEW_DECODER) and encoded; one thread: they stay in order
        self._preview_pool = ThreadPoolExecutor(1, thread_name_prefix="preview")
        self._trimmer = ThreadPoolExecutor(1, thread_name_prefix="trim")  # heaps trimmed one at a time, apart
        self._reading = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="read")  # caller bytes
        self.decoders = DecoderPool(
            settings.decode_workers,
            settings.decode_timeout,
            settings.max_input_pixels,
            metrics.decodes_killed,
        )

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
            weights=s.weights,
            tenant_share=s.tenant_share,
            can_batch=self.engine.can_batch,
            expect_company=lambda: self.in_flight > 1,
            applied=lambda: self.engine.applied_loras,
        )
        self.scheduler.start()
        self.spool.start()
        self.decoders.start()

    def _retry_after(self) -> int:
        """What a 429 of the input memory or disk tells the caller to wait: the queue's wait frees them."""
        return self.scheduler.retry_after() if self.scheduler else 1

    def _trim(self) -> None:
        """Large inputs were given back: the heaps' free memory goes back to the system, on the trim thread, one
        trim at a time (none queued behind a running one)."""
        if self._trimming is None or self._trimming.done():
            self._trimming = self._trimmer.submit(trim_heaps)

    async def load(self) -> None:
        """The engine and the plugins, on the engine thread, while /health already answers."""
        await self.engine.call(self.load_now)
        self.lifecycle.loaded = True

    def load_now(self) -> None:
        """Blocking (the engine thread, or a benchmark that drives the engine itself)."""
        started = time.monotonic()
        self.engine.load(self.plugins)
        check_family_settings(self.engine.family, self.settings)
        steps, guidance = self.engine.defaults()
        self.default_steps = self.settings.default_steps or steps
        self.default_guidance = guidance if self.settings.default_guidance < 0 else self.settings.default_guidance
        self.plugins.load(self.engine.view(self.decoders.run))
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
        self._reading.shutdown(wait=True)
        self._trimmer.shutdown(wait=True)
        self.decoders.close()
        self.spool.close()
        self.engine.close()

    # -- one request -----------------------------------------------------

    async def images(self, call: ImageCall) -> Result | EventStream:
        """The whole request, by its deadline: APIError for anything refused (4xx, 429, 503, 504, 500)."""
        try:
            async with asyncio.timeout(call.deadline - time.monotonic()):
                return await self._request(call)
        except TimeoutError:
            raise timed_out(self.settings.request_timeout) from None

    async def _request(self, call: ImageCall) -> Result | EventStream:
        request = await self._validate(call)
        plan = await self.off_loop(self.plan, request, _mode(call, request), call.base_url)
        admission = self._admit(call, plan)  # before anything is fetched or decoded: a full queue costs nothing
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            job = await self._submit(admission, plan, request, call)
        except BaseException:
            self._done()
            raise
        if request.stream:
            return self._stream(job, plan, call)
        try:
            return await self._answer(job, plan, call)
        finally:
            self._done()

    def _done(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.dec()

    async def _validate(self, call: ImageCall) -> ImageRequest:
        model = self.edit_model if call.edit else self.generation_model
        if call.body_bytes > LARGE_BODY:  # validation of a large body leaves the event loop too
            return await self.off_loop(validate, model, call.payload, call.multipart)
        return validate(model, call.payload, call.multipart)

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Work on what a caller sent (validation, a short body's base64), in the bounded reading pool."""
        return await asyncio.get_running_loop().run_in_executor(self._reading, fn, *args)

    def plan(self, request: ImageRequest, mode: str, base_url: str) -> Plan:
        """Worker thread (plugins may look at files or resolve hosts): every rule and limit, before queueing.
        An edit with size=auto is sized by `resized` once its image's header is read; until then its cost
        counts the largest size it may get."""
        s = self.settings
        rules.check_background(request.background)
        sized_by_input = mode != "text2img" and request.size in (None, "auto")
        multiple = self.engine.family.size_multiple
        width, height = rules.requested_size(request.size, None, s, multiple)  # for auto: DEFAULT_SIZE till `resized`
        preset = rules.quality_preset(request.quality)
        steps = rules.steps(request.num_inference_steps, preset, self.default_steps, self.quality_steps, s.max_steps)
        strength = request.strength if mode != "text2img" else None  # a generation's `strength` is an unknown field
        rules.check_strength(strength, steps)
        plugins, loras = self.plugins.use(request)
        output = self._output(request, base_url, preset)
        if not sized_by_input:
            rules.check_output(*plugins.output_size((width, height)), output.format, s)
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
            mode=mode,
            loras=loras,
            partial_images=(request.partial_images or 0) if request.stream else 0,
        )
        self.engine.check(spec)
        return Plan(spec, output, plugins, sized_by_input, s.max_pixels if sized_by_input else width * height)

    def resized(self, plan: Plan, image_size: tuple[int, int]) -> Plan:
        """Worker thread: an auto-sized edit at its input's size (read from the header), every size rule
        checked again."""
        width, height = rules.requested_size("auto", image_size, self.settings, self.engine.family.size_multiple)
        output_size = plan.plugins.output_size((width, height))
        rules.check_output(*output_size, plan.output.format, self.settings)
        spec = replace(plan.spec, width=width, height=height)
        self.engine.check(spec)
        return replace(plan, spec=spec, sized_by_input=False, max_pixels=width * height)

    def _output(self, request: ImageRequest, base_url: str, preset: str) -> Output:
        fmt = request.output_format or "jpeg"
        compression = (
            request.output_compression if request.output_compression is not None else self.settings.jpeg_quality
        )
        response_format = "b64_json" if request.stream else request.response_format or "b64_json"  # events carry b64
        return Output(fmt, compression, response_format, base_url, preset)

    def _admit(self, call: ImageCall, plan: Plan) -> Admission:
        """The caller's place in the queue, held (against its share) while its inputs are read, weighed by
        what the request may cost before any input is fetched."""
        return self.scheduler.admit(call.tenant, plan.cost)

    async def _submit(self, admission: Admission, plan: Plan, request: ImageRequest, call: ImageCall) -> Job:
        """The input images read in the request's queue place (held against it meanwhile), then the job."""
        try:
            plan = await self._with_inputs(plan, request, call)
            spec = plan.spec
            return admission.submit(spec, asyncio.Queue() if spec.partial_images else None)
        finally:
            admission.release()

    async def _with_inputs(self, plan: Plan, request: ImageRequest, call: ImageCall) -> Plan:
        """An edit's inputs fetched and inspected, its size from them if auto, its image and mask decoded. What
        the pixels hold is taken before they are decoded (429 when they do not fit), until the request's owner
        ends it, and removes its files."""
        if not call.edit:
            return plan
        reader = Reader(self.settings, call.deadline, call.spool, self.decoders, self.off_loop)
        inputs = await (
            from_uploads(call.uploads, call.mask_upload, reader) if call.multipart else from_refs(request, reader)
        )
        call.memory.take(inputs.decoded_bytes(self.settings.max_pixels))
        if plan.sized_by_input:
            plan = await self.off_loop(self.resized, plan, (inputs.image.width, inputs.image.height))
        image = await self.decode(inputs.image, False, call.deadline)
        mask = await self.decode(inputs.mask, True, call.deadline) if inputs.mask is not None else None
        return replace(plan, spec=replace(plan.spec, image=image, mask=mask))

    async def decode(self, image: InputImage, mask: bool, deadline: float) -> Image.Image:
        """An inspected input's pixels (RGB, or a mask), from a decode process by `deadline`."""
        job = decode_job(image, mask, self.settings.max_pixels)
        return await self.decoders.run(job, deadline, f"'{image.param}'", image.param)

    async def _answer(self, job: Job, plan: Plan, call: ImageCall) -> Result:
        images = await self.scheduler.wait(job)
        started = time.monotonic()
        finished = await self._finish(images, plan, call.deadline)
        response = await self._in_pool(respond.response, finished, plan.output, self.store)
        post = time.monotonic() - started
        self.metrics.postprocess.observe(post)
        return Result(response, {"queue": job.queue_wait, "gen": job.generation_time, "post": post})

    async def _finish(self, images, plan: Plan, deadline: float) -> respond.Finished:
        abandoned = threading.Event()  # set when the request is cancelled: its pool work stops at the next step
        try:
            finished = await self._in_pool(
                respond.finish_images, plan.plugins, images, plan.spec, plan.output, self.metrics, abandoned.is_set
            )
        except asyncio.CancelledError:
            abandoned.set()
            raise
        deliveries = await self._deliver(finished, plan, deadline - self._answer_reserve)
        return respond.with_deliveries(finished, deliveries)

    @property
    def _answer_reserve(self) -> float:
        """Delivery ends this long before the request's deadline, so that its answer (the image, if an upload
        failed) is sent in time."""
        return min(2.0, ANSWER_RESERVE * self.settings.request_timeout)

    async def _deliver(self, finished: respond.Finished, plan: Plan, deadline: float) -> list[list[Delivered]]:
        """Nothing accepted is lost: a delivery that fails outright leaves every image in the response."""
        try:
            return await plan.plugins.deliver(finished.encoded, plan.output.format, deadline)
        except Exception:
            log.exception("delivery failed; the images are returned in the response")
            return []

    async def _in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- streaming -------------------------------------------------------

    def _stream(self, job: Job, plan: Plan, call: ImageCall) -> EventStream:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                if not job.future.done():
                    self.scheduler.cancel(job)
                self._done()

        return EventStream(self._events(job, plan, call), release)

    async def _events(self, job: Job, plan: Plan, call: ImageCall) -> AsyncIterator[StreamEvent | None]:
        """Keep-alives (None) while the request waits, its partial images as they form, then one completed event per
        image: for each image, its partial images in order, then its completed event. Each wait ends by the
        request's deadline (no timeout spans a `yield`: it would fire in whoever iterates)."""
        timeout = self.settings.request_timeout
        waiting = asyncio.ensure_future(by_deadline(self.scheduler.wait(job), call.deadline, timeout))
        partials = PartialImages(job.partial_queue, self._preview_pool, plan, call.edit)
        try:
            while not waiting.done():
                event = await partials.next(waiting, self.settings.stream_keepalive)
                if event is not None or not waiting.done():
                    yield event  # a partial image, or a keep-alive while the request waits
            async for partial in partials.rest():
                yield partial
            completed = self._completed(waiting.result(), plan, call)
            for event in await by_deadline(completed, call.deadline, timeout):
                yield event
        finally:
            waiting.cancel()  # the client left mid-stream: its share of the work stops

    async def _completed(self, images: list, plan: Plan, call: ImageCall) -> list[StreamEvent]:
        finished = await self._finish(images, plan, call.deadline)
        return await self._in_pool(respond.completed_events, finished, plan.output, call.edit)


class PartialImages:
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
        """The next partial image, or None (a keep-alive) when none came within `keepalive` or the job finished."""
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
        """Partial images queued before the job finished (the engine hands them over before its result)."""
        while self.queue is not None and not self.queue.empty():
            event = await self._event(*self.queue.get_nowait())
            if event is not None:
                yield event

    async def _event(self, index: int, render: Callable) -> StreamEvent | None:
        """The partial image as an event; None when it could not be made (never worth failing a request for)."""
        fmt, compression = self.output.format, self.output.compression
        try:
            encoded = await asyncio.get_running_loop().run_in_executor(
                self.pool, lambda: encode_image(render(), fmt, compression)
            )
        except Exception:
            log.exception("a partial image could not be made; the stream goes on without it")
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


def check_family_settings(family: Family, s: Settings) -> None:
    """Settings that every request of this family would break on stop the server at startup instead."""
    width, height = s.default_dimensions
    if width % family.size_multiple or height % family.size_multiple:
        raise SystemExit(
            f"DEFAULT_SIZE={s.default_size}: {family.name} needs width and height in multiples of "
            f"{family.size_multiple}."
        )
    if family.guidance_mode == NONE and s.default_guidance >= 0 and s.default_guidance != family.guidance:
        raise SystemExit(f"DEFAULT_GUIDANCE={s.default_guidance:g}: {family.name} takes no guidance; unset it.")


def validate(model: type[BaseModel], payload: dict, form: bool = False) -> ImageRequest:
    """Strictly, as JSON is meant (`true` is not 1, "2" is not 2); a form's text is converted by type first."""
    try:
        return model.model_validate(form_payload(model, payload) if form else payload, strict=True)
    except ValidationError as exc:
        raise from_validation(exc) from None


def _mode(call: ImageCall, request: ImageRequest) -> str:
    if not call.edit:
        return "text2img"
    return "inpaint" if call.has_mask(request) else "img2img"


async def by_deadline(awaitable: Awaitable[Any], deadline: float, timeout: float) -> Any:
    """`awaitable`'s result, or a 504 at `deadline` (monotonic); `timeout` is REQUEST_TIMEOUT, for the message."""
    try:
        return await asyncio.wait_for(awaitable, max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise timed_out(timeout) from None
