"""server/engines/fastpath.py: what may run where (fake GPUs), and each fast path applied to the demo model on
the CPU: fused QKV, FP8 (torchao's weight-only FP8 stands in for the dynamic FP8 it refuses on a CPU), the
LoRA slot on top, first-block cache, torch.compile."""

import sys
import types

import numpy as np
import pytest
import torch

from plugins.lora.merge import LoRAMerger
from server.engines.fastpath import (
    FA4_BACKEND,
    AttentionKernels,
    FastOptions,
    accelerate,
    check_options,
    choose_attention,
    flash_refusal,
    fp8_refusal,
    fuse_qkv,
    set_attention,
)
from server.hooks import GPU
from tests.support.demo import demo_pipeline, lora_sets, render, slot, switch

H100 = GPU("NVIDIA H100 80GB HBM3", (9, 0))
B200 = GPU("NVIDIA B200", (10, 0))
RTX5090 = GPU("NVIDIA GeForce RTX 5090", (12, 0))
RTX4090 = GPU("NVIDIA GeForce RTX 4090", (8, 9))
A100 = GPU("NVIDIA A100-SXM4-80GB", (8, 0))
T4 = GPU("Tesla T4", (7, 5))
NONE, FA2, FA3, FA4 = (
    AttentionKernels(),
    AttentionKernels(fa2=True),
    AttentionKernels(fa3=True),
    AttentionKernels(fa4=True),
)


def test_fp8_needs_compute_capability_8_9():
    assert "no CUDA GPU" in fp8_refusal(None)
    message = fp8_refusal(A100)
    assert "A100" in message and "compute capability 8.0" in message and "NUNCHAKU_TRANSFORMER" in message
    assert fp8_refusal(RTX4090) is None and fp8_refusal(H100) is None and fp8_refusal(B200) is None


def test_options_that_cannot_run_are_all_named():
    problems = check_options(FastOptions(fp8=True, compile=True, offload=True, attention="flash"), None, FA4)
    text = " ".join(problems)
    assert len(problems) == 4
    assert "FP8 needs" in text and "CPU_OFFLOAD moves" in text and "do not go together" in text
    assert "ATTENTION=flash cannot run here" in text
    assert check_options(FastOptions(fp8=True, compile=True, cache_threshold=0.12), H100, NONE) == []
    assert check_options(FastOptions(attention="flash"), H100, FA4) == []


def test_attention_kernel_choice():
    assert choose_attention("auto", H100, FA3) == "_flash_3"
    assert choose_attention("auto", H100, NONE) == "native"
    assert choose_attention("auto", H100, FA4) == "native"  # FA4 only when asked for: it compiles at first use
    assert choose_attention("auto", RTX4090, FA3) == "native"  # FA3 is Hopper-only
    assert choose_attention("auto", None, NONE) == "native"
    assert choose_attention("_flash_3", H100, FA3) == "_flash_3"


def test_flash_is_fa4_on_hopper_and_blackwell_else_flash_attn_2():
    for gpu in (H100, B200, RTX5090):
        assert choose_attention("flash", gpu, FA4) == FA4_BACKEND, gpu
        assert choose_attention("flash", gpu, AttentionKernels(fa2=True, fa4=True)) == FA4_BACKEND, gpu
        assert flash_refusal(gpu, FA4) is None
    for gpu in (A100, RTX4090):  # FA4 is not for Ampere and Ada: flash-attn 2 there
        assert choose_attention("flash", gpu, AttentionKernels(fa2=True, fa4=True)) == "flash"
        assert flash_refusal(gpu, FA2) is None
    assert choose_attention("flash", H100, FA2) == "flash"  # an image built with --flash-attn only


def test_flash_that_cannot_run_says_what_is_missing():
    assert flash_refusal(None, FA4).endswith("this machine has no CUDA GPU.")
    on_ampere = flash_refusal(A100, FA4)
    assert "ATTENTION=flash cannot run here" in on_ampere and "./build.sh --flash-attn" in on_ampere
    assert on_ampere.endswith("NVIDIA A100-SXM4-80GB (compute capability 8.0) and flash-attn-4.")
    assert flash_refusal(H100, NONE).endswith("and neither package.")
    assert flash_refusal(T4, FA2).endswith("Tesla T4 (compute capability 7.5) and flash-attn 2.")  # FA2: Ampere+


def test_flash_runs_the_installed_fa4_through_diffusers(monkeypatch, fa4_backend_allowed):
    """ATTENTION=flash on Hopper: the installed FA4's flash_attn_func takes the place of the kernel diffusers'
    flash_4_hub backend would download, computes every attention of the transformer, and nothing is downloaded.
    Stand-ins for what cannot run here: FA4's kernel (CuTe DSL, GPU only) is PyTorch SDPA behind FA4's signature,
    and diffusers' check that the `kernels` package is installed answers yes (it is in the CUDA locks, not in this
    CPU venv; scripts/check-cuda-image.sh sets this backend inside the CUDA image with the real packages)."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):  # FA4's: (batch, sequence, heads, head_dim)
        calls.append(tuple(q.shape))
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale, is_causal=causal
        )
        return out.transpose(1, 2), None  # FA4 returns (out, lse)

    expected, flash = render(demo_pipeline()), demo_pipeline()  # before: the backend becomes the process's default
    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func
    with monkeypatch.context() as imports:  # only while the backend is set: other imports look for flash_attn too
        imports.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
        imports.setitem(sys.modules, "flash_attn.cute", cute)
        imports.setitem(sys.modules, "kernels", None)  # a download imports kernels.get_kernel: it would fail
        label = set_attention(flash.transformer, choose_attention("flash", H100, FA4), "flash")
    assert label == "flash (FlashAttention 4)" and not calls
    assert np.abs(expected - render(flash)).max() <= 1
    assert calls and all(len(shape) == 4 for shape in calls)


@pytest.fixture
def fa4_backend_allowed(monkeypatch):
    """diffusers' flash_4_hub backend as an image with the `kernels` package has it, put back afterwards."""
    from diffusers.models import attention_dispatch as dispatch

    monkeypatch.setattr(dispatch, "is_kernels_available", lambda: True)
    monkeypatch.setattr(dispatch, "is_kernels_version", lambda *_: True)
    monkeypatch.setattr(dispatch._HUB_KERNELS_REGISTRY[dispatch.AttentionBackendName.FLASH_4_HUB], "kernel_fn", None)
    # set_attention_backend also sets diffusers' process-wide default: the other tests must get theirs back
    monkeypatch.setattr(
        dispatch._AttentionBackendRegistry, "_active_backend", dispatch._AttentionBackendRegistry._active_backend
    )


