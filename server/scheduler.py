"""The scheduler: a bounded queue in front of the one engine, and the batches it runs.

The event loop only admits, queues, picks batches and hands them to the engine; the engine runs them on its
own thread. Post-processing of a finished batch happens in the request handlers, so it overlaps the next
batch's generation.

Admission comes first: a request takes its place in the queue (or gets 429) before its input images are
decoded, so a full server decodes nothing. Picking a batch: the oldest waiting request leads, so incompatible
keys are served first come first served. One exception: a request whose LoRA set is already applied may go
before an older one that would need a switch, but an old request is passed over at most `max_bypass` times.
"""

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from PIL import Image

from server.engines.base import Progress
from server.errors import APIError, shutting_down, timed_out
from server.lora import LoRASet
from server.metrics import Metrics
from server.spec import GenerationSpec

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 120  # seconds; the OpenAI SDK ignores longer hints
# What a caller learns of an engine failure: the exception (its paths, its internals) goes to the log.
ENGINE_FAILED = "The engine failed while generating; the server log has the reason."

# Runs one batch (specs that share a BatchKey) on the engine; one list of images per spec.
Execute = Callable[[list[GenerationSpec], Progress], Awaitable[list[list[Image.Image]]]]


class ClientGone(Exception):
    """The client disconnected before its request finished; nobody is left to answer."""


@dataclass(eq=False)
class Job:
    spec: GenerationSpec
    deadline: float  # monotonic time by which the request must be answered
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0
    finished: float = 0.0
    bypassed: int = 0
    cancelled: bool = False
    previews: asyncio.Queue | None = None  # stream=true: (image index, render) as the engine takes previews
    progress: float = 0.0  # the fraction of its denoising steps done (written on the engine thread)

    @property
    def queue_wait(self) -> float:
        return self.started - self.enqueued if self.started else 0.0

    @property
    def generation_time(self) -> float:
        return self.finished - self.started if self.finished else 0.0


class Admission:
    """A place in the queue, held while the request's inputs are decoded; `submit` or `release` ends it."""

    def __init__(self, scheduler: "Scheduler") -> None:
        self._scheduler = scheduler
        self._open = True

    def submit(self, spec: GenerationSpec, deadline: float, previews: asyncio.Queue | None = None) -> Job:
        self.release()
        return self._scheduler._enqueue(spec, deadline, previews)

    def release(self) -> None:
        if self._open:
            self._open = False
            self._scheduler._reserved -= 1


