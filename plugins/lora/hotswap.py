"""Weighted LoRA sets on a compiled or FP8 transformer: one fixed-rank adapter slot, hot-swapped.

`LoRAMerger` writes LoRAs into the weights. That cannot work on FP8 weights
(torchao tensors), and a compiled transformer must never see its modules
change. So on those paths the transformer gets one PEFT adapter, "slot", of
rank `rank` on every linear layer, reserved before torch.compile with
diffusers' `enable_lora_hotswap`; a LoRA set is then written into that slot
with `load_lora_adapter(..., hotswap=True)`, which copies into the same
tensors, so the compiled graph never recompiles.

How a weighted set becomes one rank-`rank` adapter, per layer:
  - the weights are baked into lora_A (w * alpha/r * A), never set through
    `set_adapters`, whose float scale would recompile;
  - the LoRAs are concatenated along the rank: A = [A1; A2; ...],
    B = [B1, B2, ...], so B @ A = sum of w_i * B_i @ A_i, exactly;
  - a layer the set does not touch, and the empty set, get zeros;
  - the rest is zero padding up to `rank`.
Limits: the slot costs its rank on every linear layer whatever the set (an estimated
3-4% of FLUX's matmul work at rank 64). When a layer's ranks add up to more
than `rank`, the layer gets the best rank-`rank` approximation of the set's
sum (truncated SVD computed from the factors) and a warning with the relative
error; a set whose ranks add up to at most `rank` is exact. LoRA layers of the
text encoders (not compiled) are merged into their weights by `LoRAMerger`.
LoRA biases are refused. QKV projections stay unfused under a slot: a LoRA's
q, k and v parts would stack block-diagonally on a fused to_qkv, tripling the
rank it needs there, which costs more than fusing saves.

A switch writes the slot's tensors directly, in one batched copy, and only
where something changes: the layers the new set touches get its factors, the
layers only the previous set touched get zeros, every other layer stays zero.
(diffusers' `load_lora_adapter(hotswap=True)` would map and check every key of
a full state and copy tensor by tensor, hundreds of milliseconds per switch on
FLUX.)

All or nothing: every file was parsed and checked off the engine thread
before its request queued, and the set's factors are built before anything
is written; if writing fails, every layer that may have been written is
zeroed and the text encoders restored: the base model.
"""

import logging
import math
from pathlib import Path

import torch

from plugins.lora.merge import LoRAMerger
from server.hooks import LoRAApplier
from server.lora import Layers, LoRAError, LoRALayer, LoRASet, Shapes

log = logging.getLogger(__name__)

SLOT = "slot"
_WARN_ERROR = 1e-3  # relative error above which a rank reduction is worth a warning


