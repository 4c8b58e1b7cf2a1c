"""LoRA files for the demo model: the good ones people ship (from plugins/lora/demo.py) and broken ones."""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from plugins.lora.demo import INNER, kohya_lora, peft_lora  # noqa: F401  (re-exported for the tests)

_Q = "transformer.transformer_blocks.0.attn.to_q"


def _pair(g: torch.Generator, out_f: int, in_f: int, rank: int, scale: float = 1.0):
    return torch.randn(rank, in_f, generator=g) * scale, torch.randn(out_f, rank, generator=g) * scale


def foreign_lora(path: Path) -> Path:
    """Keys of some other model: nothing in it matches a layer of FLUX."""
    g = torch.Generator().manual_seed(0)
    down, up = _pair(g, 8, 8, 2)
    save_file(
        {"unet.down_blocks.0.attn1.to_q.lora_A.weight": down, "unet.down_blocks.0.attn1.to_q.lora_B.weight": up},
        str(path),
    )
    return path


def wrong_shape_lora(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    down, up = _pair(g, 16, 16, 2)
    save_file({f"{_Q}.lora_A.weight": down, f"{_Q}.lora_B.weight": up}, str(path))
    return path


def half_broken_lora(path: Path, broken: str = "rank") -> Path:
    """A valid LoRA on the first layers whose last layer is broken: what must never be merged half-way.

    broken: "rank" (A and B disagree), "bias" (a bias of the wrong length), "nan" (a non-finite value)."""
    peft_lora(path, seed=7)
    state = dict(_load(path))
    last = "transformer.single_transformer_blocks.0.attn.to_v"
    g = torch.Generator().manual_seed(8)
    if broken == "rank":
        state[f"{last}.lora_A.weight"] = torch.randn(3, INNER, generator=g)
        state[f"{last}.lora_B.weight"] = torch.randn(INNER, 5, generator=g)
    elif broken == "bias":
        state[f"{last}.lora_B.bias"] = torch.randn(INNER + 1, generator=g)
    elif broken == "nan":
        state[f"{last}.lora_A.weight"][0, 0] = float("nan")
    save_file(state, str(path))
    return path


def odd_lora(path: Path, kind: str) -> Path:
    """Files that parse as safetensors but not as a LoRA this server can apply."""
    g = torch.Generator().manual_seed(0)
    down, up = _pair(g, INNER, INNER, 2)
    state = {f"{_Q}.lora_A.weight": down, f"{_Q}.lora_B.weight": up}
    metadata = None
    if kind == "metadata-not-json":
        metadata = {"lora_adapter_metadata": "{not json"}
    elif kind == "metadata-list":
        metadata = {"lora_adapter_metadata": json.dumps([1, 2])}
    elif kind == "alpha-string":
        metadata = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": "big"})}
    elif kind == "one-dimensional":
        state[f"{_Q}.lora_A.weight"] = torch.randn(INNER, generator=g)
    elif kind == "rank-zero-tensor":
        state[f"{_Q}.lora_B.weight"] = torch.tensor(1.0)
    elif kind == "integer":
        state[f"{_Q}.lora_A.weight"] = torch.ones(2, INNER, dtype=torch.int64)
    elif kind == "only-b":
        del state[f"{_Q}.lora_A.weight"]
    save_file(state, str(path), metadata=metadata)
    return path


ODD_KINDS = (
    "metadata-not-json",
    "metadata-list",
    "alpha-string",
    "one-dimensional",
    "rank-zero-tensor",
    "integer",
    "only-b",
)


def _load(path: Path) -> dict:
    return load_file(str(path))


_ATTENTION = re.compile(r"\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)\.weight$")


def transformer_lora(path: Path, model: Path, seed: int, rank: int = 2, scale: float = 0.5) -> Path:
    """A diffusers/PEFT LoRA on every attention projection of the transformer of the model folder `model` (any
    family): shapes read from its weights."""
    weights = load_file(str(model / "transformer" / "diffusion_pytorch_model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, weight in sorted(weights.items()):
        if weight.ndim == 2 and _ATTENTION.search(key):
            module = "transformer." + key.removesuffix(".weight")
            down, up = _pair(g, weight.shape[0], weight.shape[1], rank, scale)
            state[module + ".lora_A.weight"], state[module + ".lora_B.weight"] = down, up
    save_file(state, str(path))
    return path
