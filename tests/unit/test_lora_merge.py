"""plugins/lora/merge.py: weighted sets merged into the demo pipeline's weights, restored bit for bit, and
never left half-merged."""

import pytest
import torch

from plugins.lora import merge
from plugins.lora.merge import LoRAMerger
from server.lora import LoRAError
from tests.support.demo import demo_pipeline, switch
from tests.support.loras import half_broken_lora, kohya_lora, peft_lora


def weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def pipe():
    return demo_pipeline()


def test_sets_switch_and_the_base_comes_back_exactly(pipe, tmp_path):
    base = weights(pipe)
    style, detail = peft_lora(tmp_path / "s.safetensors", seed=1), kohya_lora(tmp_path / "d.safetensors", seed=2)
    merger = LoRAMerger(pipe)
    switch(merger, ((style, 1.0), (detail, 0.7)))
    both = weights(pipe)
    assert not same(both, base)
    switch(merger, ((style, 1.0),))
    assert not same(weights(pipe), both)
    switch(merger, ((style, 1.0), (detail, 0.7)))
    assert same(weights(pipe), both)  # the same set twice: the same weights
    switch(merger, ())
    assert same(weights(pipe), base)


def test_a_file_broken_at_its_end_changes_no_weight(pipe, tmp_path):
    """Refused by the check; and a set whose file was never checked is refused by apply, which reads no file."""
    merger = LoRAMerger(pipe)
    good = peft_lora(tmp_path / "good.safetensors", seed=1)
    switch(merger, ((good, 1.0),))
    applied = weights(pipe)
    bad = half_broken_lora(tmp_path / "bad.safetensors", "rank")
    with pytest.raises(LoRAError, match="rank"):
        merger.check(bad)
    with pytest.raises(LoRAError, match="replaced after the request was accepted"):
        merger.apply(((good, 1.0), (peft_lora(tmp_path / "unchecked.safetensors", seed=2), 1.0)))
    assert same(weights(pipe), demo_pipeline_weights())  # the base, not a half-merged set
    switch(merger, ((good, 1.0),))
    assert same(weights(pipe), applied)


def test_a_write_that_fails_half_way_restores_every_weight(pipe, tmp_path, monkeypatch):
    """A failure no file check can foresee (out of memory on the GPU, say) in the middle of the merge."""
    merger = LoRAMerger(pipe)
    base = weights(pipe)
    calls = {"n": 0}
    product = merge._product

    def failing(layer, part, device):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("CUDA out of memory")
        return product(layer, part, device)

    monkeypatch.setattr(merge, "_product", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        switch(merger, ((peft_lora(tmp_path / "a.safetensors", seed=1), 1.0),))
    assert calls["n"] == 5 and same(weights(pipe), base)
    assert merger.applied == () and not merger.broken


def demo_pipeline_weights() -> dict:
    return weights(demo_pipeline())
