"""plugins/nunchaku_flux/lora.py: weighted LoRA sets through Nunchaku's own LoRA API.

A recording stand-in replaces NunchakuFluxTransformer2dModel's LoRA methods and compose_lora (their CUDA
kernels cannot run here); the set keys, the cache and the all-or-nothing rule run for real.
"""

import os
from pathlib import Path

import pytest

from plugins.nunchaku_flux.lora import NunchakuLoRA, SetCache
from server.lora import LoRAError, set_key


def _touch_later(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_set_keys_name_files_by_stamp_and_keep_weights_and_order(lora_dir):
    style, detail = lora_dir / "style.safetensors", lora_dir / "detail.safetensors"
    key = set_key(((style, 1.0), (detail, 0.5)))
    assert key == set_key(((style, 1), (detail, 0.5)))
    assert key != set_key(((style, 1.0), (detail, 0.6)))
    assert key != set_key(((detail, 0.5), (style, 1.0)))  # composition order is the order of the ranks
    assert set_key(()) == ()
    _touch_later(style)  # replaced under the same name: a new key
    assert key != set_key(((style, 1.0), (detail, 0.5)))


def test_set_cache_is_lru_and_forgets_sets_using_a_file(lora_dir):
    style, detail, grain = (lora_dir / f"{n}.safetensors" for n in ("style", "detail", "grain"))
    cache = SetCache(2)
    builds = []
    for entries in (((style, 1.0),), ((detail, 1.0),), ((style, 1.0),), ((grain, 1.0),)):
        cache.get(set_key(entries), lambda e=entries: builds.append(e) or len(builds))
    assert len(builds) == 3  # style was served from the cache the second time
    assert set_key(((detail, 1.0),)) not in cache  # least recently used, evicted by grain
    cache.size = 3
    cache.get(set_key(((style, 1.0), (grain, 0.5))), lambda: "pair")
    cache.forget(grain)  # the file was deleted or replaced: every set that uses it goes
    assert len(cache) == 1 and set_key(((style, 1.0),)) in cache


class RecordingNunchakuTransformer:
    """Stands in for NunchakuFluxTransformer2dModel's LoRA methods (its CUDA kernels cannot run here)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list = []
        self.fail = fail

    def update_lora_params(self, state) -> None:
        self.calls.append(("update", state["set"]))
        if self.fail:
            raise RuntimeError("kernel said no")

    def reset_lora(self) -> None:
        self.calls.append(("reset",))


def test_nunchaku_applier_composes_each_set_once_and_resets_for_none(lora_dir):
    composed = []

    def compose(loras):  # stands in for nunchaku.lora.flux.compose.compose_lora
        composed.append(loras)
        return {"set": tuple((Path(p).stem, w) for p, w in loras)}

    transformer = RecordingNunchakuTransformer()
    applier = NunchakuLoRA(transformer, compose=compose)
    style, detail, grain = (lora_dir / f"{n}.safetensors" for n in ("style", "detail", "grain"))
    three = ((style, 1.0), (detail, 0.7), (grain, 0.5))
    applier.apply(three)
    applier.apply(three)  # the same set again: nothing to do
    applier.apply(((style, 0.5),))
    applier.apply(())
    applier.apply(three)  # composed before: from the cache
    assert composed == [
        [(str(style), 1.0), (str(detail), 0.7), (str(grain), 0.5)],
        [(str(style), 0.5)],
    ]
    assert transformer.calls == [
        ("update", (("style", 1.0), ("detail", 0.7), ("grain", 0.5))),
        ("update", (("style", 0.5),)),
        ("reset",),
        ("update", (("style", 1.0), ("detail", 0.7), ("grain", 0.5))),
    ]
    _touch_later(detail)  # a replaced file is composed again
    applier.apply(())
    applier.apply(three)
    assert len(composed) == 3


def test_nunchaku_applier_turns_failures_into_lora_errors_and_never_keeps_half_a_set(lora_dir):
    def broken(loras):
        raise AssertionError("LoRA weights are in Nunchaku format")

    with pytest.raises(LoRAError, match="cannot compose"):
        NunchakuLoRA(RecordingNunchakuTransformer(), compose=broken).check(lora_dir / "style.safetensors")
    failing = RecordingNunchakuTransformer(fail=True)
    applier = NunchakuLoRA(failing, compose=lambda loras: {"set": "x"})
    with pytest.raises(LoRAError, match="could not load"):
        applier.apply(((lora_dir / "style.safetensors", 1.0),))
    assert failing.calls[-1] == ("reset",) and applier.applied == ()


def test_the_lora_plugin_uses_the_engines_applier(lora_dir):
    from plugins.lora import LoRAPlugin
    from server.config import from_env
    from tests.support.fakes import FakeEngine

    engine = FakeEngine()
    engine.lora_applier = NunchakuLoRA(RecordingNunchakuTransformer(), compose=lambda loras: {"set": "x"})
    plugin = LoRAPlugin(from_env(lora_dir=lora_dir, lora_defaults="style:0.8"), engine)
    plugin.load()
    assert plugin.applier is engine.lora_applier
    engine.apply_loras(plugin.defaults)
    assert engine.lora_applier.transformer.calls == [("update", "x")]
