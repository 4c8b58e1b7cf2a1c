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

All or nothing: the whole slot state is built (every file parsed, every layer
checked) before anything is written; if writing fails, the slot is zeroed
and the text encoders restored, which is the base model.
"""

import logging
import math
from pathlib import Path

import torch

from plugins.lora.merge import LoRAMerger
from server.lora import Layers, LoRAApplier, LoRAError, LoRALayer, LoRASet, Shapes

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
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) of one layer for the whole set, weights baked into A; None when no LoRA of the set touches it."""
    downs = [layers[module].down.to(device) * (w * layers[module].scale) for layers, w in loras if module in layers]
    if not downs:
        return None
    ups = [layers[module].up.to(device) for layers, _ in loras if module in layers]
    return torch.cat(downs), torch.cat(ups, dim=1)


class HotswapLoRA(LoRAApplier):
    """LoRA sets for FP8/compiled transformers. rank: the slot's rank (LORA_HOTSWAP_RANK); shapes: the
    layers as LoRA files name them, taken before the transformer was quantized; dtype: the slot's."""

    def __init__(self, pipe, rank: int, shapes: Shapes, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.transformer = pipe.transformer
        self.rank = rank
        self.dtype = dtype
        self.encoders = LoRAMerger(pipe, shapes)  # parses and caches files; merges text-encoder layers
        self.targets: dict[str, tuple[int, int]] = {}

    @property
    def how(self) -> str:
        return f"hot-swapped into a slot of rank {self.rank}"

    # -- setup (before torch.compile) ----------------------------------

    def install(self) -> None:
        """Reserve the slot on every linear layer of the transformer, all zeros (the base model)."""
        self.targets = linear_layers(self.transformer)
        self.transformer.enable_lora_hotswap(target_rank=self.rank)
        self.transformer.load_lora_adapter(self._slot_state([]), adapter_name=SLOT, prefix=None)
        log.info("LoRA slot of rank %d on %d linear layers (hotswap)", self.rank, len(self.targets))

    # -- the applier ------------------------------------------------------

    def check(self, path: Path) -> None:
        """Parsing checks the layers and shapes; what is left is what only the slot refuses."""
        self._transformer_parts([(self.encoders.files.layers(path), 1.0)])

    def forget(self, path: Path) -> None:
        self.encoders.forget(path)

    def _apply(self, loras: LoRASet) -> None:
        parsed = [(self.encoders.files.layers(path), weight) for path, weight in loras]
        state = self._slot_state(self._transformer_parts(parsed))  # everything checked before any write
        self._write(state, [({k: v for k, v in layers.items() if k[0] != "transformer"}, w) for layers, w in parsed])

    def _reset(self) -> None:
        self._write(self._slot_state([]), [])

    def _write(self, state: dict[str, torch.Tensor], encoder_layers: list[tuple[Layers, float]]) -> None:
        with torch.no_grad():
            self.transformer.load_lora_adapter(state, adapter_name=SLOT, prefix=None, hotswap=True)
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

    def _slot_state(self, loras: list[tuple[dict[str, LoRALayer], float]]) -> dict[str, torch.Tensor]:
        device, dtype = self.transformer.device, self.dtype
        state, worst = {}, (0.0, "")
        with torch.no_grad():
            for name, (out_features, in_features) in self.targets.items():
                factors = layer_factors(loras, name, device)
                if factors is None:
                    state[f"{name}.lora_A.weight"] = torch.zeros(self.rank, in_features, device=device, dtype=dtype)
                    state[f"{name}.lora_B.weight"] = torch.zeros(out_features, self.rank, device=device, dtype=dtype)
                    continue
                down, up = factors
                if down.shape[0] > self.rank:
                    down, up, error = reduce_rank(down, up, self.rank)
                    worst = max(worst, (error, name))
                down, up = pad_rank(down, up, self.rank)
                state[f"{name}.lora_A.weight"] = down.to(dtype)
                state[f"{name}.lora_B.weight"] = up.to(dtype)
        if worst[0] > _WARN_ERROR:
            log.warning(
                "LoRA set exceeds LORA_HOTSWAP_RANK=%d; kept its best rank-%d approximation "
                "(largest relative error %.2g, at %s). Raise LORA_HOTSWAP_RANK for an exact set.",
                self.rank,
                self.rank,
                worst[0],
                worst[1],
            )
        return state
