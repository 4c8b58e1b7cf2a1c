"""server/lora.py: reading LoRA files strictly and within bounds, the range check, the cache the engine thread
reads from, and the all-or-nothing rule every applier shares."""

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from plugins.lora.merge import LoRAMerger
from server import lora
from server.hooks import LoRAApplier
from server.lora import (
    FLOAT_DTYPES,
    MAX_WEIGHT,
    MOST_LORAS,
    LoRAError,
    LoRASet,
    ParsedFiles,
    largest_change,
    parse_lora,
    set_key,
)
from tests.support.demo import demo_pipeline, switch
from tests.support.loras import (
    ODD_KINDS,
    SAFETENSORS_DTYPES,
    UNKNOWN_DTYPES,
    dtype_lora,
    foreign_lora,
    half_broken_lora,
    kohya_lora,
    metadata_lora,
    odd_lora,
    peft_lora,
    raw_safetensors,
    scaled_lora,
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
        with pytest.raises(LoRAError, match=why) as refused:
            parse_lora(pipe, path)
        assert str(tmp_path) not in str(refused.value)  # what a caller may see names no path


@pytest.mark.parametrize("dtype", SAFETENSORS_DTYPES + UNKNOWN_DTYPES)
def test_every_dtype_a_safetensors_file_may_hold_is_read_or_refused_by_name(pipe, tmp_path, dtype):
    """Before: F8_E4M3 was a 500 (torch has no isfinite for it), F8_E8M0 (exponent-only scales) was merged as
    weights, F4 and unknown names were safetensors' own words."""
    path = dtype_lora(tmp_path / "x.safetensors", dtype)
    if dtype in FLOAT_DTYPES:
        layers = parse_lora(pipe, path)
        assert layers and all(layer.down.dtype == torch.float32 for layer in layers.values())
        return
    with pytest.raises(LoRAError, match=f"holds {dtype} values; a LoRA's weights are floating point"):
        parse_lora(pipe, path)


def test_a_header_past_its_bounds_is_refused_before_any_parser_reads_it(pipe, tmp_path, monkeypatch):
    """90 MB of `__metadata__` froze the whole server for 22 s (safetensors parses a header of up to 100 MB
    holding the GIL). Now the header's length, its tensor count and the adapter metadata are bounded first:
    safetensors never sees such a file, and json reads no header over the bound."""
    monkeypatch.setattr(lora, "load_file", lambda *a: pytest.fail("safetensors parsed a file past the bounds"))
    claims = tmp_path / "claims.safetensors"
    claims.write_bytes((2**40).to_bytes(8, "little") + b"{}")  # says 1 TiB: refused from its first 8 bytes
    many = raw_safetensors(tmp_path / "many.safetensors", {f"t{i}": ("F32", [0], 0) for i in range(8193)})
    adapter = {"lora_adapter_metadata": '{"pad": "' + "x" * 70_000 + '"}'}
    big_adapter = raw_safetensors(tmp_path / "adapter.safetensors", {"t": ("F32", [1], 4)}, adapter)
    for path, why in [
        (metadata_lora(tmp_path / "metadata.safetensors", 3 * 2**20), r"header is \d\.\d MiB, more than the 2 MiB"),
        (claims, "header is 1048576.0 MiB"),
        (many, "more than 8192 tensors"),
        (big_adapter, "lora_adapter_metadata is larger than 64 KiB"),
    ]:
        with pytest.raises(LoRAError, match=why):
            parse_lora(pipe, path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_accepted_lora_merges_to_finite_weights_at_the_largest_weight(tmp_path, dtype):
    """A file just inside the bound, MOST_LORAS copies of it at weight MAX_WEIGHT, merges finite; four times
    louder it is refused. Before, a finite file whose product overflowed merged to inf: all-black images."""
    pipe = demo_pipeline(dtype)
    reference = parse_lora(pipe, peft_lora(tmp_path / "reference.safetensors", seed=1), dtype=dtype)
    limit = torch.finfo(dtype).max / (2 * MOST_LORAS * MAX_WEIGHT)
    edge = 0.9 * limit / max(largest_change(layer) for layer in reference.values())  # scales B: linear in it
    copies = tuple((scaled_lora(tmp_path / f"edge{i}.safetensors", edge), MAX_WEIGHT) for i in range(MOST_LORAS))
    switch(LoRAMerger(pipe, dtype=dtype), copies)
    assert all(bool(torch.isfinite(p).all()) for p in pipe.transformer.parameters())
    with pytest.raises(LoRAError, match=f"too large.*{str(dtype).removeprefix('torch.')}"):
        parse_lora(pipe, scaled_lora(tmp_path / "loud.safetensors", 4 * edge), dtype=dtype)


def test_the_bound_holds_where_float32_norms_would_overflow(pipe, tmp_path):
    """Values near float32's largest: their squares overflow float32, so the norms are taken in float64."""
    path = scaled_lora(tmp_path / "near.safetensors", 1e37)
    with pytest.raises(LoRAError, match="too large"):
        parse_lora(pipe, path)
    assert math.isfinite(
        largest_change(
            parse_lora(pipe, peft_lora(tmp_path / "fine.safetensors", seed=1))[
                ("transformer", "transformer_blocks.0.attn.to_q")
            ]
        )
    )


def test_parsed_files_read_each_file_once_per_stamp_and_never_on_the_engines_side(tmp_path):
    """`parse` (workers) fills the cache once for any number of concurrent callers; `parsed` (the engine
    thread) only reads it: a file replaced or deleted since is a LoRAError naming the LoRA, never a path."""
    calls: list[str] = []
    files = ParsedFiles(lambda p: calls.append(threading.current_thread().name) or p.read_bytes())
    path = tmp_path / "style.safetensors"
    path.write_bytes(b"one")
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(files.parse, [path] * 8)) == [b"one"] * 8
    assert len(calls) == 1 and files.parsed(path) == b"one" and len(calls) == 1
    path.write_bytes(b"two!")
    with pytest.raises(LoRAError, match="'style' was replaced after the request was accepted"):
        files.parsed(path)
    assert files.parse(path) == b"two!" and files.parsed(path) == b"two!" and len(calls) == 2
    path.unlink()
    for read in (files.parsed, files.parse):
        with pytest.raises(LoRAError, match="'style' was deleted or cannot be read") as gone:
            read(path)
        assert str(tmp_path) not in str(gone.value)


def test_a_files_verdict_is_kept_and_a_read_error_is_not(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"x")
    reads: list[Path] = []

    def broken(p: Path) -> bytes:
        reads.append(p)
        raise LoRAError("broken at layer 3")

    verdicts = ParsedFiles(broken)
    for _ in range(20):
        with pytest.raises(LoRAError, match="broken at layer 3") as refused:
            verdicts.parse(path)
    assert len(reads) == 1  # the file's verdict, kept while its stamp holds
    assert len(list(_frames(refused.value))) < 10  # raised anew each time: a re-raised one grows its traceback
    reads.clear()

    def flaky(p: Path) -> bytes:
        reads.append(p)
        raise PermissionError(13, "Permission denied", str(p))

    unreadable = ParsedFiles(flaky)
    for _ in range(2):
        with pytest.raises(LoRAError, match="'bad' was deleted or cannot be read") as refused:
            unreadable.parse(path)
        assert str(tmp_path) not in str(refused.value)
    assert len(reads) == 2  # not the file's verdict: tried again


def _frames(exc: BaseException):
    tb = exc.__traceback__
    while tb is not None:
        yield tb
        tb = tb.tb_next


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