def linear_layers(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """module path -> (out, in) of every linear layer: the layers the slot covers."""
    return {
        name: (layer.out_features, layer.in_features)
        for name, layer in module.named_modules()
        if isinstance(layer, torch.nn.Linear)
    }


def reduce_rank(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors of up @ down, and the relative (Frobenius) error of dropping the rest.

    Works on the factors (QR of each, SVD of the small core), never on the full matrix."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    kept = min(rank, s.numel())
    root = s[:kept].sqrt()
    new_up = q_up @ (u[:, :kept] * root)
    new_down = (root[:, None] * vh[:kept]) @ q_down.T
    total = float(s.square().sum())
    error = math.sqrt(float(s[kept:].square().sum()) / total) if total > 0 else 0.0
    return new_down, new_up, error


def pad_rank(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = rank - down.shape[0]
    return (
        torch.cat([down, down.new_zeros(extra, down.shape[1])]),
        torch.cat([up, up.new_zeros(up.shape[0], extra)], dim=1),
    )


def layer_factors(
    loras: list[tuple[dict[str, LoRALayer], float]], module: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one layer that the set touches, for the whole set, weights baked into A."""
    touching = [(layers[module], w) for layers, w in loras if module in layers]
    downs = [layer.down.to(device) * (w * layer.scale) for layer, w in touching]
    return torch.cat(downs), torch.cat([layer.up.to(device) for layer, _ in touching], dim=1)


class HotswapLoRA(LoRAApplier):
    """LoRA sets for FP8/compiled transformers. rank: the slot's rank (LORA_HOTSWAP_RANK); shapes: the
    layers as LoRA files name them, taken before the transformer was quantized; dtype: the slot's."""

    def __init__(self, pipe, rank: int, shapes: Shapes, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.transformer = pipe.transformer
        self.rank = rank
        self.dtype = dtype
        self.encoders = LoRAMerger(pipe, shapes, dtype)  # parses and caches files; merges text-encoder layers
        self.targets: dict[str, tuple[int, int]] = {}
        self.slot: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> the slot's (A, B) tensors
        self.written: set[str] = set()  # layers whose slot may hold something other than zeros

    @property
    def how(self) -> str:
        return f"hot-swapped into a slot of rank {self.rank}"

    # -- setup (before torch.compile) ----------------------------------

    def install(self) -> None:
        """Reserve the slot on every linear layer of the transformer, all zeros (the base model)."""
        self.targets = linear_layers(self.transformer)
        self.transformer.enable_lora_hotswap(target_rank=self.rank)
        self.transformer.load_lora_adapter(self._zeros(), adapter_name=SLOT, prefix=None)
        for name in self.targets:
            layer = self.transformer.get_submodule(name)
            self.slot[name] = (layer.lora_A[SLOT].weight, layer.lora_B[SLOT].weight)
        log.info("LoRA slot of rank %d on %d linear layers (hotswap)", self.rank, len(self.targets))

    def _zeros(self) -> dict[str, torch.Tensor]:
        state, zeros = {}, {"device": self.transformer.device, "dtype": self.dtype}
        for name, (out_features, in_features) in self.targets.items():
            state[f"{name}.lora_A.weight"] = torch.zeros(self.rank, in_features, **zeros)
            state[f"{name}.lora_B.weight"] = torch.zeros(out_features, self.rank, **zeros)
        return state

    # -- the applier ------------------------------------------------------

    def check(self, path: Path) -> None:
        """Parsing checks the layers and shapes; what is left is what only the slot refuses."""
        self._transformer_parts([(self.encoders.files.parse(path), 1.0)])

    def forget(self, path: Path) -> None:
        self.encoders.forget(path)

    def _apply(self, loras: LoRASet) -> None:
        parsed = [(self.encoders.files.parsed(path), weight) for path, weight in loras]
        factors = self._slot_factors(self._transformer_parts(parsed))  # everything checked before any write
        self._write(factors, [({k: v for k, v in layers.items() if k[0] != "transformer"}, w) for layers, w in parsed])

    def _reset(self) -> None:
        self._write({}, [])

    def _write(
        self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], encoder_layers: list[tuple[Layers, float]]
    ) -> None:
        stale = [tensor for name in self.written - factors.keys() for tensor in self.slot[name]]
        targets = [tensor for name in factors for tensor in self.slot[name]]
        values = [value for pair in factors.values() for value in pair]
        self.written |= factors.keys()  # before writing: a reset after a failure zeroes all that may be written
        with torch.no_grad():
            if stale:
                torch._foreach_zero_(stale)
            if targets:
                torch._foreach_copy_(targets, values)
            self.written = set(factors)
            self.encoders.merge(encoder_layers)

    # -- building the slot's weights ---------------------------------------

    def _transformer_parts(self, loras: list[tuple[Layers, float]]) -> list[tuple[dict[str, LoRALayer], float]]:
        parts = []
        for layers, weight in loras:
            mine = {module: layer for (component, module), layer in layers.items() if component == "transformer"}
            for module, layer in mine.items():
                if module not in self.targets:
                    raise LoRAError(f"layer {module!r} is not a linear layer of the transformer")
                if layer.bias is not None:
                    raise LoRAError(f"{module} has a LoRA bias, which the hot-swapped LoRA slot cannot take")
            parts.append((mine, weight))
        return parts

    def _slot_factors(
        self, loras: list[tuple[dict[str, LoRALayer], float]]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """layer -> the slot's (A, B) for the set, in the slot's dtype and rank; only the layers the set touches."""
        factors, worst = {}, (0.0, "")
        with torch.no_grad():
            for name in sorted({module for layers, _ in loras for module in layers}):
                slot_down, slot_up = self.slot[name]
                down, up = layer_factors(loras, name, slot_down.device)
                if down.shape[0] > self.rank:
                    down, up, error = reduce_rank(down, up, self.rank)
                    worst = max(worst, (error, name))
                down, up = pad_rank(down, up, self.rank)
                factors[name] = (down.to(slot_down.dtype), up.to(slot_up.dtype))
        if worst[0] > _WARN_ERROR:
            log.warning(
                "LoRA set exceeds LORA_HOTSWAP_RANK=%d; kept its best rank-%d approximation "
                "(largest relative error %.2g, at %s). Raise LORA_HOTSWAP_RANK for an exact set.",
                self.rank,
                self.rank,
                worst[0],
                worst[1],
            )
        return factors
