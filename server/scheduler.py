"""The scheduler: a bounded queue in front of the one engine, shared fairly between tenants, and the batches it runs.

The event loop only admits, queues, picks batches and hands them to the engine; the engine runs them on its
own thread. Post-processing of a finished batch happens in the request handlers, so it overlaps the next
batch's generation.

Admission comes first: a request takes its place in the queue (or gets 429) before its input images are
decoded, so a full server decodes nothing. A tenant (an API key, or the caller a trusted gateway names) holds at
most `tenant_places` of the queue, places still decoding included, so one tenant's backlog leaves room for others.

Fair shares are weighted fair queuing over what each request costs the engine (images x pixels x steps). Each
tenant has a virtual clock: the cost it has been served, divided by its weight. A tenant that arrives with nothing
queued starts at the virtual time (the least clock of the tenants waiting when the last batch was picked), so time
spent idle banks no credit. The fair order of the queue is each job's virtual start: its tenant's clock plus the
cost of that tenant's jobs ahead of it. This is start-time fair queuing, as Kubernetes' API Priority and Fairness
and VTC do it; unlike deficit round robin it needs no quantum to tune, whatever the costs. It is work-conserving:
the engine never idles while anything waits, so a tenant alone gets the whole engine and two busy tenants of equal
weight get half each.

Picking a batch: the first job in fair order leads, and compatible jobs join it in fair order, whatever their
tenant; each tenant pays for its own jobs. One exception: a request whose LoRA set is already applied may go before
one that would need a switch, but a request is passed over at most `max_bypass` times.
"""

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from PIL import Image

from server.engines.base import Progress
from server.errors import APIError, shutting_down, too_many
from server.lora import LoRASet
from server.metrics import UTILIZATION_WINDOW, Metrics
from server.spec import GenerationSpec

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 120  # seconds; the OpenAI SDK ignores longer hints
# What a caller learns of an engine failure: the exception (its paths, its internals) goes to the log.
ENGINE_FAILED = "The engine failed while generating; the server log has the reason."

# Runs one batch (specs that share a BatchKey) on the engine; one list of images per spec.
Execute = Callable[[list[GenerationSpec], Progress], Awaitable[list[list[Image.Image]]]]


def cost(spec: GenerationSpec) -> float:
    """What a request costs the engine, the unit of fair shares: images x pixels x steps (a video's frames are its
    images)."""
    return float(spec.n * max(1, spec.frames) * spec.width * spec.height * spec.steps)


@dataclass(eq=False)
class Job:
    spec: GenerationSpec
    future: asyncio.Future
    tenant: str
    cost: float
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0
    finished: float = 0.0
    bypassed: int = 0
    cancelled: bool = False
    partial_queue: asyncio.Queue | None = None  # stream=true: (image index, render) as the engine takes them
    progress: float = 0.0  # the fraction of its denoising steps done (written on the engine thread)

    @property
    def queue_wait(self) -> float:
        return self.started - self.enqueued if self.started else 0.0

    @property
    def generation_time(self) -> float:
        return self.finished - self.started if self.finished else 0.0


class Admission:
    """A tenant's place in the queue, held while the request's inputs are decoded; `submit` or `release` ends it."""

    def __init__(self, scheduler: "Scheduler", tenant: str, cost: float) -> None:
        self._scheduler = scheduler
        self.tenant = tenant
        self.cost = cost

    def submit(self, spec: GenerationSpec, partial_queue: asyncio.Queue | None = None) -> Job:
        self.release()
        return self._scheduler._enqueue(spec, self, partial_queue)

    def release(self) -> None:
        self._scheduler._admissions.discard(self)


class FairShares:
    """The tenants' virtual clocks (see the module docstring)."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.weights = weights
        self.clocks: dict[str, float] = {}  # tenants with a job queued, or in the batch last picked
        self.virtual_time = 0.0

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def price(self, job: Job) -> float:
        """What a job moves its tenant's clock: its cost over the tenant's weight."""
        return job.cost / self.weight(job.tenant)

    def arrive(self, tenant: str) -> None:
        """A tenant never starts behind the virtual time: time spent idle banks no credit."""
        self.clocks[tenant] = max(self.clocks.get(tenant, 0.0), self.virtual_time)

    def order(self, queue: list[Job]) -> list[Job]:
        """`queue` (in arrival order) in fair order: by virtual start; ties keep arrival order."""
        clocks = dict(self.clocks)
        starts: dict[Job, float] = {}
        for job in queue:
            starts[job] = clocks.get(job.tenant, self.virtual_time)
            clocks[job.tenant] = starts[job] + self.price(job)
        return sorted(queue, key=starts.__getitem__)

    def charge(self, batch: list[Job], queue: list[Job]) -> None:
        """`batch` is picked from `queue`: the virtual time moves up to the least clock of the waiting tenants,
        each job's tenant pays its cost over its weight, and tenants with nothing queued are forgotten (so the
        clocks stay as few as the queue's tenants; a tenant forgotten owes at most its share of one batch)."""
        waiting = {job.tenant for job in queue}
        least = min((self.clocks.get(t, self.virtual_time) for t in waiting), default=self.virtual_time)
        self.virtual_time = max(self.virtual_time, least)
        self.clocks = {t: clock for t, clock in self.clocks.items() if t in waiting}
        for job in batch:
            self.clocks[job.tenant] = self.clocks.get(job.tenant, self.virtual_time) + self.price(job)


