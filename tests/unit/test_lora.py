"""server/lora.py: reading LoRA files strictly, and the all-or-nothing rule every applier shares."""

from pathlib import Path

import pytest
import torch

from server.lora import LoRAApplier, LoRAError, LoRASet, parse_lora, set_key
from tests.support.demo import demo_pipeline
from tests.support.loras import (
    ODD_KINDS,
    foreign_lora,
    half_broken_lora,
    kohya_lora,
    odd_lora,
    peft_lora,
    wrong_shape_lora,
)


@pytest.fixture(scope="module")
def pipe():
    return demo_pipeline()


def test_the_formats_people_ship_parse(pipe, tmp_path):
    peft = parse_lora(pipe, peft_lora(tmp_path / "peft.safetensors", seed=1))
    bare = parse_lora(pipe, peft_lora(tmp_path / "bare.safetensors", seed=1, prefix=""))
    assert peft.keys() == bare.keys() and len(peft) == 11
    kohya = parse_lora(pipe, kohya_lora(tmp_path / "kohya.safetensors", seed=2))
    assert all(component == "transformer" for component, _ in kohya)


@pytest.mark.parametrize("kind", ODD_KINDS)
def test_files_that_would_fail_later_are_refused_now(pipe, tmp_path, kind):
    with pytest.raises(LoRAError):
        parse_lora(pipe, odd_lora(tmp_path / f"{kind}.safetensors", kind))


@pytest.mark.parametrize("broken", ["rank", "bias", "nan"])
def test_a_file_broken_in_its_last_layer_is_refused_whole(pipe, tmp_path, broken):
    with pytest.raises(LoRAError):
        parse_lora(pipe, half_broken_lora(tmp_path / f"{broken}.safetensors", broken))


def test_foreign_wrong_shape_and_garbage_files_are_refused(pipe, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}')
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(peft_lora(tmp_path / "whole.safetensors", seed=1).read_bytes()[:-40])
    for path, why in [
        (foreign_lora(tmp_path / "foreign.safetensors"), "matches no layer"),
        (wrong_shape_lora(tmp_path / "shape.safetensors"), "does not fit"),
        (garbage, "not a readable"),
        (truncated, "not a readable"),
    ]:
        with pytest.raises(LoRAError, match=why):
            parse_lora(pipe, path)


class Recording(LoRAApplier):
    """An applier whose writes can fail: what the base class does with a failure."""

    def __init__(self, fail_apply: bool = False, fail_reset: bool = False) -> None:
        super().__init__()
        self.fail_apply, self.fail_reset = fail_apply, fail_reset
        self.state: LoRASet = ()
        self.resets = 0

    def check(self, path: Path) -> None:
        pass

    def _apply(self, loras: LoRASet) -> None:
        self.state = loras  # half-written...
        if self.fail_apply:
            raise RuntimeError("out of memory")

    def _reset(self) -> None:
        self.resets += 1
        if self.fail_reset:
            raise RuntimeError("cannot restore")
        self.state = ()


def test_a_failed_set_leaves_the_base_model_and_true_bookkeeping(tmp_path):
    one = ((peft_lora(tmp_path / "a.safetensors", seed=1), 1.0),)
    applier = Recording()
    applier.apply(one)
    assert applier.applied == set_key(one)
    applier.fail_apply = True
    with pytest.raises(RuntimeError):
        applier.apply(((one[0][0], 0.5),))
    assert applier.state == () and applier.applied == () and not applier.broken
    applier.fail_apply = False
    applier.apply(one)  # not skipped: the bookkeeping says the base is applied, not `one`
    assert applier.state == one


def test_an_undo_that_fails_marks_the_applier_broken(tmp_path):
    applier = Recording(fail_apply=True, fail_reset=True)
    with pytest.raises(RuntimeError):
        applier.apply(((peft_lora(tmp_path / "a.safetensors", seed=1), 1.0),))
    assert applier.broken and applier.applied is None


def test_a_replaced_file_is_another_set(tmp_path):
    path = peft_lora(tmp_path / "a.safetensors", seed=1)
    before = set_key(((path, 1.0),))
    peft_lora(path, seed=2, rank=2)
    assert set_key(((path, 1.0),)) != before
    assert torch.is_tensor(parse_lora(demo_pipeline(), path)[("transformer", "transformer_blocks.0.attn.to_q")].down)
