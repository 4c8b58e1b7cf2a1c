"""Weighted LoRA sets merged into a diffusers pipeline's weights, with exact restore.

The merge is one line of arithmetic per layer, W = W_base + sum_i w_i * s_i * B_i @ A_i, computed in float32
and cast once. The base value of every weight a set touches is kept the first time it is touched, so
switching sets, or going back to none, restores the base weights bit for bit; PEFT's unfuse subtracts
instead, which in bf16 does not give the base back.

A switch writes each weight once: a layer of the new set gets base + delta straight from the kept base, a
layer only the old set touched gets its base back. The kept copies live on the weights' device while it has
room for them (a switch then reads no host memory), else in pinned host memory.

All or nothing: every file was parsed and checked (`check`, off the engine thread) before its request queued,
so a switch reads no file and nothing is left to refuse once a weight changes; a failure while writing
(out of memory, say) restores every weight touched so far from the kept bases before the error goes on.
"""

import logging
from pathlib import Path

import torch

from server.hooks import LoRAApplier
from server.lora import Layers, LoRALayer, LoRASet, ParsedFiles, Shapes, parse_lora, weight_shapes

log = logging.getLogger(__name__)

# (component, module path, parameter name)
ParamKey = tuple[str, str, str]

DEVICE_COPY_HEADROOM = 0.25  # keep base copies on the GPU only while a quarter of its memory stays free


def group_layers(loras: list[tuple[Layers, float]]) -> dict[tuple[str, str], list[tuple[LoRALayer, float]]]:
    """(component, module) -> the set's (layer, weight) pairs for it."""
    grouped: dict[tuple[str, str], list[tuple[LoRALayer, float]]] = {}
    for layers, weight in loras:
        for key, layer in layers.items():
            grouped.setdefault(key, []).append((layer, weight))
    return grouped


def deltas(grouped: dict[tuple[str, str], list[tuple[LoRALayer, float]]]) -> dict[ParamKey, list]:
    """Each parameter the set changes -> the (layer, weight) pairs whose product adds to it."""
    out: dict[ParamKey, list] = {}
    for (component, module), pairs in grouped.items():
        out[(component, module, "weight")] = pairs
        biased = [(layer, w) for layer, w in pairs if layer.bias is not None]
        if biased:
            out[(component, module, "bias")] = biased
    return out


class LoRAMerger(LoRAApplier):
    """LoRA sets merged into `pipe`'s weights, of `dtype`. `shapes` (taken when the pipeline was loaded) name
    the layers, so that a check off the engine thread never walks the live modules; the hot-swapped slot uses a
    merger for the text encoders."""

    how = "merged into the weights"

    def __init__(self, pipe, shapes: Shapes | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.pipe = pipe
        shapes = shapes if shapes is not None else weight_shapes(pipe)
        self.files = ParsedFiles(lambda path: parse_lora(pipe, path, shapes, dtype))
        self._base: dict[ParamKey, torch.Tensor] = {}  # the base value of every parameter ever touched
        self._touched: set[ParamKey] = set()  # parameters that differ from their base now

    def check(self, path: Path) -> None:
        self.files.parse(path)

    def forget(self, path: Path) -> None:
        self.files.forget(path)

    def _apply(self, loras: LoRASet) -> None:
        parsed = [(self.files.parsed(path), weight) for path, weight in loras]  # every file before any weight
        self.merge(parsed)

    def merge(self, loras: list[tuple[Layers, float]]) -> None:
        """Make these parsed layers, with their weights, the only ones merged."""
        wanted = deltas(group_layers(loras))
        with torch.no_grad():
            for key in self._touched - set(wanted):
                self._restore(key)
            for key, pairs in wanted.items():
                self._write(key, pairs)

    def _reset(self) -> None:
        with torch.no_grad():
            for key in list(self._touched):
                self._restore(key)

    def _param(self, key: ParamKey) -> torch.Tensor:
        component, module, name = key
        return getattr(self.pipe.components[component].get_submodule(module), name)

    def _restore(self, key: ParamKey) -> None:
        self._param(key).copy_(self._base[key], non_blocking=True)
        self._touched.discard(key)

    def _write(self, key: ParamKey, pairs: list[tuple[LoRALayer, float]]) -> None:
        param = self._param(key)
        base = self._kept(key, param)
        self._touched.add(key)  # before the write: a failure half-way is restored too
        delta = sum(w * layer.scale * _product(layer, key[2], param.device) for layer, w in pairs)
        param.copy_((base.to(param.device, non_blocking=True).float() + delta).to(param.dtype))

    def _kept(self, key: ParamKey, param: torch.Tensor) -> torch.Tensor:
        if key not in self._base:
            self._base[key] = _copy_for_restore(param)
        return self._base[key]


def _product(layer: LoRALayer, part: str, device: torch.device) -> torch.Tensor:
    if part == "bias":
        return layer.bias.to(device)
    return layer.up.to(device) @ layer.down.to(device)


def _copy_for_restore(param: torch.Tensor) -> torch.Tensor:
    """A copy on the parameter's GPU while it has room, else in (pinned, when there is a GPU) host memory."""
    if param.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(param.device)
        if free - param.numel() * param.element_size() > DEVICE_COPY_HEADROOM * total:
            return param.detach().clone()
        return param.detach().to("cpu", copy=True).pin_memory()
    return param.detach().to("cpu", copy=True)
