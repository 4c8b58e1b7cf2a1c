"""GPU fast paths, tested on a machine without a GPU.

What runs for real here: every decision (compute capability -> precision,
refusals, fallback, which file), the detection of the wrong `nunchaku`
package (fake packages laid out as files), the LoRA-set cache keys, the
hot-swapped LoRA slot (against the merged-weights reference), torch.compile
with LoRA sets switching through the real server, and the refusals a CPU
machine gets. What stands in for what cannot run here is said test by test:
fake GPUs (name + compute capability) for the decisions, a recording stand-in
for Nunchaku's transformer and compose_lora, and torchao's weight-only FP8 for
the dynamic FP8 that torchao refuses on a CPU.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from plugins.lora.hotswap import HotswapLoRA, reduce_rank
from plugins.lora.merge import LoRAError, LoRAMerger, weight_shapes
from plugins.lora.sets import SetCache, set_key
from plugins.nunchaku_flux.lora import NunchakuLoRA
from plugins.nunchaku_flux.package import Package, detect, problem
from plugins.nunchaku_flux.plan import Fallback, Plan, Refusal, decide, precision_for
from server.config import from_env
from server.engines.fastpath import (
    GPU,
    FastOptions,
    accelerate,
    check_options,
    choose_attention,
    fp8_refusal,
    fuse_qkv,
)
from tests.conftest import CACHE_DIR, ROOT, ServerProcess
from tests.fake_nunchaku import real_shaped_package, svdq_file, unrelated_package
from tests.helpers import decode_b64, pixels
from tests.lora_files import kohya_lora, peft_lora

# Fake GPUs: what torch.cuda would report (name, compute capability) on each machine.
H100 = GPU("NVIDIA H100 80GB HBM3", (9, 0))
B200 = GPU("NVIDIA B200", (10, 0))
RTX5090 = GPU("NVIDIA GeForce RTX 5090", (12, 0))
RTX4090 = GPU("NVIDIA GeForce RTX 4090", (8, 9))
A100 = GPU("NVIDIA A100-SXM4-80GB", (8, 0))
T4 = GPU("Tesla T4", (7, 5))
V100 = GPU("Tesla V100-SXM2-32GB", (7, 0))

TORCH = "2.13.0"
PY = (3, 11)
REAL = Package("real", "1.2.1+cu12.8torch2.13", "/site/nunchaku")  # a wheel built for the torch in use
ABSENT = Package("absent")
UNRELATED = Package("unrelated", "0.16.1", "/site/nunchaku")


def settings(path, **overrides):
    return from_env(nunchaku_transformer=str(path), **overrides)


@pytest.fixture
def int4_file(tmp_path) -> Path:
    return svdq_file(tmp_path / "svdq-int4_r32-flux.1-dev.safetensors", "int4")


@pytest.fixture
def both(tmp_path) -> Path:
    folder = tmp_path / "nunchaku-flux.1-dev"
    svdq_file(folder / "svdq-int4_r32-flux.1-dev.safetensors", "int4")
    svdq_file(folder / "svdq-fp4_r32-flux.1-dev.safetensors", "fp4")
    return folder


# -- compute capability -> precision -----------------------------------------


@pytest.mark.parametrize(
    ("capability", "precision"),
    [
        ((7, 5), "int4"),
        ((8, 0), "int4"),
        ((8, 6), "int4"),
        ((8, 9), "int4"),
        ((12, 0), "fp4"),
        ((12, 1), "fp4"),
        ((9, 0), None),
        ((10, 0), None),
        ((10, 3), None),
        ((8, 7), None),
        ((7, 0), None),
        ((6, 1), None),
    ],
)
def test_precision_follows_compute_capability(capability, precision):
    assert precision_for(GPU("some GPU", capability)) == precision


def test_no_gpu_has_no_precision():
    assert precision_for(None) is None


# -- refusals and fallback -----------------------------------------------------


@pytest.mark.parametrize("gpu", [H100, B200], ids=["hopper", "b200"])
def test_hopper_and_b200_are_refused_naming_the_gpu_and_the_fp8_path(int4_file, gpu):
    decision = decide(settings(int4_file), gpu, REAL, TORCH, PY)
    assert isinstance(decision, Refusal)
    message = decision.message
    assert gpu.name in message
    assert f"compute capability {gpu.capability[0]}.{gpu.capability[1]}" in message
    assert "FP8=1 COMPILE=1" in message and "bf16" in message
    assert "NUNCHAKU_FALLBACK=fp8" in message


def test_an_old_gpu_is_refused_with_bf16_as_the_way_out(int4_file):
    message = decide(settings(int4_file), V100, REAL, TORCH, PY).message
    assert "Tesla V100" in message and "7.0" in message
    assert "NUNCHAKU_FALLBACK=bf16" in message and "FP8=1" not in message  # no FP8 on a V100 either


@pytest.mark.parametrize(
    ("package", "aside"),
    [
        (ABSENT, "the Nunchaku package is not installed either"),
        (UNRELATED, "unrelated PyPI library"),
        (REAL, None),
    ],
    ids=["absent", "unrelated", "real"],
)
def test_without_a_gpu_the_refusal_says_so_whatever_the_package(int4_file, package, aside):
    message = decide(settings(int4_file), None, package, TORCH, PY).message
    assert message.startswith("NUNCHAKU_TRANSFORMER is set, but this machine has no CUDA GPU")
    assert "NUNCHAKU_FALLBACK=bf16" in message
    if aside:
        assert aside in message
    else:
        assert "Besides" not in message


@pytest.mark.parametrize(
    ("gpu", "to"), [(H100, "fp8"), (B200, "fp8"), (None, "bf16"), (H100, "bf16")], ids=["h100", "b200", "cpu", "bf16"]
)
def test_fallback_is_taken_and_carries_the_reason(int4_file, gpu, to):
    decision = decide(settings(int4_file, nunchaku_fallback=to), gpu, ABSENT, TORCH, PY)
    assert isinstance(decision, Fallback)
    assert decision.to == to
    assert (gpu.name if gpu else "no CUDA GPU") in decision.reason


def test_a_missing_package_falls_back_too_but_configuration_mistakes_never_do(tmp_path, int4_file):
    decision = decide(settings(int4_file, nunchaku_fallback="bf16"), RTX4090, ABSENT, TORCH, PY)
    assert isinstance(decision, Fallback) and "not installed" in decision.reason
    missing = decide(settings(tmp_path / "nope.safetensors", nunchaku_fallback="bf16"), H100, REAL, TORCH, PY)
    assert isinstance(missing, Refusal) and "does not exist" in missing.message
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "without svdq-" in decide(settings(empty, nunchaku_fallback="fp8"), None, REAL, TORCH, PY).message


def test_fp8_or_compile_together_with_nunchaku_is_refused(int4_file):
    for option in ({"fp8": True}, {"compile": True}):
        decision = decide(settings(int4_file, **option), RTX4090, REAL, TORCH, PY)
        assert isinstance(decision, Refusal) and "NUNCHAKU_FALLBACK=fp8" in decision.message


# -- which file -----------------------------------------------------------------


def test_the_int4_file_on_blackwell_is_refused_naming_the_fp4_file(int4_file):
    message = decide(settings(int4_file), RTX5090, REAL, TORCH, PY).message
    assert "svdq-int4_r32-flux.1-dev.safetensors is INT4" in message
    assert "NVIDIA GeForce RTX 5090 (compute capability 12.0) needs FP4" in message
    assert "use svdq-fp4_r32-flux.1-dev.safetensors" in message
    assert "nunchaku-tech/nunchaku-flux.1-dev" in message


def test_the_fp4_file_on_ada_is_refused_naming_the_int4_file(tmp_path):
    fp4 = svdq_file(tmp_path / "svdq-fp4_r32-flux.1-schnell.safetensors", "fp4")
    message = decide(settings(fp4), RTX4090, REAL, TORCH, PY).message
    assert "is FP4" in message and "use svdq-int4_r32-flux.1-schnell.safetensors" in message


def test_the_precision_comes_from_the_files_metadata_not_its_name(tmp_path):
    renamed = svdq_file(tmp_path / "flux-dev-4bit.safetensors", "fp4")
    assert isinstance(decide(settings(renamed), RTX5090, REAL, TORCH, PY), Plan)
    assert "is FP4" in decide(settings(renamed), A100, REAL, TORCH, PY).message
    by_name = svdq_file(tmp_path / "svdq-int4_r32-flux.1-dev.safetensors", "int4", with_metadata=False)
    assert decide(settings(by_name), A100, REAL, TORCH, PY).file == by_name


@pytest.mark.parametrize(("gpu", "precision"), [(RTX5090, "fp4"), (A100, "int4"), (RTX4090, "int4"), (T4, "int4")])
def test_a_folder_with_both_files_gives_the_gpus_precision(both, gpu, precision):
    plan = decide(settings(both), gpu, REAL, TORCH, PY)
    assert isinstance(plan, Plan)
    assert plan.precision == precision
    assert plan.file == both / f"svdq-{precision}_r32-flux.1-dev.safetensors"


def test_turing_runs_fp16_with_nunchakus_fp16_attention(both):
    plan = decide(settings(both), T4, REAL, TORCH, PY)
    assert (plan.dtype, plan.fp16_attention) == ("fp16", True)
    assert plan.notes
    ampere = decide(settings(both), A100, REAL, TORCH, PY)
    assert (ampere.dtype, ampere.fp16_attention) == ("bf16", False)


def test_a_folder_without_the_needed_precision_names_the_missing_file(tmp_path):
    folder = tmp_path / "only-int4"
    svdq_file(folder / "svdq-int4_r32-flux.1-krea-dev.safetensors", "int4")
    message = decide(settings(folder), RTX5090, REAL, TORCH, PY).message
    assert "holds no FP4 file" in message and "svdq-fp4_r32-flux.1-krea-dev.safetensors" in message


def test_the_plan_carries_the_options(both, tmp_path):
    t5 = svdq_file(tmp_path / "awq-int4-flux.1-t5xxl.safetensors", "int4")
    plan = decide(
        settings(both, cache_threshold=0.12, nunchaku_t5=str(t5), cpu_offload=True, nunchaku_fp16_attention=True),
        RTX4090,
        REAL,
        TORCH,
        PY,
    )
    assert (plan.cache_threshold, plan.t5, plan.offload, plan.fp16_attention) == (0.12, t5, True, True)
    assert "NUNCHAKU_T5" in decide(settings(both, nunchaku_t5=str(tmp_path / "x")), A100, REAL, TORCH, PY).message


# -- the package ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("package", "expected"),
    [
        (ABSENT, "not on PyPI"),
        (UNRELATED, "not MIT HAN Lab's Nunchaku"),
        (Package("real", "1.2.1+cu12.8torch2.10", "/site/nunchaku"), "built for torch 2.10, but torch 2.13.0"),
    ],
    ids=["absent", "unrelated", "other-torch"],
)
def test_package_problems_on_a_supported_gpu_are_refused_with_the_way_to_the_wheel(int4_file, package, expected):
    message = decide(settings(int4_file), A100, package, TORCH, PY).message
    assert expected in message
    assert "https://github.com/nunchaku-ai/nunchaku/releases" in message and "cp311" in message
    assert problem(REAL, TORCH, PY) is None


def test_the_unrelated_pypi_package_is_recognised_without_importing_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(unrelated_package(tmp_path / "site")))
    found = detect()
    assert (found.kind, found.version) == ("unrelated", "0.16.1")
    assert "nunchaku" not in sys.modules  # its __init__ would have raised
    assert "detected from its files, without importing it" in problem(found, TORCH, PY)


def test_a_wheel_shaped_package_is_recognised_with_the_torch_it_was_built_for(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(real_shaped_package(tmp_path / "site")))
    found = detect()
    assert (found.kind, found.built_for_torch) == ("real", "2.10")
    assert "nunchaku" not in sys.modules
    assert "built for torch 2.10" in problem(found, TORCH, PY)


def test_no_package_is_absent(tmp_path, monkeypatch):
    if detect().kind != "absent":
        pytest.skip("a nunchaku package is installed in this environment")
    assert "not installed" in problem(detect(), TORCH, PY)


# -- FP8, attention, options: the decisions ----------------------------------------


def test_fp8_needs_compute_capability_8_9():
    assert "no CUDA GPU" in fp8_refusal(None)
    message = fp8_refusal(A100)
    assert "A100" in message and "compute capability 8.0" in message and "NUNCHAKU_TRANSFORMER" in message
    assert fp8_refusal(RTX4090) is None and fp8_refusal(H100) is None and fp8_refusal(B200) is None


def test_options_that_cannot_run_are_all_named():
    problems = check_options(FastOptions(fp8=True, compile=True, offload=True, cache_threshold=-1), None)
    text = " ".join(problems)
    assert len(problems) == 4
    assert "FP8 needs" in text and "CPU_OFFLOAD moves" in text and "do not go together" in text
    assert check_options(FastOptions(fp8=True, compile=True, cache_threshold=0.12), H100) == []


def test_attention_kernel_choice():
    assert choose_attention("auto", H100, fa3=True) == "_flash_3"
    assert choose_attention("auto", H100, fa3=False) == "native"
    assert choose_attention("auto", RTX4090, fa3=True) == "native"  # FA3 is Hopper-only
    assert choose_attention("auto", None, fa3=False) == "native"
    assert choose_attention("flash", H100, fa3=True) == "flash"


def test_lora_slot_only_where_merging_cannot_work():
    assert not FastOptions(lora_rank=64).hotswap_lora  # plain bf16 merges into the weights
    assert FastOptions(fp8=True, lora_rank=64).hotswap_lora
    assert FastOptions(compile=True, lora_rank=64).hotswap_lora
    assert not FastOptions(compile=True, lora_rank=0).hotswap_lora  # no LoRA plugin, no slot
    assert FastOptions.from_settings(from_env(plugins="lora,nsfw", compile=True, lora_hotswap_rank=32)).lora_rank == 32


# -- LoRA sets: cache keys and the Nunchaku applier ----------------------------------


@pytest.fixture
def lora_dir(tmp_path) -> Path:
    d = tmp_path / "loras"
    d.mkdir()
    peft_lora(d / "style.safetensors", seed=1)
    kohya_lora(d / "detail.safetensors", seed=2)
    peft_lora(d / "grain.safetensors", seed=3, prefix="")
    return d


def _touch_later(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_set_keys_name_files_by_stamp_and_keep_weights_and_order(lora_dir):
    style, detail = lora_dir / "style.safetensors", lora_dir / "detail.safetensors"
    key = set_key([(style, 1.0), (detail, 0.5)])
    assert key == set_key([(style, 1), (detail, 0.5)])
    assert key != set_key([(style, 1.0), (detail, 0.6)])
    assert key != set_key([(detail, 0.5), (style, 1.0)])  # composition order is the order of the ranks
    assert set_key([]) == ()
    _touch_later(style)  # replaced under the same name: a new key
    assert key != set_key([(style, 1.0), (detail, 0.5)])


def test_set_cache_is_lru_and_forgets_sets_using_a_file(lora_dir):
    style, detail, grain = (lora_dir / f"{n}.safetensors" for n in ("style", "detail", "grain"))
    cache = SetCache(2)
    builds = []
    for entries in ([(style, 1.0)], [(detail, 1.0)], [(style, 1.0)], [(grain, 1.0)]):
        cache.get(set_key(entries), lambda e=entries: builds.append(e) or len(builds))
    assert len(builds) == 3  # style was served from the cache the second time
    assert set_key([(detail, 1.0)]) not in cache  # least recently used, evicted by grain
    cache.size = 3
    cache.get(set_key([(style, 1.0), (grain, 0.5)]), lambda: "pair")
    cache.forget(grain)  # the file was deleted or replaced: every set that uses it goes
    assert len(cache) == 1 and set_key([(style, 1.0)]) in cache


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
    three = [(style, 1.0), (detail, 0.7), (grain, 0.5)]
    applier.apply(three)
    applier.apply(three)  # the same set again: nothing to do
    applier.apply([(style, 0.5)])
    applier.apply([])
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
    applier.apply([])
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
        applier.apply([(lora_dir / "style.safetensors", 1.0)])
    assert failing.calls[-1] == ("reset",) and applier.applied == ()


def test_the_lora_plugin_uses_the_engines_applier(lora_dir):
    from plugins.lora import LoRAPlugin

    class Engine:
        lora_applier = NunchakuLoRA(RecordingNunchakuTransformer(), compose=lambda loras: {"set": "x"})

    plugin = LoRAPlugin(from_env(lora_dir=lora_dir, lora_defaults="style:0.8"), Engine())
    plugin.load()
    assert plugin.applier is Engine.lora_applier
    plugin.prepare(plugin.defaults)
    assert Engine.lora_applier.transformer.calls == [("update", "x")]


# -- the hot-swapped LoRA slot and FP8, on the demo model (CPU) --------------------------


def demo_pipeline(dtype=torch.float32):
    from diffusers import FluxPipeline

    from server.engines.demo import demo_model_path

    pipe = FluxPipeline.from_pretrained(demo_model_path(CACHE_DIR), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, steps: int = 2) -> np.ndarray:
    with torch.inference_mode():
        out = pipe("a fox", height=64, width=64, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    return np.asarray(out.images[0].convert("RGB"), dtype=np.int16)


def sets(lora_dir: Path) -> list[list[tuple[Path, float]]]:
    style, detail, grain = (lora_dir / f"{n}.safetensors" for n in ("style", "detail", "grain"))
    return [[], [(style, 1.0), (detail, 0.7), (grain, 0.5)], [(detail, -0.6)], [(style, 0.4)], []]


def test_hot_swapped_slot_gives_the_merged_weights_images(lora_dir):
    """The slot (weights baked into A, ranks concatenated, zeros for none) against the reference that merges
    into the weights, set after set: the same images (fp32, to rounding)."""
    reference, fast = demo_pipeline(), demo_pipeline()
    merger = LoRAMerger(reference)
    slot = HotswapLoRA(fast, 16, weight_shapes(fast), torch.float32)
    slot.install()
    base = render(reference)
    for entries in sets(lora_dir):
        merger.apply(entries)
        slot.apply(entries)
        expected, got = render(reference), render(fast)
        assert np.abs(expected - got).max() <= 1, entries
        assert (np.abs(got - base).mean() > 1) == bool(entries)


def test_fused_qkv_gives_the_same_images_and_drops_the_unfused_copies():
    plain, fused = demo_pipeline(), demo_pipeline()
    assert fuse_qkv(fused.transformer) == 2  # the double block's and the single block's attention
    attention = fused.transformer.transformer_blocks[0].attn
    assert hasattr(attention, "to_qkv") and hasattr(attention, "to_added_qkv") and not hasattr(attention, "to_q")
    assert np.abs(render(plain) - render(fused)).max() <= 1


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


def test_fp8_path_with_lora_slot_on_cpu(lora_dir):
    """Stand-in: torchao's Float8DynamicActivationFloat8WeightConfig refuses the CPU (it needs compute capability
    8.9), so this runs the same code path (quantize_ on the transformer's linears, then the LoRA slot on top of the
    FP8 layers, then switching sets) with Float8WeightOnlyConfig, the FP8 config torchao runs on a CPU. It checks
    the path works and stays close to bf16; FP8 speed and the dynamic activation scaling are not tested here."""
    pytest.importorskip("torchao")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, quantize_

    with pytest.raises(AssertionError, match="compute capability"):  # what the real config says on a CPU
        quantize_(
            torch.nn.Sequential(torch.nn.Linear(16, 16)).to(torch.bfloat16), Float8DynamicActivationFloat8WeightConfig()
        )
    reference, fast = demo_pipeline(torch.bfloat16), demo_pipeline(torch.bfloat16)
    merger = LoRAMerger(reference)
    options = FastOptions(fp8=True, lora_rank=16)
    info, slot = accelerate(fast, options, None, torch.bfloat16, fp8_config=Float8WeightOnlyConfig())
    assert info["precision"].startswith("fp8 (Float8WeightOnlyConfig")
    linears = [m for m in fast.transformer.modules() if hasattr(m, "base_layer")]
    assert linears and all(type(m.base_layer.weight).__name__ == "Float8Tensor" for m in linears)
    for entries in sets(lora_dir)[:3]:
        merger.apply(entries)
        slot.apply(entries)
        expected, got = render(reference), render(fast)
        assert np.abs(expected - got).mean() < 6, entries  # FP8 weights: close, not equal


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_fp8_compile_and_lora_slot_switch_sets_without_recompiling(lora_dir, scope):
    """The Hopper recipe's order on the CPU: FP8 linears, the LoRA slot on top, torch.compile(fullgraph) per
    repeated block or of the whole model, then sets switching. Stand-in as above: Float8WeightOnlyConfig for the
    dynamic FP8 config torchao refuses here. Counted by dynamo itself: no new graph through any switch."""
    pytest.importorskip("torchao")
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torchao.quantization import Float8WeightOnlyConfig

    torch._dynamo.reset()
    counters.clear()
    pipe = demo_pipeline(torch.bfloat16)
    options = FastOptions(fp8=True, compile=True, compile_scope=scope, lora_rank=16)
    info, slot = accelerate(pipe, options, None, torch.bfloat16, fp8_config=Float8WeightOnlyConfig())
    suffix = " blocks" if scope == "blocks" else ""
    assert info["compile"] == "torch.compile mode=default fullgraph=True" + suffix
    try:
        base = render(pipe)
        graphs = counters["stats"]["unique_graphs"]
        # The whole model: one graph. Per block: one per block class (at most one more for the first single
        # block's input strides), however many blocks of each class there are.
        assert graphs == 1 if scope == "model" else 2 <= graphs <= 3
        for entries in sets(lora_dir)[1:]:
            slot.apply(entries)
            assert (np.abs(render(pipe) - base).mean() > 1) == bool(entries), entries
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()


def test_first_block_cache_on_the_diffusers_path():
    """diffusers' FirstBlockCacheConfig: with a high threshold the later steps reuse the first step's residual."""
    plain, cached = demo_pipeline(), demo_pipeline()
    info, _ = accelerate(cached, FastOptions(cache_threshold=0.9), None, torch.float32)
    assert info["cache"] == "first-block, threshold 0.9"
    assert cached.transformer.is_cache_enabled
    assert (render(plain, steps=4) != render(cached, steps=4)).any()


@pytest.mark.slow
def test_first_block_cache_under_per_block_compile_matches_eager():
    """CACHE_THRESHOLD with COMPILE (per block, the default): the cache's hooks graph-break, and the image is the
    eager cache's, not the uncached one."""
    plain, eager, compiled = demo_pipeline(), demo_pipeline(), demo_pipeline()
    accelerate(eager, FastOptions(cache_threshold=0.9), None, torch.float32)
    info, _ = accelerate(compiled, FastOptions(compile=True, cache_threshold=0.9), None, torch.float32)
    assert info["compile"] == "torch.compile mode=default fullgraph=False blocks fused-qkv"
    try:
        got = render(compiled, steps=4).astype(float)
        assert np.abs(got - render(eager, steps=4)).mean() < 0.05
        assert np.abs(got - render(plain, steps=4)).mean() > 0.2
    finally:
        torch._dynamo.reset()


