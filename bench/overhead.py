"""What the server costs over calling the engine yourself: the same request in-process and through HTTP.

The in-process side does what a library user would do to get the same JPEG, with the server's own functions:
the request rules (`ImageService.plan`), `engine.run` (LoRA set, then generation), the plugins' post-processing,
the encode, delivery and the response's b64_json (server/respond.py). The HTTP side is a real server
child process with the same settings and the same torch threads. Calls alternate (in-process first in one pair,
HTTP first in the next) so that a drift in machine load falls on both sides alike; the report is the ratio of the
medians (the issue's target: within 5%) and the median of the per-pair ratios.

Plugins: --plugins nsfw,upload plus their settings with --env (NSFW_MODEL_PATH=...), request fields with
--body '{"nsfw_check": true}', and --loopback-s3 for a moto S3 on loopback whose fresh pre-signed PUT URLs go
into each request's upload_urls. Both sides get the same environment, so they run the same plugins.

    python bench/overhead.py --size 1024x1024 --steps 28 --pairs 20
"""

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

import harness
import httpx
import numpy as np


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--pairs", type=int, default=20, help="in-process/HTTP pairs measured (after one warm-up each)")
    p.add_argument("--threads", type=int, default=harness.cpu_count(), help="torch threads, both sides")
    p.add_argument("--plugins", default="", help="PLUGINS for both sides, e.g. nsfw,upload")
    p.add_argument("--env", action="append", help="KEY=VALUE for both sides (repeatable), e.g. NSFW_MODEL_PATH=...")
    p.add_argument("--body", default="{}", help="extra request fields, JSON, e.g. '{\"nsfw_check\": true}'")
    p.add_argument("--loopback-s3", action="store_true", help="upload each image to a moto S3 on loopback")
    p.add_argument("--out", type=Path, help="folder for overhead.json (default out/overhead/<time>)")
    return p.parse_args(argv)


def configure(args) -> dict[str, str]:
    """One environment for both sides: the server inherits it and from_env reads it in-process."""
    env = {"TORCH_THREADS": str(args.threads), "PLUGINS": args.plugins, **harness.env_pairs(args.env)}
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
        self.plugins = PluginSet(settings, self.engine)
        self.service = ImageService(settings, self.engine, self.plugins, Metrics())
        self.service.load_now()

    def run(self, body: dict) -> dict:
        import asyncio

        from server import respond
        from server.engines.base import Progress
        from server.service import validate

        plan = self.service.plan(validate(self.service.generation_model, body), None, "http://in-process")
        started = time.perf_counter()
        images = self.engine.run([plan.spec], Progress())[0]
        generated = time.perf_counter()
        finished = respond.finish_images(self.plugins, images, plan.spec, plan.output)
        deadline = time.monotonic() + 600
        delivered = asyncio.run(
            self.plugins.deliver(finished.encoded, plan.output.format, plan.spec.options, finished.items, deadline)
        )
        respond.assemble(finished, delivered, plan.output, self.service.store)
        finished_at = time.perf_counter()
        timing = {"total": finished_at - started, "gen": generated - started, "post": finished_at - generated}
        return {**timing, "failed_uploads": failed_uploads(finished.items)}


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
        "guidance_scale": 3.5,
        "seed": 1000 + index,
        "output_format": "jpeg",
        **json.loads(args.body),
    }
    if s3 is not None:
        body["upload_urls"] = [s3.presign(f"overhead/{index}-{i}.jpeg") for i in range(args.n)]
    return body


def measure(args, s3) -> list[dict]:
    in_process = InProcess()
    pairs = []
    with harness.ServerProcess() as server, httpx.Client(timeout=600) as client:
        in_process.run(make_body(args, -1, s3))  # warm-up: first call at this size allocates
        run_http(client, server.url, make_body(args, -2, s3))
        for index in range(args.pairs):
            body = make_body(args, index, s3)
            order = ("in_process", "http") if index % 2 == 0 else ("http", "in_process")
            pair = {}
            for side in order:
                pair[side] = in_process.run(body) if side == "in_process" else run_http(client, server.url, body)
            pair["ratio"] = pair["http"]["total"] / pair["in_process"]["total"]
            pairs.append(pair)
            print(
                f"pair {index + 1}/{args.pairs}: in-process {pair['in_process']['total']:.3f}s "
                f"http {pair['http']['total']:.3f}s ratio {pair['ratio']:.3f}",
                flush=True,
            )
    return pairs


def summarize(pairs: list[dict]) -> dict:
    def median(side: str, part: str) -> float:
        values = [p[side][part] for p in pairs if part in p[side]]
        return float(np.median(values)) if values else 0.0

    in_process, http = median("in_process", "total"), median("http", "total")
    fastest = {side: min(p[side]["total"] for p in pairs) for side in ("in_process", "http")}
    return {
        "pairs": len(pairs),
        "in_process_median_s": in_process,
        "http_median_s": http,
        "ratio_of_medians": http / in_process,
        "median_pair_ratio": float(np.median([p["ratio"] for p in pairs])),
        # On a shared machine the fastest run of each side is the one least disturbed by others.
        "ratio_of_minimums": fastest["http"] / fastest["in_process"],
        "overhead_pct": (http / in_process - 1) * 100,
        "in_process_split_s": {part: median("in_process", part) for part in ("gen", "post")},
        "server_split_s": {part: median("http", part) for part in ("queue", "gen", "post")},
        "failed_uploads": sum(p[side]["failed_uploads"] for p in pairs for side in ("in_process", "http")),
        "target": "ratio_of_medians <= 1.05",
        "meets_target": http / in_process <= 1.05,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.exit_on_sigterm()
    env = configure(args)
    machine = harness.machine()
    print(
        f"overhead: {args.size}, {args.steps} steps, n={args.n}, {args.threads} torch threads, "
        f"load {machine['load_average']}"
    )
    if args.loopback_s3:
        os.environ.setdefault("UPLOAD_ALLOWED_HOSTS", "127.0.0.1:*")
        with harness.LoopbackS3() as s3:
            pairs = measure(args, s3)
    else:
        pairs = measure(args, None)
    summary = summarize(pairs)
    print(
        f"median in-process {summary['in_process_median_s']:.3f}s, HTTP {summary['http_median_s']:.3f}s: "
        f"ratio {summary['ratio_of_medians']:.3f} ({summary['overhead_pct']:+.1f}%), "
        f"median pair ratio {summary['median_pair_ratio']:.3f}, fastest-run ratio {summary['ratio_of_minimums']:.3f}; "
        "target <= 1.05: " + ("met" if summary["meets_target"] else "NOT met")
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
