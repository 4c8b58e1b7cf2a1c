"""Images per second: a serial in-process loop, a concurrency sweep with batching off and on, and LoRA traffic.

Modes (--modes, comma-separated, all by default):
  serial  the baseline: one request after another through the engine in this process (generate + JPEG encode)
  sweep   closed-loop clients (--concurrency, default 1,2,4,8,16) against a server with MAX_BATCH=1 (batching
          off) and MAX_BATCH=--max-batch (on); images/s, latency and the mean batch size from /metrics
  lora    clients whose requests alternate between LoRA sets, against a server with set-aware scheduling
          (MAX_BYPASS at its default) and with plain arrival order (MAX_BYPASS=0); counts pipeline
          re-preparations from image_server_prep_switches_total. Skipped, saying why, without the lora plugin.

Every server and the serial loop use the same torch threads (--threads). Settings for the servers and the
in-process engine go through --env KEY=VALUE (e.g. BATCH_WINDOW_MS=20), extra request fields through --body.

    python bench/throughput.py --size 512x512 --steps 28
"""

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import harness
import httpx

LORA_TARGET = re.compile(r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)\.weight$")
DEFAULT_LORA_SETS = [[{"name": "bench_a", "weight": 0.8}], [{"name": "bench_b", "weight": 0.8}]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="serial,sweep,lora", help="any of serial,sweep,lora")
    p.add_argument("--size", type=harness.size_arg, default="512x512", help="WIDTHxHEIGHT, multiples of 16")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--concurrency", default="1,2,4,8,16", help="client counts of the sweep")
    p.add_argument("--requests", type=int, default=48, help="requests per measurement (at least 3 per client)")
    p.add_argument("--max-batch", type=int, default=4, help="MAX_BATCH when batching is on")
    p.add_argument("--repeat", type=int, default=1, help="runs of each measurement; the median run is reported")
    p.add_argument("--threads", type=int, default=harness.cpu_count(), help="torch threads, everywhere")
    p.add_argument("--env", action="append", help="KEY=VALUE for the servers and the engine (repeatable)")
    p.add_argument("--body", type=harness.json_object, default={}, help="extra request fields, JSON")
    p.add_argument("--lora-dir", type=Path, help="LoRA files (default: two random LoRAs made for the demo model)")
    p.add_argument("--lora-sets", default=json.dumps(DEFAULT_LORA_SETS), help="JSON list of `loras` values")
    p.add_argument("--lora-clients", type=int, default=16, help="concurrent clients of the LoRA mode")
    p.add_argument("--lora-requests", type=int, default=64, help="requests of the LoRA mode, alternating sets")
    p.add_argument(
        "--write-demo-loras",
        type=Path,
        metavar="DIR",
        help="only write the demo LoRAs of --lora-sets into DIR (a LORA_DIR for bench/mix-plugins.jsonl), then exit",
    )
    p.add_argument("--out", type=Path, help="folder for throughput.json (default out/throughput/<time>)")
    return p.parse_args(argv)


def request_body(args, index: int, extra: dict | None = None) -> dict:
    return {
        "prompt": f"a lighthouse at dawn, study {index % 7}",
        "size": args.size,
        "num_inference_steps": args.steps,
        "guidance_scale": 3.5,
        "seed": index,
        **args.body,
        **(extra or {}),
    }


# -- serial in-process baseline -----------------------------------------------------


def serial(args) -> dict:
    import torch

    from server.config import from_env, parse_size
    from server.engines.base import NoHooks, Progress
    from server.engines.diffusers import DiffusersEngine
    from server.images import encode_image
    from server.spec import GenerationSpec

    torch.set_num_threads(args.threads)
    engine = DiffusersEngine(from_env())
    engine.load(NoHooks())
    width, height = parse_size(args.size)

    def one(index: int) -> float:
        body = request_body(args, index)
        spec = GenerationSpec(body["prompt"], 1, width, height, args.steps, 3.5, [index])
        started = time.perf_counter()
        image = engine.generate([spec], Progress())[0][0]
        generated = time.perf_counter()
        encode_image(image, "jpeg", 65)
        return generated - started

    def loop() -> dict:
        started = time.perf_counter()
        gen = [one(i) for i in range(args.requests)]
        wall = time.perf_counter() - started
        result = {"images": args.requests, "wall_s": wall, "images_per_s": args.requests / wall}
        return {**result, "generate_only_images_per_s": args.requests / sum(gen)}

    one(-1)  # warm-up: the first call at a size allocates
    result = median_run([loop() for _ in range(args.repeat)])
    print(f"serial in-process: {result['images_per_s']:.2f} images/s ({args.requests} in {result['wall_s']:.1f}s)")
    return result