# -- the real server on this CPU machine ---------------------------------------------


def exits_with(env: dict[str, str], *expected: str) -> str:
    srv = ServerProcess(env)
    srv.start(wait=False)
    try:
        assert srv.proc.wait(120) == 1
    finally:
        srv.stop()
    logs = srv.logs()
    for text in expected:
        assert text in logs, logs
    return logs


def test_fp8_on_a_cpu_machine_refuses_to_start_with_the_reason():
    exits_with({"FP8": "1"}, "FP8 needs an NVIDIA GPU of compute capability 8.9 or newer", "no CUDA GPU")


def test_an_attention_kernel_that_cannot_run_is_refused():
    exits_with({"ATTENTION": "_flash_3"}, "ATTENTION=_flash_3 cannot run here")


def test_nunchaku_on_a_cpu_machine_refuses_and_names_the_unrelated_package(tmp_path, int4_file):
    site = unrelated_package(tmp_path / "site")
    exits_with(
        {"NUNCHAKU_TRANSFORMER": str(int4_file), "PYTHONPATH": str(site)},
        "this machine has no CUDA GPU",
        "unrelated PyPI library",
    )


def test_nunchaku_fallback_fp8_on_a_cpu_machine_is_refused_saying_why(int4_file):
    exits_with(
        {"NUNCHAKU_TRANSFORMER": str(int4_file), "NUNCHAKU_FALLBACK": "fp8"},
        "FP8 needs an NVIDIA GPU",
        "[fallback: fp8 (NUNCHAKU_FALLBACK): this machine has no CUDA GPU",
    )


