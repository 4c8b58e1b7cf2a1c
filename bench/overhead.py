"""What the server costs over calling the engine yourself: the same request as a raw pipeline call, in-process
and through HTTP.

The in-process side does what a library user would do to get the same JPEG, with the server's own functions:
the request rules (`ImageService.plan`), `engine.run` (LoRA set, then generation), the plugins' post-processing,
the encode, delivery and the response's b64_json (server/respond.py). The HTTP side is a real server
child process with the same settings and the same torch threads. The sides take turns (the order rotates from
one round to the next) so that a drift in machine load falls on all alike. The verdict is on the median of
the per-pair ratios (the target: within 5%), with its 95% interval: "met" when the whole interval is at or under
1.05, "NOT met" when it is all above, and "inconclusive" when the pairs spread too widely to tell (a busy machine:
rerun when it is quieter, or with more --pairs). The ratio of the medians and the spread are reported too.
Arguments are checked before anything loads.

The raw side is the family's diffusers pipeline called with the arguments the engine passes it (PIL images out,
nothing else); each round also reports HTTP against it. --model demo:FAMILY measures a family's tiny model
(`demo` is FLUX.1's), with the family's own default guidance.

Plugins: --plugins nsfw,upload plus their settings with --env (NSFW_MODEL_PATH=...), request fields with
--body '{"nsfw_check": true}', and --loopback-s3 for a moto S3 on loopback whose fresh pre-signed PUT URLs go
into each request's upload_urls. Both sides get the same environment, so they run the same plugins.

    python bench/overhead.py --size 1024x1024 --steps 28 --pairs 20
"""

import argparse
import base64
import math
import os
import sys
import time
from pathlib import Path

import harness
import httpx
import numpy as np


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="MODEL_PATH for both sides: demo:FAMILY or a model folder")
    p.add_argument("--size", type=harness.size_arg, default="1024x1024", help="WIDTHxHEIGHT, multiples of 16")
    p.add_argument("--steps", type=harness.at_least(1), default=28, help="inference steps per image")
    p.add_argument("--n", type=int, default=1, choices=range(1, 11), metavar="1..10", help="images per request")
    p.add_argument(
        "--pairs", type=harness.at_least(1), default=20, help="in-process/HTTP pairs measured (after one warm-up "
        f"each); a verdict needs at least {MIN_PAIRS}"
    )  # fmt: skip
    p.add_argument("--threads", type=harness.at_least(1), default=harness.cpu_count(), help="torch threads, both sides")
    p.add_argument("--plugins", default="", help="PLUGINS for both sides, e.g. nsfw,upload")
    p.add_argument("--env", action="append", help="KEY=VALUE for both sides (repeatable), e.g. NSFW_MODEL_PATH=...")
    p.add_argument(
        "--body", type=harness.json_object, default={}, help="extra request fields, JSON, e.g. '{\"nsfw_check\": true}'"
    )
    p.add_argument("--loopback-s3", action="store_true", help="upload each image to a moto S3 on loopback")
    p.add_argument("--out", type=Path, help="folder for overhead.json (default out/overhead/<time>)")
    return p.parse_args(argv)


def configure(args) -> dict[str, str]:
    """One environment for both sides: the server inherits it and from_env reads it in-process."""
    env = {"MODEL_PATH": args.model, "TORCH_THREADS": str(args.threads), "PLUGINS": args.plugins}
    env.update(harness.env_pairs(args.env))
    os.environ.update(env)
    return env


# -- the in-process side ------------------------------------------------------------


