"""A light tenant's latency while another tenant floods the server, and the flooder's throughput when alone.

Two servers: `shared` knows two API keys, the flooder's (A) and the light tenant's (B); `alone` knows A's only.
Measured, in this order:

  a_*_images_s    A's images/s with --clients concurrent clients back to back (a 429 waits its Retry-After, as
                  the OpenAI SDK does), on shared with B idle and on alone, flooded in turn (shared, alone, alone,
                  shared) so that a drift of the machine's other load weighs on both alike
  a_shared_engine the same flood on shared, seen by its engine: the mean batch and the share of the window the
                  engine was running batches (its generation histogram). Two servers configured alike differ by up
                  to 15% in images/s on a shared 2-vCPU machine; one server's engine against itself does not
  b_alone         B's latency on shared, one request every --interval seconds, while A floods the other server:
                  B has its server to itself, but the machine is as busy as under the flood (on a CPU the flood's
                  HTTP work slows generation too; on a GPU it would not)
  b_flood         the same while A floods shared; B's and A's statuses, the server's split of B's latency, and
                  the mean time of the batches that ran meanwhile (the server's generation histogram)

The targets (tests/e2e/test_fairness.py asserts them): B gets no 429; B's p95 under the flood is within twice its
median alone plus one batch; A alone on shared gets the whole server: full batches, and the engine running them
for at least 90% of the window (A's images/s within 10% of what the engine makes).

    python bench/fairness.py --size 64x64 --steps 4
"""

import argparse
import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import harness
import httpx

KEY_A, KEY_B = "bench-flooder-key", "bench-light-key"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="64x64")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-queue", type=int, default=48, help="the flooder's share (half of it) must be below --clients")
    p.add_argument("--clients", type=int, default=32, help="the flooder's concurrent clients")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between the light tenant's requests")
    p.add_argument("--light-requests", type=int, default=12, help="the light tenant's requests, alone and flooded")
    p.add_argument("--window", type=float, default=8.0, help="seconds over which A's images/s are counted")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of flood before anything is counted")
    p.add_argument("--threads", type=int, default=harness.cpu_count(), help="torch threads of each server")
    p.add_argument("--env", action="append", help="KEY=VALUE for both servers (repeatable)")
    p.add_argument("--out", type=Path, help="folder for fairness.json (default out/fairness/<time>)")
    return p.parse_args(argv)


def server_env(args, keys: list[str]) -> dict[str, str]:
    """The settings of a server of this measurement that knows `keys`."""
    return {
        "API_KEY": ",".join(keys),
        "MAX_BATCH": str(args.max_batch),
        "MAX_QUEUE": str(args.max_queue),
        "TORCH_THREADS": str(args.threads),
        **harness.env_pairs(args.env),
    }


async def post(client: httpx.AsyncClient, key: str, args) -> httpx.Response:
    body = {"prompt": "a lighthouse at dawn", "size": args.size, "num_inference_steps": args.steps}
    return await client.post("/v1/images/generations", json=body, headers={"authorization": f"Bearer {key}"})


async def flood_client(client: httpx.AsyncClient, args, statuses: Counter, stop: asyncio.Event) -> None:
    """One of A's clients: requests back to back until `stop`; after a 429 it waits the Retry-After."""
    while not stop.is_set():
        response = await post(client, KEY_A, args)
        statuses[response.status_code] += 1
        if response.status_code == 429:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), float(response.headers["retry-after"]))


@contextlib.asynccontextmanager
async def flooding(url: str, args) -> AsyncIterator[Counter]:
    """A floods `url` while the block runs; yields A's statuses so far. Afterwards, until the server is idle."""
    statuses: Counter = Counter()
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        tasks = [asyncio.create_task(flood_client(client, args, statuses, stop)) for _ in range(args.clients)]
        try:
            yield statuses
        finally:
            stop.set()
            for task in tasks:
                task.cancel()  # requests still waiting are dropped by the server when their clients leave
            await asyncio.gather(*tasks, return_exceptions=True)
        while harness.scrape(url, "image_server_in_flight") > 0:
            await asyncio.sleep(0.1)


async def images_per_second(urls: list[str], args) -> list[float]:
    """A's images/s on each server, flooded one at a time in mirrored order (1 2 2 1): a drift of the machine's other
    load over the run weighs on every server alike, and no server shares the CPU with another's flood. Each server
    gets two windows of half --window."""
    counted = dict.fromkeys(urls, 0)
    for url in urls + urls[::-1]:
        async with flooding(url, args) as statuses:
            await asyncio.sleep(args.warmup)
            before = statuses[200]
            await asyncio.sleep(args.window / 2)
            counted[url] += statuses[200] - before
    return [counted[url] / args.window for url in urls]


