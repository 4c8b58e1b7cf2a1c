"""Weighted LoRA merging into a diffusers pipeline's weights, with exact restore.

diffusers reads the file and converts its keys (kohya, PEFT, diffusers); the
merge itself is one line of arithmetic per layer: W = W_base + sum_i w_i * s_i * B_i @ A_i,
computed in float32 and cast once. The base value of every weight a LoRA
touches is kept (on the CPU) the first time it is touched, so switching sets,
or going back to none, restores the base weights bit for bit; PEFT's
unfuse subtracts instead, which in bf16 does not give the base back.

Parsed LoRAs are cached by (path, mtime, size): a switch reads no file.
"""

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

log = logging.getLogger(__name__)

_SUFFIX = re.compile(r"\.(lora_[AB]\.weight|lora_B\.bias|lora_down\.weight|lora_up\.weight|alpha)$")


class LoRAError(ValueError):
    """A LoRA file that cannot be applied to this model (the message says why)."""


@dataclass
class LoRALayer:
    down: torch.Tensor  # A: (rank, in)
    up: torch.Tensor  # B: (out, rank)
    scale: float  # alpha / rank
    bias: torch.Tensor | None = None


def _module_names(pipe) -> dict[str, set[str]]:
    return {
        name: {n for n, _ in component.named_modules()}
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
    }


def normalize_keys(state: dict[str, torch.Tensor], transformer_modules: set[str]) -> dict[str, torch.Tensor]:
    """Give bare and PEFT-saved (`base_model.model.`) transformer keys the `transformer.` prefix.

    diffusers loads nothing, silently, for keys without the component prefix."""
    out = {}
    for key, value in state.items():
        bare = key.removeprefix("base_model.model.")
        if _SUFFIX.sub("", bare) in transformer_modules:
            key = "transformer." + bare
        out[key] = value
    return out


def _metadata_alpha(path: Path) -> float | None:
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    return json.loads(raw).get("transformer.lora_alpha")


