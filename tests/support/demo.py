"""The demo pipeline in this process (built once per run into the shared cache, as the servers use it)."""

import functools
from pathlib import Path

import numpy as np
import torch

from plugins.lora.demo import kohya_lora, peft_lora
from server.engines.demos import demo_model_path
from server.engines.diffusers import load_pipeline
from server.lora import LoRASet
from tests.support.server import CACHE_DIR


@functools.cache
def demo_folder():
    return demo_model_path(CACHE_DIR)


def demo_pipeline(dtype: torch.dtype = torch.float32):
    """A fresh copy each call: tests change weights."""
    pipe = load_pipeline(demo_folder(), dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, steps: int = 2) -> np.ndarray:
    """One 64x64 image, seed 0, as int16 pixels."""
    with torch.inference_mode():
        out = pipe("a fox", height=64, width=64, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    return np.asarray(out.images[0].convert("RGB"), dtype=np.int16)


def write_loras(folder: Path) -> Path:
    """style (PEFT keys), detail (kohya keys), grain (bare keys) for the demo model."""
    folder.mkdir(parents=True, exist_ok=True)
    peft_lora(folder / "style.safetensors", seed=1)
    kohya_lora(folder / "detail.safetensors", seed=2)
    peft_lora(folder / "grain.safetensors", seed=3, prefix="")
    return folder


def lora_sets(folder: Path) -> list[LoRASet]:
    """Sets of 0, 3, 1 and 1 weighted LoRAs, and none again."""
    style, detail, grain = (folder / f"{n}.safetensors" for n in ("style", "detail", "grain"))
    return [(), ((style, 1.0), (detail, 0.7), (grain, 0.5)), ((detail, -0.6),), ((style, 0.4),), ()]


def switch(applier, entries: LoRASet) -> None:
    """What the server does: every file checked (off the engine thread, before the request queues), then the
    set applied (on the engine thread, reading no file)."""
    for path, _ in entries:
        applier.check(path)
    applier.apply(entries)


def slot(pipe, rank: int = 16):
    """How the engine asks the LoRA plugin for the slot: the layers taken before FP8 rewrites them."""
    from plugins.lora.hotswap import HotswapLoRA
    from server.lora import weight_shapes

    shapes = weight_shapes(pipe)
    return lambda: HotswapLoRA(pipe, rank, shapes, torch.bfloat16)
