"""Weighted LoRA sets on the Nunchaku transformer, through Nunchaku's own LoRA API.

diffusers' `load_lora_weights` cannot patch Nunchaku's quantized blocks (one C++ module), and merging into
4-bit weights is impossible; Nunchaku instead composes a set into one LoRA (`compose_lora([(state, weight),
...])`: weights baked in, ranks concatenated, q/k/v fused) and loads it next to its own low-rank branch
(`update_lora_params`, which replaces the previous LoRA); `reset_lora` goes back to the base model, which is
also how a failed load is undone.

Each file is read once, off the engine thread (`check`): its header within the bounds of `server.lora`, then
Nunchaku's conversion to diffusers keys (`to_diffusers`), checked finite and within the model's dtype at the
largest weight. The engine thread composes sets from those converted states and reads no file; composed sets
are kept (least recently used first out).
"""

import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from server.hooks import LoRAApplier
from server.lora import (
    Layers,
    LoRAError,
    LoRALayer,
    LoRASet,
    ParsedFiles,
    SetKey,
    check_header,
    check_range,
    set_key,
)

log = logging.getLogger(__name__)

COMPOSED_SETS = 4  # composed sets kept in CPU memory (a few hundred MB each for rank-32 FLUX LoRAs)

State = dict[str, torch.Tensor]


def nunchaku_convert(path: Path) -> State:
    from nunchaku.lora.flux.diffusers_converter import to_diffusers

    return to_diffusers(str(path))


def nunchaku_compose(loras: list[tuple[State, float]]) -> State:
    from nunchaku.lora.flux.compose import compose_lora

    return compose_lora(loras)


def pairs(state: State) -> Layers:
    """The converted state's A/B pairs (its alphas are baked into A), for the range check."""
    layers: Layers = {}
    for key, down in state.items():
        up = state.get(key.replace(".lora_A.", ".lora_B."))
        if ".lora_A." in key and up is not None and down.ndim == up.ndim == 2:
            layers[("transformer", key.removesuffix(".lora_A.weight"))] = LoRALayer(down.float(), up.float(), 1.0)
    return layers


class SetCache:
    """Least-recently-used map from SetKey to a composed set; holds at most `size` sets."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[SetKey, object] = OrderedDict()

    def get(self, key: SetKey, build: Callable[[], object]) -> object:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = build()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def forget(self, path: Path) -> None:
        """Drop every set that uses this file (it was deleted or replaced)."""
        name = str(Path(path).resolve())
        for key in [k for k in self._items if any(entry[0] == name for entry in k)]:
            del self._items[key]

    def __contains__(self, key: SetKey) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


class NunchakuLoRA(LoRAApplier):
    """`convert` and `compose` are Nunchaku's to_diffusers and compose_lora; the tests pass stand-ins (there is
    no Nunchaku without a GPU). `dtype`: the model's, for the range check."""

    how = "loaded into Nunchaku (compose_lora + update_lora_params)"

    def __init__(
        self,
        transformer,
        dtype: torch.dtype = torch.bfloat16,
        convert: Callable[[Path], State] = nunchaku_convert,
        compose: Callable[[list[tuple[State, float]]], State] = nunchaku_compose,
        cache_size: int = COMPOSED_SETS,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.dtype = dtype
        self.convert = convert
        self.compose = compose
        self.files = ParsedFiles(self._read)
        self.cache = SetCache(cache_size)

    def check(self, path: Path) -> None:
        self.files.parse(path)

    def forget(self, path: Path) -> None:
        self.files.forget(path)
        self.cache.forget(path)

    def _apply(self, loras: LoRASet) -> None:
        if not loras:
            self._reset()
            return
        composed = self.cache.get(set_key(loras), lambda: self._compose(loras))
        try:
            self.transformer.update_lora_params(composed)
        except Exception as exc:
            log.error("Nunchaku could not load a LoRA set: %r", exc)
            raise LoRAError("Nunchaku could not load it (the server log has its reason)") from None

    def _reset(self) -> None:
        self.transformer.reset_lora()

    def _read(self, path: Path) -> State:
        """A worker thread: the header within bounds, then Nunchaku's conversion, checked."""
        check_header(path)
        try:
            state = self.convert(path)
        except OSError:
            raise
        except Exception as exc:  # Nunchaku asserts and raises freely on files it cannot convert
            log.info("Nunchaku cannot convert LoRA file %s: %r", path, exc)
            raise LoRAError("Nunchaku cannot convert it (its keys are in no format Nunchaku reads)") from None
        if not state:
            raise LoRAError("it holds no LoRA weights Nunchaku recognises (0 keys converted)")
        if not all(bool(torch.isfinite(value.float()).all()) for value in state.values()):
            raise LoRAError("it holds values that are not finite (inf or nan)")
        check_range(pairs(state), self.dtype)
        return state

    def _compose(self, loras: LoRASet) -> State:
        """The engine thread: from the states `check` converted (no file is read here)."""
        states = [(self.files.parsed(path), float(weight)) for path, weight in loras]
        try:
            return self.compose(states)
        except Exception as exc:  # Nunchaku asserts on sets it cannot fuse (q, k and v of different ranks)
            log.info("Nunchaku cannot compose a LoRA set: %r", exc)
            raise LoRAError("Nunchaku cannot compose this set (the server log has its reason)") from None
