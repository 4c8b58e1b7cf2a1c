"""What a LoRA set switch costs, on its own: the merged-weights applier and the hot-swapped slot, on a transformer
of FLUX.1's width (24 heads of 128, T5's 4096-wide context) with as many blocks as asked (FLUX.1 has 19 double
and 38 single), in bf16, on the GPU when there is one.

Three random LoRAs of every linear layer of the blocks (ranks 16, 16 and 32, PEFT keys) are switched in a cycle
[a:1 + b:0.7] -> [c:0.5] -> [] -> ..., the way alternating LoRA traffic switches; every switch is timed (the
device synchronised), the first cycle (base copies taken, caches filled) left out. The targets (issue 14): at most
100 ms per switch merged, at most 50 ms on the slot, for the full model on an H100/H200.

    python bench/lora_switch.py                          # CPU: 1 double + 2 single blocks
    python bench/lora_switch.py --double 19 --single 38  # the full model (GPU)
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file

from plugins.lora.hotswap import HotswapLoRA
from plugins.lora.merge import LoRAMerger
from server.hooks import LoRAApplier
from server.lora import weight_shapes

TARGET_MS = {"merged": 100.0, "slot": 50.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1: 19)")
    p.add_argument("--single", type=int, default=2, help="single-stream blocks (FLUX.1: 38)")
    p.add_argument("--heads", type=int, default=24, help="attention heads of 128 (FLUX.1: 24; fewer for a smoke run)")
    p.add_argument("--cycles", type=int, default=5, help="cycles of three switches timed, after one untimed")
    p.add_argument("--slot-rank", type=int, default=64, help="LORA_HOTSWAP_RANK")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="folder for lora_switch.json (default out/lora_switch/<time>)")
    return p.parse_args(argv)


def flux_pipe(args) -> FluxPipeline:
    """The transformer only, uninitialised (what a switch costs does not depend on the values)."""
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            num_layers=args.double,
            num_single_layers=args.single,
            num_attention_heads=args.heads,
            guidance_embeds=True,
            pooled_projection_dim=768,
        )
    transformer = transformer.to(torch.bfloat16).to_empty(device=args.device).requires_grad_(False)
    return FluxPipeline(FlowMatchEulerDiscreteScheduler(), None, None, None, None, None, transformer)


def write_lora(path: Path, pipe: FluxPipeline, rank: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in pipe.transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and "transformer_blocks." in name:
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.01
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.01
    save_file(state, str(path))
    return path


def timed_switches(applier: LoRAApplier, sets: list, cycles: int, device: str) -> list[float]:
    for path in {path for entries in sets for path, _ in entries}:
        applier.check(path)  # what a request's plan does before it queues: a switch reads no file
    times = []
    for cycle in range(cycles + 1):
        for entries in sets:
            started = time.perf_counter()
            applier.apply(entries)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if cycle:
                times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = harness.machine()
    pipe = flux_pipe(args)
    shapes = weight_shapes(pipe)
    with tempfile.TemporaryDirectory() as folder:
        a, b, c = (
            write_lora(Path(folder) / f"{n}.safetensors", pipe, r, s)
            for n, r, s in [("a", 16, 1), ("b", 16, 2), ("c", 32, 3)]
        )
        sets = [((a, 1.0), (b, 0.7)), ((c, 0.5),), ()]
        merged = timed_switches(LoRAMerger(pipe, shapes), sets, args.cycles, args.device)
        slot = HotswapLoRA(pipe, args.slot_rank, shapes, torch.bfloat16)
        slot.install()
        swapped = timed_switches(slot, sets, args.cycles, args.device)
    rows = []
    for path, times in (("merged", merged), ("slot", swapped)):
        ms = float(np.median(times)) * 1000
        rows.append({"path": path, "median_ms": ms, "max_ms": max(times) * 1000, "target_ms": TARGET_MS[path],
                     "switches": len(times), "times_s": times})  # fmt: skip
        print(f"{path}: {ms:.1f} ms per switch (median of {len(times)}; target {TARGET_MS[path]:g} ms, full model)")
    harness.save_rows("lora_switch", args, machine, rows, samples="times_s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
