"""Open-loop load at a fixed request rate against one server or a balancer URL.

Requests leave on a schedule (constant or Poisson arrivals) whatever the server does, as real clients would:
a closed loop of N clients slows down with the server and hides its queueing. The run is bounded by a count
and/or a duration, then waits at most --grace seconds for the requests still in flight, and stops by itself.

Each request's body comes from a mix file (JSON list, {"requests": [...]}, or JSONL), drawn by weight. An entry
is a request body plus three optional keys of the tool's own: `name`, `weight` (default 1) and `path` (default
/v1/images/generations). Every other field (size, n, num_inference_steps, loras, nsfw_check, upload_urls, ...)
is sent as it is.

The default mix, `auto`, fits where the server runs (its /v1/models says): bench/mix-example.jsonl (mostly
1024x1024 at 28 steps) on a GPU, bench/mix-cpu.jsonl (256-512 pixels, 4-8 steps) on a CPU, where the example's
images take about 20 s each even with the demo model.

Reports latency percentiles, images/s, errors by status (429 and 503 apart), and the server's own split of each
request (queue wait, generation, post-processing) read from its Server-Timing header; writes JSON and, with
matplotlib (the bench extra), a PNG. Progress: tqdm's bar on a terminal, a line every few seconds in a log.

    python bench/pressure.py --url http://127.0.0.1:8000 --rps 2 --duration 60 --mix bench/mix-example.jsonl
"""

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import harness
import httpx

DEFAULT_PATH = "/v1/images/generations"
GPU_MIX = harness.ROOT / "bench" / "mix-example.jsonl"
CPU_MIX = harness.ROOT / "bench" / "mix-cpu.jsonl"


@dataclass
class Entry:
    name: str
    weight: float
    path: str
    body: dict


@dataclass
class Record:
    index: int
    entry: str
    scheduled: float  # seconds after the start, when it was due to leave
    sent: float = 0.0  # when it left (later than scheduled when the client fell behind)
    latency: float = 0.0  # seconds, send to last byte
    status: str = "unfinished"  # HTTP status, or timeout / connect_error / unfinished / client_overload
    images: int = 0
    bytes: int = 0
    timing: dict = field(default_factory=dict)  # Server-Timing, ms
    request_id: str = ""
    error: str = ""


# -- the mix ------------------------------------------------------------------


def load_mix(path: Path) -> list[Entry]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        raw = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        raw = json.loads(text)
        raw = raw["requests"] if isinstance(raw, dict) else raw
    if not raw:
        raise SystemExit(f"{path}: no requests in the mix")
    return [_entry(item, i) for i, item in enumerate(raw)]


def _entry(item: dict, index: int) -> Entry:
    body = dict(item)
    name = str(body.pop("name", f"entry{index}"))
    weight = float(body.pop("weight", 1))
    path = str(body.pop("path", DEFAULT_PATH))
    if weight < 0 or "prompt" not in body:
        raise SystemExit(f"mix entry {name!r}: needs a 'prompt' and a weight >= 0")
    return Entry(name, weight, path, body)


