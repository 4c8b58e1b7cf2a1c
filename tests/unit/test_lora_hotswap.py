"""plugins/lora/hotswap.py: the fixed-rank LoRA slot for FP8/compiled transformers, against the merged-weights
reference on the demo model."""

import numpy as np
import pytest
import torch

from plugins.lora.hotswap import HotswapLoRA, reduce_rank
from plugins.lora.merge import LoRAMerger
from server.lora import LoRAError, weight_shapes
from tests.support.demo import demo_pipeline, lora_sets, render, switch


def test_hot_swapped_slot_gives_the_merged_weights_images(lora_dir):
    """The slot (weights baked into A, ranks concatenated, zeros for none) against the reference that merges
    into the weights, set after set: the same images (fp32, to rounding)."""
    reference, fast = demo_pipeline(), demo_pipeline()
    merger = LoRAMerger(reference)
    slot = HotswapLoRA(fast, 16, weight_shapes(fast), torch.float32)
    slot.install()
    base = render(reference)
    for entries in lora_sets(lora_dir):
        switch(merger, entries)
        switch(slot, entries)
        expected, got = render(reference), render(fast)
        assert np.abs(expected - got).max() <= 1, entries
        assert (np.abs(got - base).mean() > 1) == bool(entries)


def test_rank_reduction_is_exact_within_the_rank_and_the_best_beyond():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(40, 3, generator=g) @ torch.randn(3, 48, generator=g)  # true rank 3, written with rank 9:
    up = torch.cat([low[:, :3], torch.zeros(40, 6)], dim=1)
    down_full = torch.linalg.lstsq(up[:, :3], low).solution
    down = torch.cat([down_full, torch.randn(6, 48, generator=g)])
    new_down, new_up, error = reduce_rank(down, up, 4)
    assert error < 1e-6 and torch.allclose(new_up @ new_down, up @ down, atol=1e-4)
    up, down = torch.randn(40, 12, generator=g), torch.randn(12, 48, generator=g)
    new_down, new_up, error = reduce_rank(down, up, 5)
    best = torch.linalg.svd(up @ down)
    truncated = best.U[:, :5] @ torch.diag(best.S[:5]) @ best.Vh[:5]
    assert new_down.shape == (5, 48) and new_up.shape == (40, 5)
    assert torch.allclose(new_up @ new_down, truncated, atol=1e-3)
    assert error == pytest.approx(float(best.S[5:].norm() / best.S.norm()), rel=1e-4)


def test_a_lora_bias_is_refused_by_the_slot(tmp_path):
    from safetensors.torch import save_file

    pipe = demo_pipeline()
    slot = HotswapLoRA(pipe, 8, weight_shapes(pipe), torch.float32)
    slot.install()
    path = tmp_path / "biased.safetensors"
    name = "transformer.transformer_blocks.0.attn.to_out.0"
    save_file(
        {
            f"{name}.lora_A.weight": torch.ones(2, 8),
            f"{name}.lora_B.weight": torch.ones(8, 2),
            f"{name}.lora_B.bias": torch.ones(8),
        },
        str(path),
    )
    with pytest.raises(LoRAError, match="bias"):
        slot.check(path)


def test_a_switch_writes_only_the_layers_that_change_and_a_failed_one_leaves_the_base(lora_dir, monkeypatch):
    """A switch copies the new set's layers and zeroes the ones only the previous set touched, nothing else.
    A write that fails halfway (a device error, injected) leaves every slot tensor zero: the base model."""
    pipe = demo_pipeline()
    slot = HotswapLoRA(pipe, 16, weight_shapes(pipe), torch.float32)
    slot.install()
    base = render(pipe)
    detail, style = lora_sets(lora_dir)[2:4]
    switch(slot, detail)
    detail_layers = set(slot.written)
    copied: list[int] = []
    real_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: copied.append(len(dst)) or real_copy(dst, src))
    switch(slot, style)
    assert copied == [2 * len(slot.written)] and slot.written != detail_layers
    assert not any(slot.slot[name][0].any() for name in detail_layers - slot.written)

    def fail_halfway(dst, src):
        real_copy(dst[: len(dst) // 2], src[: len(src) // 2])
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "_foreach_copy_", fail_halfway)
    with pytest.raises(RuntimeError, match="illegal memory"):
        switch(slot, lora_sets(lora_dir)[1])
    assert slot.applied == () and not slot.broken
    assert not any(tensor.any() for pair in slot.slot.values() for tensor in pair)
    assert np.array_equal(render(pipe), base)