def test_nunchaku_fallback_bf16_serves_and_says_so(make_server, int4_file):
    srv = make_server({"NUNCHAKU_TRANSFORMER": str(int4_file), "NUNCHAKU_FALLBACK": "bf16"})
    engine = httpx.get(srv.url + "/v1/models").json()["data"][0]["engine"]
    assert engine["fallback"].startswith("bf16 (NUNCHAKU_FALLBACK): this machine has no CUDA GPU")
    assert {"precision", "attention", "compile", "cache", "offload", "gpu"} <= set(engine)
    result = srv.client(max_retries=0).images.generate(
        prompt="x", size="256x256", extra_body={"num_inference_steps": 2}
    )
    assert decode_b64(result.data[0].b64_json).size == (256, 256)
    assert "NUNCHAKU_FALLBACK=bf16" in srv.logs() and "engine path:" in srv.logs()


@pytest.mark.slow
def test_compiled_transformer_switches_weighted_lora_sets_without_recompiling(make_server, lora_dir):
    """COMPILE=1 with the lora plugin: the hot-swapped slot, torch.compile(fullgraph). After the
    warm-up compiled the graph, five requests switch between sets of 0, 3 and 1 weighted LoRAs; torch logs no
    recompile (TORCH_LOGS=recompiles), and each image equals the one the eager merging server makes."""
    env = {"PLUGINS": "lora", "LORA_DIR": str(lora_dir), "DEFAULT_SIZE": "256x256", "LORA_HOTSWAP_RANK": "16"}
    compiled = make_server({**env, "COMPILE": "1", "TORCH_LOGS": "recompiles"})
    eager = make_server(env)
    engine = httpx.get(compiled.url + "/v1/models").json()["data"][0]["engine"]
    assert engine["compile"] == "torch.compile mode=default fullgraph=True blocks"  # QKV unfused under a LoRA slot
    assert engine["lora"] == "hot-swapped slot of rank 16"
    warm_logs = len(compiled.logs())

    def image(srv, entries):
        body = {"num_inference_steps": 2, "seed": 4, "loras": [{"name": p.stem, "weight": w} for p, w in entries]}
        result = srv.client(max_retries=0).images.generate(
            prompt="a fox", size="256x256", output_format="png", extra_body=body
        )
        return pixels(decode_b64(result.data[0].b64_json))

    base = None
    for entries in sets(lora_dir):
        got, expected = image(compiled, entries), image(eager, entries)
        assert np.abs(got - expected).max() <= 2, entries
        base = got if base is None else base
        assert (np.abs(got - base).mean() > 1) == bool(entries)
    after_warmup = compiled.logs()[warm_logs:]
    assert "hot-swapped" in after_warmup
    assert not re.search(r"[Rr]ecompil", after_warmup), after_warmup
    # The detector is live: a new image size does recompile, and torch says so in the log.
    compiled.client(max_retries=0).images.generate(prompt="x", size="128x128", extra_body={"num_inference_steps": 2})
    assert "Recompiling function" in compiled.logs()[warm_logs:]


def bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_flux", ROOT / "bench" / "gpu_flux.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_builds_flux_dev_at_its_real_size():
    """The benchmark's configs give FLUX.1-dev's parameter counts (built on the meta device: shapes, no memory)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    bench = bench_module()
    with torch.device("meta"):
        parts = {
            "transformer": FluxTransformer2DModel(**bench.FLUX_DEV_TRANSFORMER),
            "vae": AutoencoderKL(**bench.FLUX_DEV_VAE),
            "clip": CLIPTextModel(CLIPTextConfig(**bench.FLUX_DEV_CLIP)),
            "t5": T5EncoderModel(T5Config(**bench.FLUX_DEV_T5)),
        }
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    assert counts == {"transformer": 11_901_408_320, "vae": 83_819_683, "clip": 123_060_480, "t5": 4_762_310_656}


@pytest.mark.slow
def test_gpu_benchmark_script_runs_at_tiny_scale_on_cpu(tmp_path):
    """bench/gpu_flux.py --tiny: the demo-sized FLUX on the CPU, through the same code as the GPU run."""
    out = tmp_path / "bench"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "bench/gpu_flux.py", "--tiny", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (out / "BENCHMARKS.md").read_text()
    assert "## GPU (bench/gpu_flux.py)" in report
    assert "diffusers bf16" in report and "image-server bf16 (HTTP)" in report
    assert "LoRA set switching" in report
    assert (out / "gpu_flux.json").is_file()
    assert time.monotonic() - started < 600
