"""Weighted LoRA sets on the Nunchaku transformer, through Nunchaku's own LoRA API.

diffusers' `load_lora_weights` cannot patch Nunchaku's quantized blocks (one C++ module), and merging into
4-bit weights is impossible; Nunchaku instead composes a set into one LoRA (`compose_lora([(path, weight),
...])`: weights baked in, ranks concatenated, q/k/v fused) and loads it next to its own low-rank branch
(`update_lora_params`, which replaces the previous LoRA); `reset_lora` goes back to the base model, which is
also how a failed load is undone. Composing reads and converts every file, so composed sets are kept (least
recently used first out).
"""

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from server.lora import LoRAApplier, LoRAError, LoRASet, SetKey, set_key

COMPOSED_SETS = 4  # composed sets kept in CPU memory (a few hundred MB each for rank-32 FLUX LoRAs)


def nunchaku_compose(loras: list[tuple[str, float]]) -> dict:
    from nunchaku.lora.flux.compose import compose_lora

    return compose_lora(loras)


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
    """`compose` is Nunchaku's compose_lora; the tests pass a stand-in (there is no Nunchaku without a GPU)."""

    how = "loaded into Nunchaku (compose_lora + update_lora_params)"

    def __init__(self, transformer, compose=nunchaku_compose, cache_size: int = COMPOSED_SETS) -> None:
        super().__init__()
        self.transformer = transformer
        self.compose = compose
        self.cache = SetCache(cache_size)

    def check(self, path: Path) -> None:
        self._composed(((path, 1.0),))

    def forget(self, path: Path) -> None:
        self.cache.forget(path)

    def _apply(self, loras: LoRASet) -> None:
        if not loras:
            self._reset()
            return
        composed = self._composed(loras)
        try:
            self.transformer.update_lora_params(composed)
        except Exception as exc:
            raise LoRAError(f"Nunchaku could not load it ({type(exc).__name__}: {exc})") from None

    def _reset(self) -> None:
        self.transformer.reset_lora()

    def _composed(self, loras: LoRASet) -> dict:
        return self.cache.get(set_key(loras), lambda: self._compose(loras))

    def _compose(self, loras: LoRASet) -> dict:
        try:
            composed = self.compose([(str(path), float(weight)) for path, weight in loras])
        except Exception as exc:  # Nunchaku asserts and raises freely on files it cannot convert
            raise LoRAError(f"Nunchaku cannot compose it ({type(exc).__name__}: {exc})") from None
        if not composed:
            raise LoRAError("it holds no LoRA weights Nunchaku recognises (0 keys composed)")
        return composed
