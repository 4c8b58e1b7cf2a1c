"""LoRAs for the demo model (`image-server demo-assets`): random weights in the formats people ship."""

from pathlib import Path

import torch
from safetensors.torch import save_file

# The demo transformer: inner dim 8, one double block and one single block.
INNER = 8
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _pair(g: torch.Generator, out_f: int, in_f: int, rank: int, scale: float):
    return torch.randn(rank, in_f, generator=g) * scale, torch.randn(out_f, rank, generator=g) * scale


def peft_lora(path: Path, seed: int, rank: int = 4, prefix: str = "transformer.", scale: float = 1.0) -> Path:
    """diffusers/PEFT keys (`transformer.<module>.lora_A.weight`); prefix "" makes the bare-key variant."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for block in ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn"):
        for name in ATTENTION:
            if block.startswith("single") and name not in ("to_q", "to_k", "to_v"):
                continue
            down, up = _pair(g, INNER, INNER, rank, scale)
            state[f"{prefix}{block}.{name}.lora_A.weight"] = down
            state[f"{prefix}{block}.{name}.lora_B.weight"] = up
    save_file(state, str(path))
    return path


def kohya_lora(path: Path, seed: int, rank: int = 2, scale: float = 1.0) -> Path:
    """kohya-ss FLUX keys (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` + alpha)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, out_f, in_f in [
        ("double_blocks_0_img_attn_qkv", 3 * INNER, INNER),
        ("double_blocks_0_img_attn_proj", INNER, INNER),
        ("single_blocks_0_linear2", INNER, INNER + 4 * INNER),
    ]:
        down, up = _pair(g, out_f, in_f, rank, scale)
        state[f"lora_unet_{name}.lora_down.weight"] = down
        state[f"lora_unet_{name}.lora_up.weight"] = up
        state[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path


def write_demo_loras(folder: Path) -> list[str]:
    """Three LoRAs for the demo model, in three key formats; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    peft_lora(folder / "style.safetensors", seed=1)
    kohya_lora(folder / "detail.safetensors", seed=2)
    peft_lora(folder / "grain.safetensors", seed=3, prefix="")
    return ["style", "detail", "grain"]