class InProcess:
    """The engine, the plugins and the service's own rules and response assembly, in this process, minus HTTP
    and the queue: the same functions the server calls (server/service.py `plan`, server/respond.py)."""

    def __init__(self) -> None:
        import torch

        from server.config import from_env
        from server.engines.diffusers import DiffusersEngine
        from server.metrics import Metrics
        from server.plugins import PluginSet
        from server.service import ImageService

        settings = from_env()
        torch.set_num_threads(int(os.environ["TORCH_THREADS"]))
        self.engine = DiffusersEngine(settings)
        self.plugins = PluginSet(settings)
        self.service = ImageService(settings, self.engine, self.plugins, Metrics())
        self.service.load_now()

    def raw(self, body: dict) -> dict:
        """The family's pipeline called with the engine's arguments for this request, and nothing else."""
        from server.engines.diffusers import Row
        from server.service import validate

        spec = self.service.plan(validate(self.service.generation_model, body), "text2img", "http://in-process").spec
        arguments = self.engine.arguments(spec.mode, [Row(0, j, spec, seed) for j, seed in enumerate(spec.seeds)])
        started = time.perf_counter()
        self.engine.pipelines[spec.mode](**arguments)
        return {"total": time.perf_counter() - started, "failed_uploads": 0}

    def run(self, body: dict) -> dict:
        import asyncio

        from server import respond
        from server.engines.base import Progress
        from server.service import validate

        plan = self.service.plan(validate(self.service.generation_model, body), "text2img", "http://in-process")
        started = time.perf_counter()
        images = self.engine.run([plan.spec], Progress())[0]
        generated = time.perf_counter()
        finished = respond.finish_images(plan.plugins, images, plan.spec, plan.output)
        deadline = time.monotonic() + 600
        deliveries = asyncio.run(plan.plugins.deliver(finished.encoded, plan.output.format, deadline))
        answer = respond.response(respond.with_deliveries(finished, deliveries), plan.output, self.service.store)
        finished_at = time.perf_counter()
        timing = {"total": finished_at - started, "gen": generated - started, "post": finished_at - generated}
        return {**timing, "failed_uploads": failed_uploads(answer.model_dump(exclude_unset=True)["data"])}


# -- the HTTP side ---------------------------------------------------------------


def run_http(client: httpx.Client, url: str, body: dict) -> dict:
    started = time.perf_counter()
    response = client.post(url + "/v1/images/generations", json=body)
    payload = response.json()  # part of the end-to-end cost: the client has the images only after this
    total = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"the server answered {response.status_code}: {payload}")
    for item in payload["data"]:
        if "b64_json" in item:
            base64.b64decode(item["b64_json"])
    timing = {k: v / 1000 for k, v in harness.parse_server_timing(response.headers.get("server-timing")).items()}
    return {"total": total, **timing, "failed_uploads": failed_uploads(payload["data"])}


def failed_uploads(items: list[dict]) -> int:
    """Images the upload plugin did not deliver: a run that measured failures measured the wrong thing."""
    return sum(1 for item in items if "upload" in item and item["upload"].get("status") != "uploaded")


# -- the run -------------------------------------------------------------------------


def make_body(args, index: int, s3) -> dict:
    body = {
        "prompt": "a lighthouse at dawn, oil painting",
        "size": args.size,
        "n": args.n,
        "num_inference_steps": args.steps,
        "seed": 1000 + index,
        "output_format": "jpeg",
        **args.body,
    }
    if s3 is not None:
        body["upload_urls"] = [s3.presign(f"overhead/{index}-{i}.jpeg") for i in range(args.n)]
    return body


SIDES = ("raw", "in_process", "http")


def measure(args, s3) -> list[dict]:
    in_process = InProcess()
    pairs = []
    with harness.ServerProcess() as server, httpx.Client(timeout=600) as client:
        runs = {"raw": in_process.raw, "in_process": in_process.run, "http": lambda b: run_http(client, server.url, b)}
        for side in SIDES:  # warm-up: the first call at this size allocates
            runs[side](make_body(args, -1, s3))
        for index in range(args.pairs):
            body = make_body(args, index, s3)
            pair = {side: runs[side](body) for side in SIDES[index % 3 :] + SIDES[: index % 3]}
            pair["ratio"] = pair["http"]["total"] / pair["in_process"]["total"]
            pair["raw_ratio"] = pair["http"]["total"] / pair["raw"]["total"]
            pairs.append(pair)
            print(
                f"round {index + 1}/{args.pairs}: raw {pair['raw']['total']:.3f}s in-process "
                f"{pair['in_process']['total']:.3f}s http {pair['http']['total']:.3f}s ratio {pair['ratio']:.3f} "
                f"(raw {pair['raw_ratio']:.3f})",
                flush=True,
            )
    return pairs


