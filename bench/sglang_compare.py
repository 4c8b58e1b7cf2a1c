"""SGLang's diffusion server next to ours, on the same model and machine: images/s and latency of
(a) image-server on its in-process diffusers engine, (b) `sglang serve` called directly, and (c) image-server
fronting that same SGLang child (ENGINE=sglang), at a few closed-loop client counts.

(b) and (c) share one SGLang child: image-server starts it on a fixed loopback port, and the direct runs call that
port, interleaved with the runs through image-server. Never run it beside another benchmark: SGLang's worker
competes for the CPU even with --sleep-on-idle.

    python bench/sglang_compare.py --size 256x256 --steps 28 --requests 24 --clients 1,4
"""

import argparse
import asyncio
import sys
from pathlib import Path

import harness
import httpx
from throughput import closed_loop


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=harness.size_arg, default="256x256", help="WIDTHxHEIGHT, multiples of 16")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--requests", type=int, default=24, help="requests per measurement")
    parser.add_argument("--clients", default="1,4", help="closed-loop client counts")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each measurement; the median is reported")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def bodies(args, extra: dict) -> list[dict]:
    return [
        {
            "prompt": f"a lighthouse, variant {i}",
            "size": args.size,
            "n": 1,
            "seed": i,
            "num_inference_steps": args.steps,
            "output_format": "jpeg",
            **extra,
        }
        for i in range(args.requests)
    ]


def measure(url: str, requests: list[dict], clients: int) -> dict:
    result = asyncio.run(closed_loop(url, requests, clients))
    if result["errors"]:
        raise SystemExit(f"{result['errors']} requests to {url} failed")
    return result


def median(runs: list[dict]) -> dict:
    ranked = sorted(runs, key=lambda r: r["images_per_s"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["runs_images_per_s"] = [round(r["images_per_s"], 3) for r in runs]
    return chosen


def run_diffusers(args, levels: list[int]) -> dict:
    with harness.ServerProcess({"MODEL_PATH": "demo"}) as server:
        measure(server.url, bodies(args, {})[: max(levels)], max(levels))  # warm-up
        return {c: median([measure(server.url, bodies(args, {}), c) for _ in range(args.repeat)]) for c in levels}


def run_sglang(args, levels: list[int]) -> tuple[dict, dict, str]:
    sglang_port = harness.free_port()
    env = {"MODEL_PATH": "demo", "ENGINE": "sglang", "SGLANG_PORT": str(sglang_port)}
    direct_url = f"http://127.0.0.1:{sglang_port}"
    direct_extra = {"response_format": "b64_json"}  # SGLang's own default is a URL to a file it writes
    with harness.ServerProcess(env, ready_timeout=900) as server:
        version = httpx.get(server.url + "/v1/models").json()["data"][0]["engine"].get("sglang_version", "")
        measure(direct_url, bodies(args, direct_extra)[: max(levels)], max(levels))  # warm-up, both paths
        measure(server.url, bodies(args, {})[: max(levels)], max(levels))
        direct, fronted = {}, {}
        for c in levels:
            runs_direct, runs_fronted = [], []
            for _ in range(args.repeat):  # interleaved, so both see the same machine
                runs_direct.append(measure(direct_url, bodies(args, direct_extra), c))
                runs_fronted.append(measure(server.url, bodies(args, {}), c))
            direct[c], fronted[c] = median(runs_direct), median(runs_fronted)
    return direct, fronted, version


def main(argv: list[str] | None = None) -> int:
    harness.exit_on_sigterm()
    args = parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    out = args.out or harness.default_out("sglang_compare")
    load_before = harness.load_average()
    ours = run_diffusers(args, levels)
    direct, fronted, version = run_sglang(args, levels)
    rows = [
        {
            "clients": c,
            "image-server (diffusers) img/s": round(ours[c]["images_per_s"], 3),
            "sglang direct img/s": round(direct[c]["images_per_s"], 3),
            "image-server -> sglang img/s": round(fronted[c]["images_per_s"], 3),
            "p50 diffusers / direct / fronted (s)": " / ".join(
                f"{r[c]['latency_s']['p50']:.3f}" for r in (ours, direct, fronted)
            ),
        }
        for c in levels
    ]
    result = {
        "tool": "sglang_compare",
        "args": {k: str(v) for k, v in vars(args).items()},
        "sglang_version": version,
        "machine": harness.machine(),
        "load_before": load_before,
        "load_after": harness.load_average(),
        "diffusers": ours,
        "sglang_direct": direct,
        "sglang_fronted": fronted,
        "rows": rows,
    }
    harness.write_json(out / "sglang_compare.json", result)
    print(harness.table(rows, list(rows[0])))
    print(f"written to {out / 'sglang_compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