def choose_mix(url: str, api_key: str) -> tuple[Path, str]:
    """The mix for `--mix auto`, and why: the CPU mix when every model the server lists runs on the CPU."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=10)
        devices = {str(model["engine"].get("device", "unknown")) for model in response.json()["data"]}
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return GPU_MIX, "the server's /v1/models did not say where it runs"
    if devices and all(device.startswith("cpu") for device in devices):
        return CPU_MIX, "the server runs on the CPU"
    return GPU_MIX, f"the server runs on {', '.join(sorted(devices)) or 'an unknown device'}"


# -- the schedule -------------------------------------------------------------


def arrival_times(rps: float, count: int | None, duration: float | None, kind: str, rng: random.Random) -> list[float]:
    """Send times in seconds from the start, until `count` requests or `duration` seconds, whichever first."""
    times: list[float] = []
    at = 0.0
    while (count is None or len(times) < count) and (duration is None or at < duration):
        times.append(at)
        at += rng.expovariate(rps) if kind == "poisson" else 1.0 / rps
    return times


# -- sending ------------------------------------------------------------------


async def send(client: httpx.AsyncClient, url: str, entry: Entry, record: Record, start: float, run_id: str) -> None:
    record.sent = time.monotonic() - start
    headers = {"x-request-id": f"{run_id}-{record.index}"}
    try:
        response = await client.post(url + entry.path, json=entry.body, headers=headers)
    except httpx.TimeoutException:
        record.status = "timeout"
    except httpx.ConnectError as exc:
        record.status, record.error = "connect_error", str(exc)[:200]
    except httpx.HTTPError as exc:
        record.status, record.error = type(exc).__name__, str(exc)[:200]
    else:
        record.status = str(response.status_code)
        record.bytes = len(response.content)
        record.timing = harness.parse_server_timing(response.headers.get("server-timing"))
        record.request_id = response.headers.get("x-request-id", "")
        if response.status_code == 200:
            # Counted from the request, not the body: parsing megabytes of base64 here would slow the sender.
            record.images = int(entry.body.get("n") or 1)
        else:
            record.error = _error_message(response)
    record.latency = time.monotonic() - start - record.sent


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


async def run_load(args, entries: list[Entry], times: list[float], rng: random.Random) -> tuple[list[Record], float]:
    """Send on schedule; returns the records and the wall time from the first send to the last answer."""
    picks = rng.choices(entries, weights=[e.weight for e in entries], k=len(times))
    records = [Record(i, e.name, at) for i, (e, at) in enumerate(zip(picks, times, strict=True))]
    run_id = "bench-" + time.strftime("%H%M%S")
    limits = httpx.Limits(max_connections=args.max_in_flight, max_keepalive_connections=args.max_in_flight)
    timeout = httpx.Timeout(args.timeout, connect=10)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    progress = _progress(len(times), args.no_progress, args.progress_every)
    pending: set[asyncio.Task] = set()

    def done(task: asyncio.Task) -> None:
        pending.discard(task)
        progress.update(1)

    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        start = time.monotonic()
        for entry, record in zip(picks, records, strict=True):
            delay = start + record.scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(pending) >= args.max_in_flight:  # the client's own bound: never an unbounded pile of sockets
                record.status = "client_overload"
                progress.update(1)
                continue
            task = asyncio.create_task(send(client, args.url.rstrip("/"), entry, record, start, run_id))
            pending.add(task)
            task.add_done_callback(done)
        if pending:
            await asyncio.wait(set(pending), timeout=args.grace)
        for task in list(pending):  # still running after the grace period: given up, left "unfinished"
            task.cancel()
        wall = time.monotonic() - start
    progress.close()
    return records, wall


def _progress(total: int, disabled: bool, every: float):
    """tqdm's bar where stderr is a terminal; in a log (CI, `> run.log 2>&1`) a bar that redraws itself in place
    is noise, so a line every `every` seconds instead."""
    if not disabled and not sys.stderr.isatty():
        return LineProgress(total, every)
    from tqdm import tqdm

    return tqdm(total=total, unit="req", disable=disabled, file=sys.stderr, dynamic_ncols=True)


class LineProgress:
    """Progress for logs: `progress: 12/60 requests done after 25s` on stderr every few seconds. Created inside the
    event loop, which runs its reporting task until close()."""

    def __init__(self, total: int, every: float) -> None:
        self.total = total
        self.done = 0
        self.every = every
        self.started = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._report())

    def update(self, n: int = 1) -> None:
        self.done += n

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            self.report()

    def report(self) -> None:
        elapsed = time.monotonic() - self.started
        print(f"progress: {self.done}/{self.total} requests done after {elapsed:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._task.cancel()


# -- the report ---------------------------------------------------------------


def summarize(records: list[Record], wall: float, args) -> dict:
    ok = [r for r in records if r.status == "200"]
    ends = [r.sent + r.latency for r in records if r.status not in ("unfinished", "client_overload")]
    span = max(ends) if ends else wall  # first send (t=0) to the last answer
    by_status: dict[str, int] = {}
    for r in records:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    images = sum(r.images for r in ok)
    sent = [r for r in records if r.status != "client_overload"]
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "by_status": dict(sorted(by_status.items())),
        "rejected_429": by_status.get("429", 0),
        "unavailable_503": by_status.get("503", 0),
        "images": images,
        "wall_s": span,
        "images_per_s": images / span if span > 0 else 0.0,
        "ok_per_s": len(ok) / span if span > 0 else 0.0,
        "offered_rps": args.rps,
        "sent_rps": _rate([r.sent for r in sent]),
        "send_lag_s": harness.stats([max(0.0, r.sent - r.scheduled) for r in sent]),
        "latency_s": harness.stats([r.latency for r in ok]),
        "server_ms": {part: harness.stats([r.timing[part] for r in ok if part in r.timing]) for part in _PARTS},
        "outside_server_ms": harness.stats([r.latency * 1000 - sum(r.timing.values()) for r in ok if r.timing]),
        "by_entry": _by_entry(records),
    }


_PARTS = ("queue", "gen", "post")


def _rate(times: list[float]) -> float:
    """Events per second between the first and the last one."""
    return (len(times) - 1) / (max(times) - min(times)) if len(times) > 1 and max(times) > min(times) else 0.0


def _by_entry(records: list[Record]) -> dict:
    out = {}
    for name in sorted({r.entry for r in records}):
        mine = [r for r in records if r.entry == name]
        ok = [r.latency for r in mine if r.status == "200"]
        out[name] = {"requests": len(mine), "ok": len(ok), "latency_s": harness.stats(ok)}
    return out


def print_summary(s: dict) -> None:
    lat = s["latency_s"]
    print(f"requests {s['requests']}  ok {s['ok']}  errors {s['errors']}  by status {s['by_status']}")
    print(f"429 (queue full) {s['rejected_429']}  503 (unavailable) {s['unavailable_503']}")
    print(f"images {s['images']} in {s['wall_s']:.1f}s = {s['images_per_s']:.2f} images/s")
    if lat["count"]:
        print(f"latency s: p50 {lat['p50']:.3f}  p95 {lat['p95']:.3f}  p99 {lat['p99']:.3f}  max {lat['max']:.3f}")
        split = "  ".join(f"{p} {s['server_ms'][p].get('p50', 0):.1f}" for p in _PARTS)
        print(f"server split, median ms: {split}  outside the server {s['outside_server_ms'].get('p50', 0):.1f}")
    lag = s["send_lag_s"]
    if lag["count"] and lag["max"] > 0.1:
        print(f"warning: the client sent up to {lag['max']:.2f}s late; it, not the server, limited the rate")


def plot(records: list[Record], summary: dict, title: str, path: Path) -> bool:
    """The PNG; False when matplotlib (the bench extra) is not installed: the JSON holds every figure anyway."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.status == "200"]
    failed = [r for r in records if r.status not in ("200", "unfinished")]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 11))
    top.scatter([r.sent for r in ok], [r.latency for r in ok], s=8, label="200")
    for status in sorted({r.status for r in failed}):
        mine = [r for r in failed if r.status == status]
        top.scatter([r.sent for r in mine], [r.latency for r in mine], s=14, marker="x", label=status)
    top.set(xlabel="sent at (s)", ylabel="latency (s)", title=title)
    top.legend(loc="upper left", fontsize="small")
    for part in _PARTS:
        middle.scatter([r.sent for r in ok], [r.timing.get(part, 0) / 1000 for r in ok], s=6, label=part)
    middle.set(xlabel="sent at (s)", ylabel="server time (s)", title="Server-Timing: queue wait, generation, post")
    middle.legend(loc="upper left", fontsize="small")
    bottom.hist([r.latency for r in ok], bins=40)
    lat = summary["latency_s"]
    for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        if q in lat:
            bottom.axvline(lat[q], color="k", linestyle=style, label=f"{q} {lat[q]:.2f}s")
    bottom.set(xlabel="latency (s)", ylabel="requests", title="latency of successful requests")
    if ok:
        bottom.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# -- main -----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server or the balancer in front of servers")
    p.add_argument("--rps", type=float, required=True, help="requests per second offered")
    p.add_argument("--duration", type=float, help="seconds of sending (default 60 when --count is not given)")
    p.add_argument("--count", type=int, help="requests to send at most")
    p.add_argument("--arrivals", choices=("poisson", "constant"), default="poisson")
    p.add_argument(
        "--mix",
        default="auto",
        help="JSON or JSONL file, or auto: bench/mix-cpu.jsonl when the server runs on the CPU, else mix-example.jsonl",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the arrivals and the mix draw")
    p.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    p.add_argument("--grace", type=float, default=120, help="seconds to wait for requests in flight at the end")
    p.add_argument("--max-in-flight", type=int, default=1000, help="the client's own bound on open requests")
    p.add_argument("--api-key", default="", help="sent as a Bearer token")
    p.add_argument("--out", type=Path, help="folder for pressure.json and pressure.png (default out/pressure/<time>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    p.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines in a log")
    args = p.parse_args(argv)
    if args.rps <= 0:
        p.error("--rps must be positive")
    if args.count is None and args.duration is None:
        args.duration = 60.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mix == "auto":
        args.mix, why = choose_mix(args.url, args.api_key)
        print(f"mix: {args.mix.relative_to(harness.ROOT)} ({why}; --mix or MIX=... chooses another)")
    args.mix = Path(args.mix)
    entries = load_mix(args.mix)
    rng = random.Random(args.seed)
    times = arrival_times(args.rps, args.count, args.duration, args.arrivals, rng)
    out = args.out or harness.default_out("pressure")
    machine = harness.machine()  # before the run: its load average says how quiet the machine was
    print(f"{len(times)} requests at {args.rps:g}/s ({args.arrivals}) to {args.url}; load {machine['load_average']}")
    records, wall = asyncio.run(run_load(args, entries, times, rng))
    summary = summarize(records, wall, args)
    print_summary(summary)
    config = harness.config(args, leave_out=("api_key",))
    report = {
        "config": config,
        "mix": [asdict(e) for e in entries],
        "machine": machine,
        "load_average_after": harness.load_average(),
        "summary": summary,
        "records": [asdict(r) for r in records],
    }
    harness.write_json(out / "pressure.json", report)
    title = f"{args.rps:g} req/s {args.arrivals}, {len(times)} requests, {args.mix.name} -> {args.url}"
    if plot(records, summary, title, out / "pressure.png"):
        print(f"wrote {out / 'pressure.json'} and {out / 'pressure.png'}")
    else:
        print(f"wrote {out / 'pressure.json'}; no plot: matplotlib is not installed (scripts/setup.sh installs it,")
        print("or pip install -e '.[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
