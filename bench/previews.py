"""What streamed previews cost: the same streamed request with partial_images=3 and with 0, alternating, through a
real server, per preview decoder (PREVIEW_DECODER). The figure is the ratio of the medians of the time to the last
event (the completed image); the target is at most 1.05 for a 1024x1024, 28-step image.

    python bench/previews.py --size 1024x1024 --steps 28 --pairs 8 --decoders vae,linear
"""

import argparse
import sys
import time
from pathlib import Path

import harness
import httpx
import numpy as np


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=harness.size_arg, default="1024x1024", help="WIDTHxHEIGHT, multiples of 16")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--pairs", type=int, default=8, help="pairs of requests measured per decoder (after a warm-up)")
    p.add_argument("--decoders", default="vae,linear", help="PREVIEW_DECODER values, comma-separated")
    p.add_argument("--threads", type=int, default=harness.cpu_count(), help="torch threads")
    p.add_argument("--out", type=Path, help="folder for previews.json (default out/previews/<time>)")
    return p.parse_args(argv)


def streamed(client: httpx.Client, url: str, body: dict) -> tuple[float, int]:
    """Seconds to the last event, and how many partial images came."""
    started, partials = time.perf_counter(), 0
    with client.stream("POST", url + "/v1/images/generations", json=body) as response:
        for line in response.iter_lines():
            partials += line.startswith("event: image_generation.partial_image")
    return time.perf_counter() - started, partials


def measure(args, decoder: str) -> dict:
    env = {"MODEL_PATH": "demo", "PREVIEW_DECODER": decoder, "TORCH_THREADS": str(args.threads), "MAX_BATCH": "1"}
    body = {"prompt": "a lighthouse at dawn", "size": args.size, "num_inference_steps": args.steps, "seed": 1,
            "stream": True}  # fmt: skip
    times: dict[int, list[float]] = {0: [], 3: []}
    with harness.ServerProcess(env) as server, httpx.Client(timeout=600) as client:
        for count in (0, 3):
            streamed(client, server.url, {**body, "partial_images": count})  # warm-up
        for index in range(args.pairs):
            for count in (0, 3) if index % 2 == 0 else (3, 0):
                seconds, partials = streamed(client, server.url, {**body, "partial_images": count})
                assert partials == count, f"asked for {count} previews, got {partials}"
                times[count].append(seconds)
    plain, previews = float(np.median(times[0])), float(np.median(times[3]))
    return {"decoder": decoder, "plain_median_s": plain, "previews_median_s": previews,
            "ratio": previews / plain, "meets_target": previews / plain <= 1.05, "times": times}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.exit_on_sigterm()
    machine = harness.machine()
    rows = [measure(args, decoder) for decoder in args.decoders.split(",")]
    for row in rows:
        print(
            f"{row['decoder']}: {row['plain_median_s']:.3f}s without previews, {row['previews_median_s']:.3f}s with "
            f"3: x{row['ratio']:.3f} (target <= 1.05: {'met' if row['meets_target'] else 'NOT met'})"
        )
    harness.save_rows("previews", args, machine, rows, samples="times")
    return 0


if __name__ == "__main__":
    sys.exit(main())
