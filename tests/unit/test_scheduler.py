"""server/scheduler.py on its own event loop, with a fake engine the test releases: no timing involved."""

import asyncio
from pathlib import Path

import pytest

from server.engines.base import Progress
from server.errors import APIError
from server.metrics import Metrics
from server.scheduler import FairShares, Job, Scheduler, busy_fraction, cost
from server.spec import GenerationSpec


class Engine:
    """Each batch waits until the test releases it; records what ran."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.progress: list[Progress] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.applied = ()  # the LoRA set in its weights, as an engine's applier keeps it

    async def execute(self, specs: list[GenerationSpec], progress: Progress):
        self.applied = specs[0].loras
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
    s = Scheduler(engine.execute, Metrics(), applied=lambda: engine.applied, **options)
    s.start()
    return s


def submit(s: Scheduler, item: GenerationSpec, tenant: str = "a"):
    return s.admit(tenant, cost(item)).submit(item)


async def until(predicate) -> None:
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


def run(coro):
    return asyncio.run(coro)


async def release(engine: Engine, batches: int) -> list[str]:
    """Lets `batches` batches run, one after another; the prompts of every batch run so far, in order."""
    for _ in range(batches):
        engine.release.set()
        await until(lambda: not engine.release.is_set())
    return [prompt for batch in engine.batches for prompt in batch]


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
        held = s.admit("a", 1)  # a request decoding its inputs
        with pytest.raises(APIError) as err:
            s.admit("b", 1)
        held.release()
        s.admit("b", 1).release()  # room again
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


def test_the_set_preferred_is_the_one_the_engine_holds_not_the_one_last_picked():
    """One home for which set is applied (the engine's applier): a set that failed to apply (the weights are the
    base model again) is not preferred over requests for the base model."""
    a = ((Path("/l/a"), 1.0),)

    async def main():
        engine = Engine()
        s = scheduler(engine, max_batch=1)
        jobs = [submit(s, spec("first", loras=a))]
        await engine.started.wait()
        engine.applied = ()  # applying `a` failed and was undone
        jobs += [submit(s, spec("a again", loras=a)), submit(s, spec("base"))]
        order = await release(engine, 3)
        await asyncio.gather(*(s.wait(j) for j in jobs))
        return order

    assert run(main()) == ["first", "base", "a again"]


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
            s.admit("a", 1)
        return err.value, refused.value, engine.progress[-1].should_stop()

    stuck, refused, stopped = run(main())
    assert stuck.status == 503 and stuck.code == "shutting_down" and stopped
    assert refused.status == 503


# -- fair shares between tenants ------------------------------------------------------------------------


def test_two_busy_tenants_take_turns_and_a_costlier_request_counts_for_more():
    async def main(a_size: int, b_size: int) -> list[str]:
        engine = Engine()
        s = scheduler(engine, max_batch=1, max_queue=20)
        submit(s, spec("a0", size=a_size), tenant="a")
        await engine.started.wait()
        for i in range(1, 7):
            submit(s, spec(f"a{i}", size=a_size), tenant="a")
        for i in range(7):
            submit(s, spec(f"b{i}", size=b_size), tenant="b")
        return await release(engine, 14)

    # a's backlog arrived first, yet b is served every other batch: equal shares of the engine
    assert run(main(64, 64)) == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4", "a5", "b5", "a6", "b6"]
    # a's requests have 4 times the pixels: while both wait, b gets 4 requests for each of a's
    assert run(main(128, 64)) == ["a0", "b0", "b1", "b2", "b3", "a1", "b4", "b5", "b6", "a2", "a3", "a4", "a5", "a6"]


def test_a_tenant_of_weight_two_gets_two_turns_for_one():
    async def main() -> list[str]:
        engine = Engine()
        s = scheduler(engine, max_batch=1, max_queue=20, weights={"a": 2.0})
        submit(s, spec("a0"), tenant="a")
        await engine.started.wait()
        for i in range(1, 7):
            submit(s, spec(f"a{i}"), tenant="a")
        for i in range(4):
            submit(s, spec(f"b{i}"), tenant="b")
        return await release(engine, 11)

    assert run(main()) == ["a0", "b0", "a1", "a2", "b1", "a3", "a4", "b2", "a5", "a6", "b3"]


def test_a_tenant_alone_gets_every_batch_and_its_idle_neighbour_banks_no_credit():
    async def main() -> list[str]:
        engine = Engine()
        s = scheduler(engine, max_batch=1, max_queue=20, weights={"c": 10.0})  # idle c's weight reserves nothing
        submit(s, spec("a0"), tenant="a")
        await engine.started.wait()
        for i in range(1, 9):
            submit(s, spec(f"a{i}"), tenant="a")
        alone = await release(engine, 4)  # a0..a3 ran; a4 is running
        for i in range(3):
            submit(s, spec(f"b{i}"), tenant="b")
        return alone, await release(engine, 8)

    alone, both = run(main())
    assert alone == ["a0", "a1", "a2", "a3", "a4"]  # every batch a's: the engine never waited with work queued
    # b arrives as a newcomer, not with the credit of the batches a ran alone: it does not take 3 turns in a row
    assert both[5:] == ["b0", "a5", "b1", "a6", "b2", "a7", "a8"]


def test_a_tenant_at_its_share_of_the_queue_gets_429_for_its_own_backlog_while_others_are_admitted():
    async def main():
        engine = Engine()
        s = scheduler(engine, max_queue=4, max_batch=1, tenant_share=0.5)
        submit(s, spec("a0"), tenant="a")
        await engine.started.wait()
        submit(s, spec("a1", n=3), tenant="a")
        submit(s, spec("b1"), tenant="b")
        decoding = s.admit("a", 1)  # a's second place: an edit decoding its inputs counts against a
        s.seconds_per_image = 2.0
        with pytest.raises(APIError) as own:
            s.admit("a", 1)
        s.admit("b", 1)  # b is still admitted: the queue holds 4 of 4 now
        with pytest.raises(APIError) as full:
            s.admit("c", 1)
        decoding.release()
        s.admit("a", 1).release()  # a's place is free again, and so is one of the queue's
        engine.release.set()
        return own.value, full.value

    own, full = run(main())
    assert (own.status, own.code, own.headers["Retry-After"]) == (
        429,
        "tenant_queue_full",
        "12",
    )  # 3 images at 2 s, half the engine
    assert (full.status, full.code, full.headers["Retry-After"]) == (429, "queue_full", "10")  # all 5 images at 2 s


def test_a_batch_mixes_tenants_and_each_pays_for_its_own_requests():
    async def main() -> list[list[str]]:
        engine = Engine()
        s = scheduler(engine, max_batch=4)
        submit(s, spec("c", size=256), tenant="c")
        await engine.started.wait()
        for name, tenant, size in [("a0", "a", 64), ("b0", "b", 64), ("b1", "b", 64), ("b2", "b", 64)]:
            submit(s, spec(name, size=size), tenant=tenant)
        submit(s, spec("b3", size=128), tenant="b")
        submit(s, spec("a1", size=256), tenant="a")
        await release(engine, 4)
        return engine.batches

    # a paid for one image of the shared batch and b for three: a's next request goes before b's older one
    assert run(main()) == [["c"], ["a0", "b0", "b1", "b2"], ["a1"], ["b3"]]


def test_the_applied_lora_set_passes_another_tenant_over_at_most_max_bypass_times():
    a, b = ((Path("/l/a"), 1.0),), ((Path("/l/b"), 1.0),)

    async def main(max_bypass: int) -> list[str]:
        engine = Engine()
        s = scheduler(engine, max_batch=1, max_bypass=max_bypass)
        submit(s, spec("a0", loras=a), tenant="a")
        await engine.started.wait()
        submit(s, spec("b0", loras=b), tenant="b")
        for i in range(1, 5):
            submit(s, spec(f"a{i}", loras=a), tenant="a")
        return await release(engine, 6)

    assert run(main(2)) == ["a0", "a1", "a2", "b0", "a3", "a4"]
    assert run(main(0)) == ["a0", "b0", "a1", "a2", "a3", "a4"]


def test_drain_finishes_every_tenants_queued_work_and_refuses_new_work_from_any():
    async def main():
        engine = Engine()
        s = scheduler(engine, max_batch=1)
        jobs = [submit(s, spec("a0"), tenant="a")]
        await engine.started.wait()
        jobs += [submit(s, spec("a1"), tenant="a"), submit(s, spec("b0"), tenant="b")]
        drained = asyncio.ensure_future(s.drain(timeout=60))
        await until(lambda: not s.accepting)
        refused = []
        for tenant in ("a", "b", "c"):
            with pytest.raises(APIError) as err:
                s.admit(tenant, 1)
            refused.append(err.value.status)
        order = await release(engine, 3)
        await asyncio.gather(*(s.wait(j) for j in jobs))
        await drained
        return order, refused

    order, refused = run(main())
    assert order == ["a0", "b0", "a1"] and refused == [503, 503, 503]


def test_the_clocks_remember_only_the_tenants_with_work_waiting():
    shares = FairShares({})
    for i in range(1000):  # a gateway naming a new caller for every request
        job = Job(spec(f"t{i}"), None, f"t{i}", 1.0)
        shares.arrive(job.tenant)
        shares.charge([job], [job])
    assert list(shares.clocks) == ["t999"]


def test_capacity_gauges_follow_the_queue_and_the_engine():
    async def main():
        engine = Engine()
        metrics = Metrics()
        s = Scheduler(engine.execute, metrics, max_queue=10, max_batch=1, batch_window=0, max_bypass=4)
        s.start()
        value = metrics.registry.get_sample_value
        names = ("image_server_queue_depth", "image_server_running", "image_server_queue_oldest_seconds")
        idle = [value(n) for n in names] + [value("image_server_utilization")]
        running = submit(s, spec("running"))
        await engine.started.wait()
        queued = submit(s, spec("queued"))
        busy = [value(n) for n in names] + [value("image_server_utilization")]
        await release(engine, 2)
        await asyncio.gather(s.wait(running), s.wait(queued))
        after = [value(n) for n in names]
        return idle, busy, after

    idle, busy, after = run(main())
    assert idle == [0, 0, 0, 0]
    assert busy[:2] == [1, 1] and busy[2] > 0 and 0 < busy[3] <= 1
    assert after == [0, 0, 0]


def test_busy_fraction_counts_the_spans_inside_the_window():
    spans = [(0.0, 10.0), (20.0, 25.0), (28.0, 40.0)]  # the last one still running at now=30
    assert busy_fraction(spans, now=30.0, window=30.0) == 17 / 30
    assert busy_fraction(spans, now=30.0, window=10.0) == 7 / 10
    assert busy_fraction([(0.0, 100.0)], now=50.0, window=30.0) == 1.0
    assert busy_fraction([], now=50.0, window=30.0) == 0.0