async def light(url: str, args, count: int, interval: float) -> tuple[list[float], Counter, list[dict]]:
    """B's `count` requests, one every `interval` seconds (or right after the last one was answered): their
    latencies, statuses, and the server's split of each (Server-Timing: queue, gen, post, in ms)."""
    latencies, statuses, splits = [], Counter(), []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        start = time.monotonic()
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i * interval - time.monotonic()))
            sent = time.monotonic()
            response = await post(client, KEY_B, args)
            statuses[response.status_code] += 1
            if response.status_code == 200:
                latencies.append(time.monotonic() - sent)
                splits.append(harness.parse_server_timing(response.headers.get("server-timing")))
    return latencies, statuses, splits


async def engine_while_flooded(url: str, args) -> dict:
    """While A floods `url` (after --warmup), over --window: A's images/s, the mean batch, and the share of the
    window the engine spent running batches. Each request of a batch observes the batch's time, so the engine's
    busy time is the generation histogram's sum divided by the mean batch."""
    names = ("batch_size_sum", "batch_size_count", "generation_seconds_sum")
    async with flooding(url, args):
        await asyncio.sleep(args.warmup)
        start, before = time.monotonic(), [harness.scrape(url, f"image_server_{name}") for name in names]
        await asyncio.sleep(args.window)
        seconds, after = time.monotonic() - start, [harness.scrape(url, f"image_server_{name}") for name in names]
    images, batches, generating = (a - b for a, b in zip(after, before, strict=True))
    batch = images / max(1.0, batches)
    return {"images_s": images / seconds, "batch": batch, "busy": generating / batch / seconds if images else 0.0}


def batch_seconds(url: str) -> tuple[float, float]:
    """The server's total of its requests' generation times (each its batch's time), and their count."""
    return tuple(harness.scrape(url, f"image_server_generation_seconds_{part}") for part in ("sum", "count"))


async def light_while_flooded(shared: str, flooded: str, args) -> dict:
    """B's requests on `shared`, one every --interval seconds, while A floods `flooded`; and the mean time of the
    batches `shared` ran meanwhile."""
    async with flooding(flooded, args) as a_statuses:
        await asyncio.sleep(args.warmup)
        before = batch_seconds(shared)
        latencies, statuses, splits = await light(shared, args, args.light_requests, args.interval)
        after = batch_seconds(shared)
    return {
        "latency_s": harness.stats(latencies),
        "server_ms": {part: harness.stats([t[part] for t in splits]) for part in ("queue", "gen", "post")},
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "flooder_statuses": {str(k): v for k, v in sorted(a_statuses.items())},
        "batch_s": (after[0] - before[0]) / max(1.0, after[1] - before[1]),
        "samples": latencies,
    }


async def measure(shared: str, alone: str, args) -> dict:
    """The figures of the module docstring, from a server that knows A and B (`shared`) and one that knows A."""
    await light(shared, args, 2, 0)  # warm-up
    a_shared, a_alone = await images_per_second([shared, alone], args)
    a_shared_engine = await engine_while_flooded(shared, args)
    b_alone = await light_while_flooded(shared, alone, args)
    b_flood = await light_while_flooded(shared, shared, args)
    return {
        "a_shared_images_s": a_shared,
        "a_alone_images_s": a_alone,
        "a_shared_engine": a_shared_engine,
        "b_alone": b_alone,
        "b_flood": b_flood,
        "b_flood_p95_bound_s": p95_bound(b_alone, b_flood),
    }


def p95_bound(alone: dict, flood: dict) -> float:
    """The light tenant's target under the flood: twice its median alone, plus one batch."""
    return 2 * alone["latency_s"]["p50"] + flood["batch_s"]


def summary(figures: dict) -> str:
    alone, flood, bound = figures["b_alone"], figures["b_flood"], figures["b_flood_p95_bound_s"]
    engine = figures["a_shared_engine"]
    return (
        f"B p50/p95 alone {alone['latency_s']['p50']:.3f}/{alone['latency_s']['p95']:.3f}s, under A's flood "
        f"{flood['latency_s']['p50']:.3f}/{flood['latency_s']['p95']:.3f}s (bound {bound:.3f}s, "
        f"one batch {flood['batch_s']:.3f}s); B's statuses {flood['statuses']}, A's {flood['flooder_statuses']}; "
        f"A images/s with B idle {figures['a_shared_images_s']:.2f}, "
        f"without B's key {figures['a_alone_images_s']:.2f}; with B idle, batches of {engine['batch']:.2f}, "
        f"engine busy {engine['busy']:.0%} of the window"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.exit_on_sigterm()
    with (
        harness.ServerProcess(server_env(args, [KEY_A, KEY_B])) as shared,
        harness.ServerProcess(server_env(args, [KEY_A])) as alone,
    ):
        figures = asyncio.run(measure(shared.url, alone.url, args))
    harness.save_rows("fairness", args, harness.machine(), [figures], "samples")
    print(summary(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