def median_run(runs: list[dict]) -> dict:
    """The run of median images/s, with every run's figure and the best (the least disturbed on a shared machine)."""
    ranked = sorted(runs, key=lambda r: r["images_per_s"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["runs_images_per_s"] = [r["images_per_s"] for r in runs]
    chosen["best_images_per_s"] = ranked[-1]["images_per_s"]
    return chosen


# -- closed-loop clients against a server -------------------------------------------


async def closed_loop(url: str, bodies: list[dict], clients: int) -> dict:
    """`clients` workers, each sending its next request as soon as its last one is answered."""
    queue = list(enumerate(bodies))
    results: list[tuple[int, float, int]] = []  # status, latency, images
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            _, body = queue.pop(0)
            started = time.perf_counter()
            try:
                response = await client.post(url + "/v1/images/generations", json=body)
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            images = int(body.get("n") or 1) if status == 200 else 0
            results.append((status, time.perf_counter() - started, images))

    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - started
    images = sum(r[2] for r in results)
    errors = sum(1 for r in results if r[0] != 200)
    latency = harness.stats([r[1] for r in results if r[0] == 200])
    return {"images": images, "errors": errors, "wall_s": wall, "images_per_s": images / wall, "latency_s": latency}


def measure_level(server: harness.ServerProcess, bodies: list[dict], clients: int) -> dict:
    batches, batched = server.metric("image_server_batch_size_count"), server.metric("image_server_batch_size_sum")
    switches = server.metric("image_server_prep_switches_total")
    result = asyncio.run(closed_loop(server.url, bodies, clients))
    calls = server.metric("image_server_batch_size_count") - batches
    result["mean_batch"] = (server.metric("image_server_batch_size_sum") - batched) / calls if calls else 0.0
    result["pipeline_calls"] = calls
    result["switches"] = server.metric("image_server_prep_switches_total") - switches
    result["clients"] = clients
    return result


def warm_up(server: harness.ServerProcess, args, clients: int) -> None:
    """One burst at the measured size, so that no measurement pays for first-call allocations."""
    asyncio.run(closed_loop(server.url, [request_body(args, i) for i in range(clients)], clients))


def sweep(args) -> list[dict]:
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    for label, max_batch in (("off", 1), ("on", args.max_batch)):
        env = {"MAX_BATCH": str(max_batch), "MAX_QUEUE": str(max(100, 2 * max(levels)))}
        with harness.ServerProcess(env) as server:
            warm_up(server, args, max(args.max_batch, 2))
            for clients in levels:
                count = max(args.requests, 3 * clients)
                bodies = [request_body(args, i) for i in range(count)]
                row = median_run([measure_level(server, bodies, clients) for _ in range(args.repeat)])
                row.update(batching=label, max_batch=max_batch)
                rows.append(row)
                print(
                    f"batching {label:3} clients {clients:2}: {row['images_per_s']:.2f} images/s, "
                    f"p50 {row['latency_s'].get('p50', 0):.2f}s, mean batch {row['mean_batch']:.2f}, "
                    f"errors {row['errors']}",
                    flush=True,
                )
    return rows


# -- LoRA traffic ---------------------------------------------------------------------


def lora_unavailable() -> str:
    from server.plugins import discover

    if "lora" not in discover():
        return "the lora plugin is not installed (no 'lora' in the image_server.plugins entry points)"
    return ""


def make_demo_loras(folder: Path, names: list[str], rank: int = 4) -> None:
    """Random LoRAs on the demo transformer's attention projections, in the diffusers/PEFT key format."""
    import torch
    from safetensors.torch import load_file, save_file

    from server.config import from_env
    from server.engines.demos import demo_model_path

    weights = load_file(demo_model_path(from_env().cache_dir) / "transformer" / "diffusion_pytorch_model.safetensors")
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        generator = torch.Generator().manual_seed(seed)
        lora = {}
        for key, weight in weights.items():
            if LORA_TARGET.search(key):
                module = "transformer." + key.removesuffix(".weight")
                lora[module + ".lora_A.weight"] = torch.randn(rank, weight.shape[1], generator=generator) * 0.5
                lora[module + ".lora_B.weight"] = torch.randn(weight.shape[0], rank, generator=generator) * 0.5
        save_file(lora, folder / f"{name}.safetensors")


def lora(args) -> dict:
    reason = lora_unavailable()
    if reason:
        print(f"lora: skipped: {reason}.", flush=True)
        return {"skipped": reason}
    sets = json.loads(args.lora_sets)
    folder = args.lora_dir
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="bench-loras-"))
        make_demo_loras(folder, sorted({item["name"] for s in sets for item in s}))
    plugins = ",".join(dict.fromkeys([*filter(None, os.environ.get("PLUGINS", "").split(",")), "lora"]))
    bodies = [request_body(args, i, {"loras": sets[i % len(sets)]}) for i in range(args.lora_requests)]
    rows = {}
    for label, bypass in (("set-aware", None), ("arrival order", "0")):
        env = {"PLUGINS": plugins, "LORA_DIR": str(folder), "MAX_QUEUE": str(max(100, 2 * args.lora_clients))}
        if bypass is not None:
            env["MAX_BYPASS"] = bypass
        with harness.ServerProcess(env) as server:
            asyncio.run(closed_loop(server.url, bodies[: len(sets)], 1))  # warm-up: load every set once
            row = measure_level(server, bodies, args.lora_clients)
        rows[label] = row
        print(
            f"lora {label:13}: {row['switches']:.0f} switches for {len(bodies)} requests, "
            f"{row['images_per_s']:.2f} images/s, p95 {row['latency_s'].get('p95', 0):.2f}s",
            flush=True,
        )
    fifo = rows["arrival order"]["switches"]
    ratio = rows["set-aware"]["switches"] / fifo if fifo else 0.0
    return {
        "sets": sets,
        "requests": len(bodies),
        "rows": rows,
        "switch_ratio": ratio,
        "target": "switch_ratio <= 0.25",
        "meets_target": ratio <= 0.25,
    }