TARGET = 1.05
MIN_PAIRS = 6  # the fewest whose median has a 95% interval (below)


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A confidence interval of the median that assumes no distribution: the k-th smallest and k-th largest values,
    k as large as the binomial tails allow (n=20: the 6th and the 15th). None when there are too few values."""
    n, alpha = len(values), 1 - confidence
    k, below = 0, 1 / 2**n  # below: the chance that fewer than k + 1 values fall under the median
    while 2 * below <= alpha:
        k += 1
        below += math.comb(n, k) / 2**n
    ordered = sorted(values)
    return (ordered[k - 1], ordered[n - k]) if k else None


def verdict(interval: tuple[float, float] | None) -> str:
    if interval is None:
        return f"inconclusive: too few pairs for a 95% interval (at least {MIN_PAIRS})"
    low, high = interval
    if high <= TARGET:
        return "met"
    if low > TARGET:
        return "NOT met"
    return (
        f"inconclusive: the median pair ratio's 95% interval ({low:.3f} to {high:.3f}) straddles {TARGET}; "
        "the machine was too noisy to tell: rerun when it is quieter, or with more --pairs"
    )


def summarize(pairs: list[dict]) -> dict:
    def median(side: str, part: str) -> float:
        values = [p[side][part] for p in pairs if part in p[side]]
        return float(np.median(values)) if values else 0.0

    raw, in_process, http = median("raw", "total"), median("in_process", "total"), median("http", "total")
    fastest = {side: min(p[side]["total"] for p in pairs) for side in SIDES}
    ratios = [p["ratio"] for p in pairs]
    interval = median_interval(ratios)
    return {
        "pairs": len(pairs),
        "raw_median_s": raw,
        "in_process_median_s": in_process,
        "http_median_s": http,
        "ratio_of_medians": http / in_process,
        "raw_ratio_of_medians": http / raw,
        "median_pair_ratio": float(np.median(ratios)),
        "pair_ratio_range": [min(ratios), max(ratios)],
        "median_pair_ratio_ci95": list(interval) if interval else None,
        "median_raw_pair_ratio": float(np.median([p["raw_ratio"] for p in pairs])),
        # On a shared machine the fastest run of each side is the one least disturbed by others.
        "ratio_of_minimums": fastest["http"] / fastest["in_process"],
        "overhead_pct": (http / in_process - 1) * 100,
        "in_process_split_s": {part: median("in_process", part) for part in ("gen", "post")},
        "server_split_s": {part: median("http", part) for part in ("queue", "gen", "post")},
        "failed_uploads": sum(p[side]["failed_uploads"] for p in pairs for side in ("in_process", "http")),
        "target": f"median pair ratio <= {TARGET}, its whole 95% interval",
        "verdict": verdict(interval),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.exit_on_sigterm()
    env = configure(args)
    machine = harness.machine()
    print(
        f"overhead: {args.model}, {args.size}, {args.steps} steps, n={args.n}, {args.threads} torch threads, "
        f"load {machine['load_average']}"
    )
    if args.loopback_s3:
        os.environ.setdefault("UPLOAD_ALLOWED_HOSTS", "127.0.0.1:*")
        with harness.LoopbackS3() as s3:
            pairs = measure(args, s3)
    else:
        pairs = measure(args, None)
    summary = summarize(pairs)
    low, high = summary["pair_ratio_range"]
    print(
        f"median raw pipeline {summary['raw_median_s']:.3f}s, in-process {summary['in_process_median_s']:.3f}s, "
        f"HTTP {summary['http_median_s']:.3f}s: HTTP/raw {summary['raw_ratio_of_medians']:.3f}, HTTP/in-process "
        f"{summary['ratio_of_medians']:.3f} ({summary['overhead_pct']:+.1f}%), fastest-run ratio "
        f"{summary['ratio_of_minimums']:.3f}; pair ratios {low:.3f} to {high:.3f}, median "
        f"{summary['median_pair_ratio']:.3f}; target <= {TARGET}: {summary['verdict']}"
    )
    if summary["failed_uploads"]:
        print(f"warning: {summary['failed_uploads']} uploads failed; see the pairs in the JSON")
    out = args.out or harness.default_out("overhead")
    config = harness.config(args)
    harness.write_json(
        out / "overhead.json",
        {
            "config": config,
            "env": env,
            "machine": machine,
            "load_average_after": harness.load_average(),
            "summary": summary,
            "pairs": pairs,
        },
    )
    print(f"wrote {out / 'overhead.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
