"""Weighted LoRA sets on the Nunchaku transformer, through Nunchaku's own LoRA API.

diffusers' `load_lora_weights` cannot patch Nunchaku's quantized blocks (one
C++ module), and merging into 4-bit weights is impossible; Nunchaku instead
composes a set into one LoRA (`compose_lora([(path, weight), ...])`: weights
baked in, ranks concatenated, q/k/v fused) and loads it next to its own
low-rank branch (`update_lora_params`, which replaces the previous LoRA);
`reset_lora` goes back to the base model. Composing reads and converts every
file, so composed sets are kept (least recently used first out).
"""

import logging
import time
from pathlib import Path

from plugins.lora.merge import LoRAError
from plugins.lora.sets import SetCache, set_key

log = logging.getLogger(__name__)

COMPOSED_SETS = 4  # composed sets kept in CPU memory (a few hundred MB each for rank-32 FLUX LoRAs)


def nunchaku_compose(loras: list[tuple[str, float]]) -> dict:
    from nunchaku.lora.flux.compose import compose_lora

    return compose_lora(loras)


class NunchakuLoRA:
    """The LoRA plugin's applier on the Nunchaku path. Engine thread only.

    `compose` is Nunchaku's compose_lora; the tests pass a stand-in (there is no Nunchaku without a GPU)."""

    def __init__(self, transformer, compose=nunchaku_compose, cache_size: int = COMPOSED_SETS) -> None:
        self.transformer = transformer
        self.compose = compose
        self.cache = SetCache(cache_size)
        self.applied: tuple = ()

    def check(self, path: Path) -> None:
        self._composed([(path, 1.0)])

    def forget(self, path: Path) -> None:
        self.cache.forget(path)

    def apply(self, entries: list[tuple[Path, float]]) -> None:
        key = set_key(entries)
        if key == self.applied:
            return
        started = time.monotonic()
        if not entries:
            self.transformer.reset_lora()
        else:
            composed = self._composed(entries)
            try:
                self.transformer.update_lora_params(composed)
            except Exception as exc:
                self.transformer.reset_lora()  # a half-loaded LoRA must not serve the next request
                self.applied = ()
                raise LoRAError(f"Nunchaku could not load it ({type(exc).__name__}: {exc})") from None
        self.applied = key
        names = ", ".join(f"{Path(p).stem}:{w:g}" for p, w in entries) or "none"
        log.info("LoRA set [%s] loaded into Nunchaku in %.2fs", names, time.monotonic() - started)

    def _composed(self, entries: list[tuple[Path, float]]) -> dict:
        return self.cache.get(set_key(entries), lambda: self._compose(entries))

    def _compose(self, entries: list[tuple[Path, float]]) -> dict:
        try:
            composed = self.compose([(str(path), float(weight)) for path, weight in entries])
        except Exception as exc:  # Nunchaku asserts and raises freely on files it cannot convert
            raise LoRAError(f"Nunchaku cannot compose it ({type(exc).__name__}: {exc})") from None
        if not composed:
            raise LoRAError("it holds no LoRA weights Nunchaku recognises (0 keys composed)")
        return composed
