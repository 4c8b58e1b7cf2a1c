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


# Every dtype safetensors 0.8 names (its header parser lists them), and two it does not.
SAFETENSORS_DTYPES = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)  # fmt: skip
UNKNOWN_DTYPES = ("C128", "X")
_TORCH_FLOATS = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}  # fmt: skip


def dtype_lora(path: Path, dtype: str) -> Path:
    """The demo's style LoRA with every tensor in `dtype`: converted where torch has the dtype as a float, else
    the header says `dtype` over bytes of the right count (an integer file, say, as a tool might write it)."""
    state = _load(peft_lora(path, seed=1))
    if dtype in _TORCH_FLOATS:
        save_file({k: v.to(_TORCH_FLOATS[dtype]) for k, v in state.items()}, str(path))
        return path
    return raw_safetensors(path, {k: (dtype, list(v.shape), v.numel()) for k, v in state.items()})


def raw_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], int]], metadata: dict | None = None) -> Path:
    """A safetensors file written by hand: name -> (dtype, shape, bytes of data, all ones)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape, size) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"\x01" * offset)
    return path


def metadata_lora(path: Path, metadata_bytes: int) -> Path:
    """The demo's style LoRA with about `metadata_bytes` of training metadata in small entries (21 bytes each):
    what froze the server (safetensors builds each entry holding the GIL)."""
    state = _load(peft_lora(path, seed=1))
    save_file(state, str(path), metadata={f"ss_tag_{i:07d}": "v" for i in range(metadata_bytes // 21)})
    return path


def scaled_lora(path: Path, up: float, seed: int = 1) -> Path:
    """The demo's style LoRA with every lora_B scaled by `up`: finite, but at a large enough factor its merged
    weights leave the model's dtype (all-black images before the range check)."""
    state = _load(peft_lora(path, seed=seed))
    save_file({k: v * up if ".lora_B." in k else v for k, v in state.items()}, str(path))
    return path
