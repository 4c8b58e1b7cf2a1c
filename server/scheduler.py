"""The scheduler: a bounded queue in front of the one engine worker.

One thread owns the pipeline (diffusers pipelines are not thread-safe); the
event loop only queues, picks batches and hands them over. Post-processing of
a finished batch happens in the request handlers, in another pool, so it
overlaps the next batch's generation.

Picking a batch: the oldest waiting request leads, so incompatible keys are
served first come first served. One exception: a request whose `prep` (the
LoRA set) is already applied may go before an older one that would need a
switch, but an old request is passed over at most `max_bypass` times.
"""

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from server.errors import APIError, unavailable
from server.metrics import Metrics
from server.spec import BatchKey, GenerationSpec

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected before its request finished; nobody is left to answer."""


@dataclass(eq=False)
class Job:
    spec: GenerationSpec
    key: BatchKey
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0
    finished: float = 0.0
    batch_images: int = 0
    bypassed: int = 0
    cancelled: bool = False
    images: list[Image.Image] = field(default_factory=list)

    @property
    def queue_wait(self) -> float:
        return self.started - self.enqueued if self.started else 0.0

    @property
    def generation_time(self) -> float:
        return self.finished - self.started if self.finished else 0.0


# Runs on the engine thread: prepares the pipeline for `prep`, then generates
# each spec's images; `should_stop` turns true when every waiter has left.
GenerateFn = Callable[[list[GenerationSpec], tuple, Callable[[], bool]], list[list[Image.Image]]]


class Scheduler:
    def __init__(
        self,
        generate: GenerateFn,
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
        self._generate = generate
        self._metrics = metrics
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_window = batch_window
        self.max_bypass = max_bypass
        self.timeout = timeout
        self.can_batch = can_batch
        self._expect_company = expect_company
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._applied: tuple | None = None
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self.accepting = True
        self._avg_batch_seconds = 1.0
        self._engine_free_at = 0.0
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._task: asyncio.Task | None = None

    # -- public ----------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="scheduler")

    async def call(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the engine thread (model loading and warm-up belong there too)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn)

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def run(self, spec: GenerationSpec, disconnected: Awaitable | None = None) -> Job:
        """Queue `spec`, wait for its images; raise APIError (429, 503, 504, 500) or ClientGone."""
        job = self._submit(spec)
        watcher = asyncio.ensure_future(disconnected) if disconnected is not None else None
        waiting = {job.future} | ({watcher} if watcher else set())
        try:
            done, _ = await asyncio.wait(waiting, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watcher:
                watcher.cancel()
        if job.future.done():
            job.images = job.future.result()  # raises the job's error, if any
            return job
        job.cancelled = True
        self._wakeup.set()
        if watcher in done:
            raise ClientGone()
        raise APIError(
            504,
            f"The request did not finish within {self.timeout:g} seconds.",
            type="timeout_error",
            code="timeout",
        )

    async def drain(self, timeout: float) -> None:
        """Stop accepting; let queued and running work finish; refuse what is left after `timeout`."""
        self.accepting = False
        self._wakeup.set()
        deadline = time.monotonic() + timeout
        while (self._queue or self._running) and time.monotonic() < deadline:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), min(0.5, max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                pass
        left = [j for j in self._queue if not j.cancelled]
        if left:
            log.warning("drain timeout: refusing %d queued requests", len(left))
        for job in left:
            _fail(job, unavailable("The server is shutting down; retry on another instance.", "shutting_down", 1))
        self._queue.clear()
        self._metrics.queue_depth.set(0)
        self._closing = True
        self._wakeup.set()
        if self._task:
            await self._task
        # never block the loop: a model still loading keeps its thread until it finishes
        self._worker.shutdown(wait=False, cancel_futures=True)

    # -- queueing --------------------------------------------------------

    def _submit(self, spec: GenerationSpec) -> Job:
        if not self.accepting:
            raise unavailable("The server is shutting down; retry on another instance.", "shutting_down", 1)
        waiting = sum(1 for j in self._queue if not j.cancelled)
        if waiting >= self.max_queue:
            raise APIError(
                429,
                f"The server's queue is full ({self.max_queue} requests waiting); retry later.",
                code="queue_full",
                headers={"Retry-After": str(self._retry_after())},
            )
        job = Job(spec, spec.key, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()
        return job

    def _retry_after(self) -> int:
        batches_ahead = math.ceil(len(self._queue) / max(1, self.max_batch))
        return max(1, min(60, math.ceil(batches_ahead * self._avg_batch_seconds)))

    # -- batching --------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            self._running = batch
            started = time.monotonic()
            try:
                results = await loop.run_in_executor(self._worker, self._run_batch, batch)
            except Exception:  # _run_batch answers every job itself; this is a bug guard
                log.exception("scheduler: batch crashed")
                results = [None] * len(batch)
            self._engine_free_at = time.monotonic()
            self._avg_batch_seconds = 0.8 * self._avg_batch_seconds + 0.2 * (self._engine_free_at - started)
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
        if oldest.key.prep == self._applied or oldest.bypassed >= self.max_bypass:
            return oldest
        return next((j for j in self._queue if j.key.prep == self._applied), oldest)

    def _gather(self, head: Job) -> list[Job]:
        if not self.can_batch:
            return [head]
        batch, images = [head], head.spec.n
        for job in self._queue:
            if job is head or job.key != head.key or images + job.spec.n > self.max_batch:
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
        images = sum(j.spec.n for j in batch)
        for job in batch:
            job.started = now
            job.batch_images = images
            self._metrics.queue_wait.observe(job.queue_wait)
        self._metrics.batch_size.observe(images)
        if first.key.prep != self._applied:
            if self._applied is not None:
                self._metrics.prep_switches.inc()
            self._applied = first.key.prep

    # -- the engine thread -----------------------------------------------

    def _run_batch(self, batch: list[Job]) -> list[list[Image.Image] | Exception]:
        """Runs on the engine thread. A failing batch of several requests is retried one by one,
        so that one bad request does not fail its neighbours."""
        try:
            return self._call(batch)
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
            log.warning("batch of %d failed (%s); retrying its requests one by one", len(batch), exc)
        results: list[list[Image.Image] | Exception] = []
        for job in batch:
            try:
                results.extend(self._call([job]))
            except Exception as exc:
                results.append(exc)
        return results

    def _call(self, batch: list[Job]) -> list[list[Image.Image]]:
        def should_stop() -> bool:
            return all(j.cancelled for j in batch)

        return self._generate([j.spec for j in batch], batch[0].key.prep, should_stop)

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
            _fail(job, APIError(500, f"The engine failed to generate the image: {result}", code="engine_error"))


def _fail(job: Job, error: Exception) -> None:
    if not job.future.done() and not job.cancelled:
        job.future.set_exception(error)