def busy_fraction(spans: list[tuple[float, float]], now: float, window: float) -> float:
    """The share of the `window` seconds before `now` covered by the (start, end) spans, 0 to 1."""
    since = now - window
    busy = sum(max(0.0, min(end, now) - max(start, since)) for start, end in spans)
    return min(1.0, busy / window)


def _seconds(estimate: float) -> int:
    """A Retry-After value: whole seconds, at least 1, at most what the SDK reads."""
    return max(1, min(MAX_RETRY_AFTER, math.ceil(estimate)))


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
        weights: Mapping[str, float] | None = None,
        tenant_share: float = 1.0,
        can_batch: bool = True,
        expect_company: Callable[[], bool] = lambda: True,
        applied: Callable[[], LoRASet | None] = lambda: (),
    ) -> None:
        self._execute = execute
        self._metrics = metrics
        self.max_queue = max_queue
        self.tenant_places = max(1, math.floor(max_queue * tenant_share))  # queue places one tenant may hold
        self.max_batch = max_batch
        self.batch_window = batch_window
        self.max_bypass = max_bypass
        self.can_batch = can_batch
        self._expect_company = expect_company
        self._applied = applied  # the LoRA set in the engine's weights (its applier keeps it)
        self._shares = FairShares(weights or {})
        self._queue: list[Job] = []  # in arrival order
        self._running: list[Job] = []
        self._running_since = 0.0
        self._busy: deque[tuple[float, float]] = deque()  # (start, end) of the batches of the last window
        self._admissions: set[Admission] = set()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._stop_running = False  # drain ran out of time: the running batch stops at its next step
        self.accepting = True
        self.seconds_per_image = 1.0  # recent average, for Retry-After
        self._engine_free_at = 0.0
        self._task: asyncio.Task | None = None
        metrics.utilization.set_function(self.utilization)
        metrics.oldest_wait.set_function(self.oldest_wait)

    # -- public ----------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="scheduler")

    @property
    def depth(self) -> int:
        return len(self._queue)

    def admit(self, tenant: str, cost: float) -> Admission:
        """A place in the queue for `tenant`, or at once 503 (draining) or 429: the queue is full (Retry-After: the
        wait of all of it), or the tenant already holds its share of it (the wait of its own backlog)."""
        if not self.accepting:
            raise shutting_down()
        held = self._places()
        if held.total() >= self.max_queue:
            raise too_many(
                f"The server's queue is full ({self.max_queue} requests waiting); retry later.",
                "queue_full",
                self.retry_after(),
            )
        if held[tenant] >= self.tenant_places:
            raise too_many(
                f"Your requests already hold {held[tenant]} places in the server's queue, your share of it; "
                "retry later.",
                "tenant_queue_full",
                self._tenant_retry_after(tenant),
            )
        admission = Admission(self, tenant, cost)
        self._admissions.add(admission)
        return admission

    def retry_after(self) -> int:
        """The estimated wait: the images queued and running, at the recent seconds per image."""
        images = sum(j.spec.n for j in self._queue) + sum(j.spec.n for j in self._running)
        return _seconds(images * self.seconds_per_image)

    def utilization(self) -> float:
        """The share of the last UTILIZATION_WINDOW seconds the engine spent running batches, 0 to 1."""
        now = time.monotonic()
        spans = [*self._busy, *([(self._running_since, now)] if self._running else [])]
        return busy_fraction(spans, now, UTILIZATION_WINDOW)

    def oldest_wait(self) -> float:
        """Seconds the longest-waiting queued request has waited so far (0 with none)."""
        waiting = [j.enqueued for j in self._queue if not j.cancelled]
        return time.monotonic() - min(waiting) if waiting else 0.0

    async def wait(self, job: Job) -> list[Image.Image]:
        """The job's images, or its error (APIError: 503, 500, 400). Cancelled (its request's deadline passed or
        its client left: see RequestLife), the job is dropped from the queue, or its batch stops when every
        request in it has gone."""
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            self.cancel(job)
            raise

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

    def _enqueue(self, spec: GenerationSpec, admission: Admission, partial_queue: asyncio.Queue | None) -> Job:
        if not self.accepting:
            raise shutting_down()
        future = asyncio.get_running_loop().create_future()
        job = Job(spec, future, admission.tenant, admission.cost, partial_queue=partial_queue)
        self._shares.arrive(job.tenant)
        self._queue.append(job)
        self._metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()
        return job

    def _places(self) -> Counter[str]:
        """Queue places held, by tenant: queued requests and admitted ones still decoding their inputs."""
        queued = [j.tenant for j in self._queue if not j.cancelled]
        return Counter(queued + [a.tenant for a in self._admissions])

    def _tenant_retry_after(self, tenant: str) -> int:
        """The wait of a tenant's own backlog: its queued images at the recent seconds per image, served at its
        share of the engine (its weight among the waiting tenants')."""
        queued = [j for j in self._queue if not j.cancelled]
        images = sum(j.spec.n for j in queued if j.tenant == tenant)
        weights = sum(self._shares.weight(t) for t in {j.tenant for j in queued} | {tenant})
        return _seconds(images * self.seconds_per_image * weights / self._shares.weight(tenant))

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
            self._running, self._running_since = batch, time.monotonic()
            self._metrics.running.set(len(batch))
            results = await self._run_batch(batch)
            self._engine_free_at = time.monotonic()
            self._record_busy(self._running_since, self._engine_free_at)
            images = sum(j.spec.n for j in batch)
            per_image = (self._engine_free_at - self._running_since) / max(1, images)
            self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * per_image
            self._finish(batch, results)
            self._running = []
            self._metrics.running.set(0)
            if not self._queue:
                self._idle.set()

    def _record_busy(self, start: float, end: float) -> None:
        self._busy.append((start, end))
        while self._busy[0][1] < end - UTILIZATION_WINDOW:
            self._busy.popleft()

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
            ordered = self._shares.order(self._queue)
            head = self._pick_head(ordered)
            batch = self._gather(head, ordered)
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
            self._take(batch, ordered)
            return batch

    def _worth_waiting(self, batch: list[Job]) -> bool:
        """Hold a partial batch back for companions only when nothing else is queued (the engine would idle
        with work waiting) and other requests are in flight elsewhere (being post-processed or answered: their
        clients may come right back). A lone client never pays the window."""
        room = self.can_batch and sum(j.spec.n for j in batch) < self.max_batch
        alone_in_queue = len(batch) == len(self._queue)
        return room and alone_in_queue and self.accepting and self._expect_company()

    def _pick_head(self, ordered: list[Job]) -> Job:
        first, applied = ordered[0], self._applied()
        if first.spec.loras == applied or first.bypassed >= self.max_bypass:
            return first
        return next((j for j in ordered if j.spec.loras == applied), first)

    def _gather(self, head: Job, ordered: list[Job]) -> list[Job]:
        if not self.can_batch:
            return [head]
        batch, images = [head], head.spec.n
        for job in ordered:
            if job is head or job.spec.key != head.spec.key or images + job.spec.n > self.max_batch:
                continue
            batch.append(job)
            images += job.spec.n
        return batch

    def _take(self, batch: list[Job], ordered: list[Job]) -> None:
        now = time.monotonic()
        first = batch[0]
        for job in ordered[: ordered.index(first)]:
            if job not in batch:
                job.bypassed += 1
        self._shares.charge(batch, self._queue)
        self._queue = [j for j in self._queue if j not in batch]
        self._metrics.queue_depth.set(len(self._queue))
        for job in batch:
            job.started = now
            self._metrics.queue_wait.observe(job.queue_wait)
        self._metrics.batch_size.observe(sum(j.spec.n for j in batch))
        if first.spec.loras != self._applied():
            self._metrics.prep_switches.inc()

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

        def partial_image(spec_index: int, image_index: int, render) -> None:  # engine thread
            job = batch[spec_index]
            if job.partial_queue is not None and not job.cancelled:
                loop.call_soon_threadsafe(job.partial_queue.put_nowait, (image_index, render))

        def step(done: int, total: int) -> None:  # engine thread: one float written per job
            for job in batch:
                job.progress = done / max(1, total)

        return await self._execute([j.spec for j in batch], Progress(should_stop, partial_image, step))

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