def test_fused_qkv_gives_the_same_images_and_drops_the_unfused_copies():
    plain, fused = demo_pipeline(), demo_pipeline()
    assert fuse_qkv(fused.transformer) == 2  # the double block's and the single block's attention
    attention = fused.transformer.transformer_blocks[0].attn
    assert hasattr(attention, "to_qkv") and hasattr(attention, "to_added_qkv") and not hasattr(attention, "to_q")
    assert np.abs(render(plain) - render(fused)).max() <= 1


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
    info, applier = accelerate(fast, FastOptions(fp8=True), None, torch.bfloat16, slot(fast), Float8WeightOnlyConfig())
    assert info["precision"].startswith("fp8 (Float8WeightOnlyConfig")
    linears = [m for m in fast.transformer.modules() if hasattr(m, "base_layer")]
    assert linears and all(type(m.base_layer.weight).__name__ == "Float8Tensor" for m in linears)
    for entries in lora_sets(lora_dir)[:3]:
        switch(merger, entries)
        switch(applier, entries)
        expected, got = render(reference), render(fast)
        assert np.abs(expected - got).mean() < 6, entries  # FP8 weights: close, not equal


def test_first_block_cache_on_the_diffusers_path():
    """diffusers' FirstBlockCacheConfig: with a high threshold the later steps reuse the first step's residual."""
    plain, cached = demo_pipeline(), demo_pipeline()
    info, _ = accelerate(cached, FastOptions(cache_threshold=0.9), None, torch.float32)
    assert info["cache"] == "first-block, threshold 0.9"
    assert cached.transformer.is_cache_enabled
    assert (render(plain, steps=4) != render(cached, steps=4)).any()


def family_pipeline(demo: str):
    from server.engines.demos import demo_model_path
    from server.engines.diffusers import load_pipeline
    from tests.support.server import CACHE_DIR

    pipe = load_pipeline(demo_model_path(CACHE_DIR, demo), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def family_render(pipe) -> np.ndarray:
    arguments = {"num_frames": 5} if "Wan" in type(pipe).__name__ else {}
    with torch.inference_mode():
        out = pipe(prompt="a fox", height=64, width=64, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), output_type="np", **arguments)  # fmt: skip
    return np.asarray(out.frames if arguments else out.images)


@pytest.mark.parametrize("demo", ["flux2", "qwen-image", "z-image", "wan2.2", "glm-image"])
def test_fp8_and_the_lora_slot_run_on_every_family(demo):
    """FP8 (torchao's weight-only stand-in, as above) and the LoRA slot on each family's transformer: it generates,
    close to the plain weights. (torch.compile of Qwen-Image and Z-Image was run by hand: 86 s and 126 s to
    compile on this CPU; too slow for the suite.)"""
    pytest.importorskip("torchao")
    from torchao.quantization import Float8WeightOnlyConfig

    plain, fast = family_pipeline(demo), family_pipeline(demo)
    info, applier = accelerate(fast, FastOptions(fp8=True), None, torch.float32, slot(fast), Float8WeightOnlyConfig())
    assert info["precision"].startswith("fp8") and applier.describe().startswith("hot-swapped")
    assert np.abs(family_render(plain) - family_render(fast)).mean() < 0.05


@pytest.mark.parametrize(("demo", "cached"), [("qwen-image", True), ("wan2.2", True), ("z-image", False),
                                              ("glm-image", False)])  # fmt: skip
def test_first_block_cache_runs_where_diffusers_has_it_and_is_refused_where_not(demo, cached):
    pipe = family_pipeline(demo)
    if cached:
        info, _ = accelerate(pipe, FastOptions(cache_threshold=0.2), None, torch.float32)
        assert info["cache"] == "first-block, threshold 0.2" and family_render(pipe).size
        return
    with pytest.raises(SystemExit, match=f"CACHE_THRESHOLD.*{type(pipe.transformer).__name__}"):
        accelerate(pipe, FastOptions(cache_threshold=0.2), None, torch.float32)


def test_a_second_transformer_is_refused_by_the_fast_paths():
    """Wan 2.2 A14B's low-noise expert (transformer_2) is not covered by FP8, compile, the cache or the slot."""
    pipe = family_pipeline("wan2.2")
    pipe.register_modules(transformer_2=pipe.transformer)
    with pytest.raises(SystemExit, match="transformer_2"):
        accelerate(pipe, FastOptions(cache_threshold=0.2), None, torch.float32)
    assert accelerate(pipe, FastOptions(), None, torch.float32)[1] is None  # plain: served as it is