# -- main ---------------------------------------------------------------------------


def verdicts(result: dict) -> dict:
    """The issue's targets, from what this run measured."""
    out = {}
    sweep_rows = result.get("sweep") or []
    baseline = (result.get("serial") or {}).get("images_per_s")
    at_most = {
        r["batching"]: r["images_per_s"] for r in sweep_rows if r["clients"] == max(r["clients"] for r in sweep_rows)
    }
    if baseline and at_most:
        out["most_clients_no_lower_than_serial"] = {k: v >= baseline for k, v in at_most.items()}
        if "on" in at_most and "off" in at_most:
            out["batching_higher_than_serial"] = at_most["on"] > baseline
    if "switch_ratio" in (result.get("lora") or {}):
        out["set_aware_switches_at_most_a_quarter"] = result["lora"]["meets_target"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.exit_on_sigterm()
    if args.write_demo_loras:
        names = sorted({item["name"] for s in json.loads(args.lora_sets) for item in s})
        make_demo_loras(args.write_demo_loras, names)
        print(f"wrote {', '.join(names)} to {args.write_demo_loras}")
        return 0
    modes = {m.strip() for m in args.modes.split(",") if m.strip()}
    unknown = modes - {"serial", "sweep", "lora"}
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; use serial, sweep, lora")
    env = {"TORCH_THREADS": str(args.threads), **harness.env_pairs(args.env)}
    os.environ.update(env)  # the servers inherit it; from_env reads it in-process
    machine = harness.machine()
    print(f"throughput: {args.size}, {args.steps} steps, {args.threads} torch threads, load {machine['load_average']}")
    result: dict = {}
    if "serial" in modes:
        result["serial"] = serial(args)
    if "sweep" in modes:
        result["sweep"] = sweep(args)
    if "lora" in modes:
        result["lora"] = lora(args)
    result["verdicts"] = verdicts(result)
    print(f"targets: {result['verdicts']}")
    out = args.out or harness.default_out("throughput")
    config = harness.config(args)
    harness.write_json(
        out / "throughput.json",
        {"config": config, "env": env, "machine": machine, "load_average_after": harness.load_average(), **result},
    )
    print(f"wrote {out / 'throughput.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
