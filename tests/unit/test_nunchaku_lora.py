"""plugins/nunchaku_flux/lora.py: weighted LoRA sets through Nunchaku's own LoRA API.

Recording stand-ins replace NunchakuFluxTransformer2dModel's LoRA methods, to_diffusers and compose_lora (there
is no Nunchaku without a CUDA GPU); the header bounds, the range check, the set keys, the caches and the
all-or-nothing rule run for real.
"""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from plugins.nunchaku_flux.lora import NunchakuLoRA, SetCache
from server.lora import LoRAError, set_key
from tests.support.demo import switch


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


def convert(path: Path) -> dict:
    """Stands in for nunchaku's to_diffusers: the file's tensors, and a marker naming it for the assertions."""
    return {**load_file(str(path)), f"{path.stem}.marker": torch.zeros(1)}


def names(loras) -> tuple:
    """What a composed set was made of: (file, weight) pairs, from the markers `convert` left."""
    return tuple((next(k for k in state if k.endswith(".marker")).removesuffix(".marker"), w) for state, w in loras)


def nunchaku(transformer=None, compose=lambda loras: {"set": "x"}) -> NunchakuLoRA:
    return NunchakuLoRA(transformer or RecordingNunchakuTransformer(), convert=convert, compose=compose)


def test_nunchaku_applier_composes_each_set_once_and_resets_for_none(lora_dir):
    composed = []

    def compose(loras):  # stands in for nunchaku.lora.flux.compose.compose_lora
        composed.append(names(loras))
        return {"set": names(loras)}

    transformer = RecordingNunchakuTransformer()
    applier = nunchaku(transformer, compose)
    style, detail, grain = (lora_dir / f"{n}.safetensors" for n in ("style", "detail", "grain"))
    three = ((style, 1.0), (detail, 0.7), (grain, 0.5))
    switch(applier, three)
    switch(applier, three)  # the same set again: nothing to do
    switch(applier, ((style, 0.5),))
    switch(applier, ())
    switch(applier, three)  # composed before: from the cache
    assert composed == [(("style", 1.0), ("detail", 0.7), ("grain", 0.5)), (("style", 0.5),)]
    assert transformer.calls == [
        ("update", (("style", 1.0), ("detail", 0.7), ("grain", 0.5))),
        ("update", (("style", 0.5),)),
        ("reset",),
        ("update", (("style", 1.0), ("detail", 0.7), ("grain", 0.5))),
    ]
    _touch_later(detail)  # a replaced file is converted and composed again
    switch(applier, ())
    with pytest.raises(LoRAError, match="'detail' was replaced"):
        applier.apply(three)  # not checked since: the engine thread reads no file
    switch(applier, three)
    assert len(composed) == 3


def test_nunchaku_applier_turns_failures_into_lora_errors_and_never_keeps_half_a_set(lora_dir):
    def broken(path):
        raise AssertionError(f"Key {path}.lora_A not found in new tensors.")

    with pytest.raises(LoRAError, match="cannot convert") as refused:
        NunchakuLoRA(RecordingNunchakuTransformer(), convert=broken).check(lora_dir / "style.safetensors")
    assert str(lora_dir) not in str(refused.value)
    failing = RecordingNunchakuTransformer(fail=True)
    applier = nunchaku(failing)
    with pytest.raises(LoRAError, match="could not load"):
        switch(applier, ((lora_dir / "style.safetensors", 1.0),))
    assert failing.calls[-1] == ("reset",) and applier.applied == ()


def test_nunchaku_refuses_a_lora_that_would_overflow_its_dtype(lora_dir, tmp_path):
    """Converted, finite, but at weight 10 its product leaves fp16: refused when checked, before any set."""
    state = load_file(str(lora_dir / "style.safetensors"))
    path = tmp_path / "loud.safetensors"
    save_file({k: v * 100 for k, v in state.items()}, str(path))
    with pytest.raises(LoRAError, match="too large"):
        NunchakuLoRA(RecordingNunchakuTransformer(), torch.float16, convert=convert).check(path)
    NunchakuLoRA(RecordingNunchakuTransformer(), torch.bfloat16, convert=convert).check(path)  # bf16 holds it


async def _no_decode(*_):
    raise AssertionError("this test parses no upload")


def test_the_lora_plugin_uses_the_engines_applier(lora_dir):
    from plugins.lora import LoRAPlugin
    from server.config import from_env
    from tests.support.fakes import FakeEngine

    engine = FakeEngine()
    engine.lora_applier = nunchaku()
    plugin = LoRAPlugin(from_env(lora_dir=lora_dir, lora_defaults="style:0.8"))
    plugin.load(engine.view(decode=_no_decode))
    assert plugin.applier is engine.lora_applier
    engine.apply_loras(plugin.defaults)
    assert engine.lora_applier.transformer.calls == [("update", "x")]
