"""Fair shares between API keys, through real server processes of the demo model: key A floods (32 clients back to
back), key B sends one request every 2 s. B gets no 429 and is served about as fast as alone; A, with B idle, gets
the whole server (full batches, the engine never waiting).

Timing by nature: bench/fairness.py measures (its docstring says how each figure is kept fair on a shared CPU:
A's throughput on each server in turn, in mirrored order; B's latency alone while A floods the other server), and
this test holds the figures to issue 20's targets. The machine's noise can still spoil one latency measurement, so
a miss is measured once more; a scheduler that serves B behind A's backlog misses both times.
"""

import asyncio

import pytest

from tests.support.server import ServerProcess
from tests.support.tools import bench_tool

fairness = bench_tool("fairness")
# 64x64 at 4 steps, MAX_QUEUE 48: A's share is 24 places, so some of its 32 clients meet 429s, and a scheduler that
# served B behind A's backlog would keep it waiting 12 batches. MAX_BATCH 2, not 4: on this CPU a batch of 4 takes
# about 1.5 times one image (2 takes about as long as 1), and B's own request shares its batch with A's, so with 4
# the target (twice B's latency alone, plus the batch running when B arrives) is about B's expected p95 itself,
# with nothing left for the machine's noise; on a GPU, where a batch costs little more than one image, it is not.
ARGS = fairness.parse_args(["--threads", "1", "--light-requests", "8", "--window", "6", "--max-batch", "2"])
ATTEMPTS = 2


@pytest.fixture(scope="module")
def servers():
    """`shared` knows A's and B's keys; `alone` knows A's only. Started together."""
    procs = [
        ServerProcess(fairness.server_env(ARGS, keys)) for keys in ([fairness.KEY_A, fairness.KEY_B], [fairness.KEY_A])
    ]
    for proc in procs:
        proc.start(wait=False)
    try:
        for proc in procs:
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs:
            proc.signal()  # both drain at once
        for proc in procs:
            proc.stop()


def test_a_light_key_under_a_flood_gets_no_429_and_about_its_latency_alone(servers):
    shared, alone = servers
    for _ in range(ATTEMPTS):
        b_alone = asyncio.run(fairness.light_while_flooded(shared.url, alone.url, ARGS))
        b_flood = asyncio.run(fairness.light_while_flooded(shared.url, shared.url, ARGS))
        bound = fairness.p95_bound(b_alone, b_flood)
        report = f"B alone {b_alone}\nB flooded {b_flood}\nbound {bound:.3f}s"
        assert b_flood["statuses"] == {"200": ARGS.light_requests}, report  # never a 429, whatever the timing
        assert b_flood["flooder_statuses"].get("429", 0) > 0, report  # A did reach its share of the queue
        if b_flood["latency_s"]["p95"] <= bound:
            return
    pytest.fail(f"B's p95 under the flood is past twice its median alone plus one batch:\n{report}")


def test_the_flooder_alone_gets_the_whole_server(servers):
    """With B idle, A's flood keeps the engine running full batches. Measured on the one server against its own
    engine: A's images/s against the server without B's key, as the issue first put it, differ by as much as two
    servers configured alike do on a shared 2-vCPU machine (up to 15%; a CI run missed 10% twice), so the bench
    reports that figure and this test holds the mechanism: a scheduler that held batch places back for B would run
    smaller batches, one that waited for B would leave the engine idle."""
    shared, _ = servers
    engine = asyncio.run(fairness.engine_while_flooded(shared.url, ARGS))
    report = f"A's flood with B idle: {engine}"
    assert engine["batch"] >= 0.95 * ARGS.max_batch, report  # one batch of skew between the scraped series
    assert engine["busy"] >= 0.9, report