def weight_shapes(pipe) -> dict[str, dict[str, tuple[int, ...]]]:
    """component -> module path -> weight shape, for every module of the pipeline that has a weight."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        shapes[name] = {
            module: tuple(m.weight.shape)
            for module, m in component.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)
        }
    return shapes


def parse_lora(pipe, path: Path, shapes: dict | None = None) -> dict[tuple[str, str], LoRALayer]:
    """(component, module path) -> LoRALayer, checked against the pipeline's modules and weight shapes.

    `shapes` (from `weight_shapes`, taken earlier) stands in for the pipeline's current modules when those
    have been rewritten since (FP8-quantized, wrapped by PEFT): LoRA files name the original layers."""
    modules = _module_names(pipe) if shapes is None else {c: set(m) for c, m in shapes.items()}
    try:
        raw = normalize_keys(load_file(str(path)), modules.get("transformer", set()))
        default_alpha = _metadata_alpha(path)
    except (SafetensorError, OSError) as exc:
        raise LoRAError(f"not a readable .safetensors file ({exc})") from None
    try:
        state, alphas = pipe.lora_state_dict(raw, return_alphas=True)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise LoRAError(f"not a LoRA this model's loader understands ({type(exc).__name__}: {exc})") from None
    alphas = alphas or {}
    layers: dict[tuple[str, str], LoRALayer] = {}
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        prefix = key.removesuffix(".lora_A.weight")
        component, _, module = prefix.partition(".")
        if module not in modules.get(component, ()):
            raise LoRAError(f"key {key!r} matches no layer of this model")
        down = state[key].float()
        up = state.get(prefix + ".lora_B.weight")
        if up is None:
            raise LoRAError(f"{prefix}.lora_A has no lora_B")
        alpha = alphas.get(prefix + ".alpha", default_alpha)
        rank = down.shape[0]
        if shapes is None:
            shape = tuple(pipe.components[component].get_submodule(module).weight.shape)
        else:
            shape = shapes[component].get(module)
        if (up.shape[0], down.shape[1]) != shape:
            raise LoRAError(f"{prefix}: LoRA shape {up.shape[0]}x{down.shape[1]} does not fit {shape}")
        bias = state.get(prefix + ".lora_B.bias")
        layers[(component, module)] = LoRALayer(
            down, up.float(), float(alpha) / rank if alpha else 1.0, None if bias is None else bias.float()
        )
    if not layers:
        raise LoRAError("it holds no LoRA weights for any layer of this model (0 keys loaded)")
    return layers


class LoRAMerger:
    """Applies weighted LoRA sets to a diffusers pipeline. Engine thread only."""

    def __init__(self, pipe, shapes: dict | None = None) -> None:
        self.pipe = pipe
        self.shapes = shapes  # see parse_lora
        self._cache: dict[Path, tuple[tuple, dict]] = {}
        self._base: dict[tuple[str, str, str], torch.Tensor] = {}  # (component, module, param) -> base value (CPU)
        self._touched: set[tuple[str, str, str]] = set()
        self.applied: tuple[tuple[Path, float], ...] = ()

    def check(self, path: Path) -> None:
        self.layers(path)

    def forget(self, path: Path) -> None:
        self._cache.pop(path, None)

    def apply(self, entries: list[tuple[Path, float]]) -> None:
        entries = tuple(entries)
        if entries == self.applied:
            return
        started = time.monotonic()
        self.merge([(self.layers(path), weight) for path, weight in entries])  # parse before touching any weight
        self.applied = entries
        names = ", ".join(f"{p.stem}:{w:g}" for p, w in entries) or "none"
        log.info("LoRA set [%s] applied in %.2fs", names, time.monotonic() - started)

    def merge(self, loras: list[tuple[dict, float]]) -> None:
        """Restore the base weights, then merge these parsed LoRAs (layers from `layers`) with their weights."""
        with torch.no_grad():
            self._restore()
            for (component, module), deltas in _group(loras).items():
                self._merge(component, module, deltas)
        self.applied = ()

    def layers(self, path: Path) -> dict:
        """The parsed LoRA file, cached by (path, mtime, size)."""
        stamp = file_stamp(path)
        cached = self._cache.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, parse_lora(self.pipe, path, self.shapes))
            self._cache[path] = cached
        return cached[1]

    def _param(self, component: str, module: str, name: str) -> torch.Tensor:
        return getattr(self.pipe.components[component].get_submodule(module), name)

    def _restore(self) -> None:
        for key in self._touched:
            self._param(*key).copy_(self._base[key])
        self._touched.clear()

    def _merge(self, component: str, module: str, deltas: list[tuple[LoRALayer, float]]) -> None:
        device = self._param(component, module, "weight").device
        weight = sum(w * layer.scale * (layer.up.to(device) @ layer.down.to(device)) for layer, w in deltas)
        self._add((component, module, "weight"), weight)
        biased = [(layer, w) for layer, w in deltas if layer.bias is not None]
        if biased:
            self._add((component, module, "bias"), sum(w * layer.scale * layer.bias.to(device) for layer, w in biased))

    def _add(self, key: tuple[str, str, str], delta: torch.Tensor) -> None:
        param = self._param(*key)
        if key not in self._base:
            self._base[key] = param.detach().to("cpu", copy=True)
        param.copy_((param.float() + delta).to(param.dtype))
        self._touched.add(key)


def file_stamp(path: Path) -> tuple[int, int]:
    """(mtime in ns, size): a file replaced under the same name gets a new stamp."""
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def _group(loras: list[tuple[dict, float]]) -> dict[tuple[str, str], list[tuple[LoRALayer, float]]]:
    grouped: dict[tuple[str, str], list[tuple[LoRALayer, float]]] = {}
    for layers, weight in loras:
        for key, layer in layers.items():
            grouped.setdefault(key, []).append((layer, weight))
    return grouped
