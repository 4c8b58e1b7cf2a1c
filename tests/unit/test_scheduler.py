"""server/scheduler.py on its own event loop, with a fake engine the test releases: no timing involved."""

import asyncio
from pathlib import Path

import pytest

from server.engines.base import Progress
from server.errors import APIError
from server.metrics import Metrics
from server.scheduler import Scheduler
from server.spec import GenerationSpec


class Engine:
    """Each batch waits until the test releases it; records what ran."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.progress: list[Progress] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def execute(self, specs: list[GenerationSpec], progress: Progress):
        self.batches.append([s.prompt for s in specs])
        self.progress.append(progress)
        self.started.set()
        while not self.release.is_set() and not progress.should_stop():
            await asyncio.sleep(0)
        self.release.clear()
        return [[None] * s.n for s in specs]


def spec(prompt: str, n: int = 1, size: int = 64, loras=()) -> GenerationSpec:
    return GenerationSpec(prompt, n, size, size, 4, 0.0, list(range(n)), loras=loras)


def scheduler(engine: Engine, **kwargs) -> Scheduler:
    options = {"max_queue": 10, "max_batch": 4, "batch_window": 0, "max_bypass": 4} | kwargs
    s = Scheduler(engine.execute, Metrics(), **options)
    s.start()
    return s


def submit(s: Scheduler, item: GenerationSpec):
    return s.admit().submit(item)


async def until(predicate) -> None:
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


def run(coro):
    return asyncio.run(coro)


def test_compatible_requests_share_a_batch_and_others_wait_their_turn():
    async def main():
        engine = Engine()
        s = scheduler(engine)
        first = submit(s, spec("a", size=64))
        await engine.started.wait()
        others = [submit(s, spec(p, size=size)) for p, size in (("b", 64), ("c", 128), ("d", 64))]
        engine.release.set()
        await until(lambda: len(engine.batches) == 2)
        engine.release.set()
        await until(lambda: len(engine.batches) == 3)
        engine.release.set()
        await asyncio.gather(*(s.wait(j) for j in [first, *others]))
        return engine.batches

    assert run(main()) == [["a"], ["b", "d"], ["c"]]


def test_a_full_queue_is_a_429_with_the_wait_it_holds_and_a_reservation_counts():
    async def main():
        engine = Engine()
        s = scheduler(engine, max_queue=2, max_batch=1)
        submit(s, spec("running", n=3))
        await engine.started.wait()
        submit(s, spec("queued", n=2))
        s.seconds_per_image = 4.0
        held = s.admit()  # a request decoding its inputs
        with pytest.raises(APIError) as err:
            s.admit()
        held.release()
        s.admit().release()  # room again
        engine.release.set()
        return err.value

    error = run(main())
    assert error.status == 429 and error.headers["Retry-After"] == "20"  # 5 images at 4 s


def test_retry_after_is_capped_where_the_sdk_still_reads_it():
    async def main():
        s = scheduler(Engine(), max_queue=100)
        for _ in range(50):
            submit(s, spec("x", n=10))
        s.seconds_per_image = 30.0
        return s.retry_after()

    assert run(main()) == 120


def test_the_applied_lora_set_goes_first_but_not_forever():
    a, b = ((Path("/l/a"), 1.0),), ((Path("/l/b"), 1.0),)

    async def main(max_bypass: int):
        engine = Engine()
        s = scheduler(engine, max_batch=1, max_bypass=max_bypass)
        jobs = [submit(s, spec("first", loras=a))]
        await engine.started.wait()
        jobs += [submit(s, spec(f"{i}", loras=(b if i % 2 else a))) for i in range(1, 7)]
        for _ in range(7):
            engine.release.set()
            await until(lambda: not engine.release.is_set())
        await asyncio.gather(*(s.wait(j) for j in jobs))
        return [batch[0] for batch in engine.batches]

    assert run(main(4)) == ["first", "2", "4", "6", "1", "3", "5"]
    assert run(main(1)) == ["first", "2", "1", "3", "5", "4", "6"]  # "1" and "4" wait once each


def test_a_request_cancelled_before_its_turn_is_dropped_and_one_cancelled_mid_batch_stops_it():
    async def main():
        engine = Engine()
        s = scheduler(engine, max_batch=1)
        running = submit(s, spec("running"))
        await engine.started.wait()
        queued = submit(s, spec("queued"))
        for job in (queued, running):  # as RequestLife cancels a request whose client left or deadline passed
            waiting = asyncio.ensure_future(s.wait(job))
            await asyncio.sleep(0)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        await until(lambda: engine.progress[0].should_stop())
        await asyncio.sleep(0)
        return engine.batches

    assert run(main()) == [["running"]]


def test_drain_finishes_queued_work_and_past_its_time_stops_the_batch_and_answers_503():
    async def main():
        engine = Engine()
        s = scheduler(engine, max_batch=1)
        done = submit(s, spec("done"))
        await engine.started.wait()
        stuck = submit(s, spec("stuck"))
        drained = asyncio.ensure_future(s.drain(timeout=0.05))
        engine.release.set()  # "done" finishes; "stuck" then runs until the drain gives up on it
        await s.wait(done)
        with pytest.raises(APIError) as err:
            await s.wait(stuck)
        await drained
        with pytest.raises(APIError) as refused:
            s.admit()
        return err.value, refused.value, engine.progress[-1].should_stop()

    stuck, refused, stopped = run(main())
    assert stuck.status == 503 and stuck.code == "shutting_down" and stopped
    assert refused.status == 503