class Scheduler:
    def __init__(
        self,
        execute: Execute,
        metrics: Metrics,
        *,
        max_queue: int,
        max_batch: int,
        batch_window: float,
        max_bypass: int,
        timeout: float,
        can_batch: bool = True,
        expect_company: Callable[[], bool] = lambda: True,
    ) -> None:
        self._execute = execute
        self._metrics = metrics
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_window = batch_window
        self.max_bypass = max_bypass
        self.timeout = timeout  # REQUEST_TIMEOUT, for the 504's message (each job carries its deadline)
        self.can_batch = can_batch
        self._expect_company = expect_company
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._reserved = 0
        self._applied: LoRASet | None = None
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._stop_running = False  # drain ran out of time: the running batch stops at its next step
        self.accepting = True
        self.seconds_per_image = 1.0  # recent average, for Retry-After
        self._engine_free_at = 0.0
        self._task: asyncio.Task | None = None

    # -- public ----------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="scheduler")

    @property
    def depth(self) -> int:
        return len(self._queue)

    def admit(self) -> Admission:
        """A place in the queue, or 503 (draining) / 429 (full, with the wait the queue holds) at once."""
        if not self.accepting:
            raise shutting_down()
        waiting = sum(1 for j in self._queue if not j.cancelled) + self._reserved
        if waiting >= self.max_queue:
            raise APIError(
                429,
                f"The server's queue is full ({self.max_queue} requests waiting); retry later.",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after())},
            )
        self._reserved += 1
        return Admission(self)

    def retry_after(self) -> int:
        """The estimated wait: the images queued and running, at the recent seconds per image."""
        images = sum(j.spec.n for j in self._queue) + sum(j.spec.n for j in self._running)
        return max(1, min(MAX_RETRY_AFTER, math.ceil(images * self.seconds_per_image)))

    async def wait(self, job: Job, disconnected: Callable[[], Awaitable[None]] | None = None) -> list[Image.Image]:
        """The job's images; APIError (504 past the deadline, 503, 500, 400) or ClientGone."""
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        waiting = {job.future} | ({watcher} if watcher else set())
        try:
            timeout = max(0.0, job.deadline - time.monotonic())
            done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watcher:
                watcher.cancel()
        if job.future.done():
            return job.future.result()  # raises the job's error, if any
        self.cancel(job)
        if watcher in done:
            raise ClientGone()
        raise timed_out(self.timeout)

    def cancel(self, job: Job) -> None:
        """Nobody waits for this job any more: dropped from the queue, or its batch stops when all have left."""
        job.cancelled = True
        self._wakeup.set()

    async def drain(self, timeout: float) -> None:
        """Stop accepting; let queued and running work finish; past `timeout`, stop the running batch at its
        next step and answer what is left with 503."""
        self.accepting = False
        self._wakeup.set()
        deadline = time.monotonic() + timeout
        while (self._queue or self._running) and time.monotonic() < deadline:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), min(0.5, max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                pass
        self._refuse_what_is_left()
        self._closing = True
        self._wakeup.set()
        if self._task:
            await self._task

    # -- queueing --------------------------------------------------------

    def _enqueue(self, spec: GenerationSpec, deadline: float, previews: asyncio.Queue | None) -> Job:
        if not self.accepting:
            raise shutting_down()
        job = Job(spec, deadline, asyncio.get_running_loop().create_future(), previews=previews)
        self._queue.append(job)
        self._metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()
        return job

    def _refuse_what_is_left(self) -> None:
        left = [j for j in self._queue + self._running if not j.cancelled and not j.future.done()]
        if left:
            log.warning("drain timeout: stopping the running batch and refusing %d requests", len(left))
        for job in left:
            _fail(job, shutting_down())
        self._stop_running = True
        self._queue.clear()
        self._metrics.queue_depth.set(0)

    # -- batching --------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            self._running = batch
            started = time.monotonic()
            results = await self._run_batch(batch)
            self._engine_free_at = time.monotonic()
            images = sum(j.spec.n for j in batch)
            per_image = (self._engine_free_at - started) / max(1, images)
            self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * per_image
            self._finish(batch, results)
            self._running = []
            if not self._queue:
                self._idle.set()

    async def _next_batch(self) -> list[Job] | None:
        while True:
            self._queue = [j for j in self._queue if not j.cancelled]
            self._metrics.queue_depth.set(len(self._queue))
            if not self._queue:
                self._idle.set()
                if self._closing:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._pick_head()
            batch = self._gather(head)
            # the window runs from when the engine could start this batch: from the head's arrival, or from
            # the end of the last batch, whose clients may be about to send their next requests
            delay = max(head.enqueued, self._engine_free_at) + self.batch_window - time.monotonic()
            if delay > 0 and self._worth_waiting(batch):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), delay)
                except TimeoutError:
                    pass
                continue
            self._take(batch)
            return batch

    def _worth_waiting(self, batch: list[Job]) -> bool:
        """Hold a partial batch back for companions only when nothing else is queued (the engine would idle
        with work waiting) and other requests are in flight elsewhere (being post-processed or answered: their
        clients may come right back). A lone client never pays the window."""
        room = self.can_batch and sum(j.spec.n for j in batch) < self.max_batch
        alone_in_queue = len(batch) == len(self._queue)
        return room and alone_in_queue and self.accepting and self._expect_company()

    def _pick_head(self) -> Job:
        oldest = self._queue[0]
        if oldest.spec.loras == self._applied or oldest.bypassed >= self.max_bypass:
            return oldest
        return next((j for j in self._queue if j.spec.loras == self._applied), oldest)

    def _gather(self, head: Job) -> list[Job]:
        if not self.can_batch:
            return [head]
        batch, images = [head], head.spec.n
        for job in self._queue:
            if job is head or job.spec.key != head.spec.key or images + job.spec.n > self.max_batch:
                continue
            batch.append(job)
            images += job.spec.n
        return batch

    def _take(self, batch: list[Job]) -> None:
        now = time.monotonic()
        first = batch[0]
        for job in self._queue:
            if job.enqueued < first.enqueued and job not in batch:
                job.bypassed += 1
        self._queue = [j for j in self._queue if j not in batch]
        self._metrics.queue_depth.set(len(self._queue))
        for job in batch:
            job.started = now
            self._metrics.queue_wait.observe(job.queue_wait)
        self._metrics.batch_size.observe(sum(j.spec.n for j in batch))
        if first.spec.loras != self._applied:
            if self._applied is not None:
                self._metrics.prep_switches.inc()
            self._applied = first.spec.loras

    # -- running ---------------------------------------------------------

    async def _run_batch(self, batch: list[Job]) -> list[list[Image.Image] | BaseException]:
        """A failing batch of several requests is retried one by one, so that one bad request does not fail
        its neighbours."""
        try:
            return await self._call(batch)
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
            log.warning("batch of %d failed (%s); retrying its requests one by one", len(batch), exc)
        results: list[list[Image.Image] | BaseException] = []
        for job in batch:
            try:
                results.extend(await self._call([job]))
            except Exception as exc:
                results.append(exc)
        return results

    async def _call(self, batch: list[Job]) -> list[list[Image.Image]]:
        loop = asyncio.get_running_loop()

        def should_stop() -> bool:
            return self._stop_running or all(j.cancelled for j in batch)

        def preview(spec_index: int, image_index: int, render) -> None:  # engine thread
            job = batch[spec_index]
            if job.previews is not None and not job.cancelled:
                loop.call_soon_threadsafe(job.previews.put_nowait, (image_index, render))

        def step(done: int, total: int) -> None:  # engine thread: one float written per job
            for job in batch:
                job.progress = done / max(1, total)

        return await self._execute([j.spec for j in batch], Progress(should_stop, preview, step))

    def _finish(self, batch: list[Job], results: list) -> None:
        now = time.monotonic()
        for job, result in zip(batch, results, strict=True):
            job.finished = now
            if isinstance(result, list):
                self._metrics.generation.observe(job.generation_time)
                self._metrics.images.inc(len(result))
                if not job.future.done():
                    job.future.set_result(result)
                continue
            self._metrics.engine_errors.inc()
            if isinstance(result, APIError):
                _fail(job, result)
                continue
            log.error("generation failed: %r", result, exc_info=result)
            _fail(job, APIError(500, ENGINE_FAILED, code="engine_error"))


def _fail(job: Job, error: Exception) -> None:
    if not job.future.done() and not job.cancelled:
        job.future.set_exception(error)
