"""The diffusers engine's fast paths: FP8, torch.compile, the attention kernel, first-block cache, CPU offload.

What may run where is decided by pure functions of the settings, the GPU and
the attention packages installed (`check_options`, `fp8_refusal`,
`flash_refusal`, `choose_attention`), so it is tested without a GPU;
`accelerate` then applies the choices to a loaded pipeline, in the only order
that works:

  attention kernel -> fused QKV (compile without a LoRA slot) -> FP8 (torchao
  quantizes the fused linears) -> LoRA slot (PEFT wraps the FP8 linears; the
  slot itself stays bf16; the LoRA plugin provides it) -> first-block cache ->
  torch.compile (last: it sees the final modules)

The Nunchaku 4-bit path is another backend (plugins/nunchaku_flux, a pipeline
provider); it shares `GPU` (server/hooks.py) and the refusal style with this module.
"""

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch

from server.hooks import FP8_MIN_CAPABILITY, GPU, LoRAApplier

log = logging.getLogger(__name__)


def detect_gpu(device: torch.device) -> GPU | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return GPU(torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))


@dataclass(frozen=True)
class FastOptions:
    """The fast-path settings of one engine (a Nunchaku fallback may have switched some on)."""

    fp8: bool = False
    compile: bool = False
    compile_mode: str = "default"
    compile_scope: str = "blocks"
    attention: str = "auto"
    cache_threshold: float = 0.0
    offload: bool = False

    @classmethod
    def from_settings(cls, settings) -> "FastOptions":
        return cls(
            fp8=settings.fp8,
            compile=settings.compile,
            compile_mode=settings.compile_mode,
            compile_scope=settings.compile_scope,
            attention=settings.attention,
            cache_threshold=settings.cache_threshold,
            offload=settings.cpu_offload,
        )

    def with_fallback(self, fp8: bool, compile: bool) -> "FastOptions":
        """A pipeline provider that cannot run here asked for this path instead (NUNCHAKU_FALLBACK)."""
        return dataclasses.replace(self, fp8=fp8, compile=compile)


@dataclass(frozen=True)
class AttentionKernels:
    """The attention packages installed here (whether this GPU runs them is `choose_attention`'s question)."""

    fa2: bool = False  # flash-attn 2, compiled into images built with --flash-attn: diffusers' "flash"
    fa3: bool = False  # flash_attn_3, built from flash-attention's hopper/ folder: "_flash_3"
    fa4: bool = False  # flash-attn-4, the CuTe DSL package of the CUDA image (no compiled code: it JITs)


def installed_kernels() -> AttentionKernels:
    from diffusers.utils import is_flash_attn_3_available, is_flash_attn_available

    return AttentionKernels(is_flash_attn_available(), is_flash_attn_3_available(), installed("flash-attn-4"))


def installed(distribution: str) -> bool:
    try:
        version(distribution)
    except PackageNotFoundError:
        return False
    return True


# FlashAttention 4 is written for Hopper (9.x) and Blackwell (10.x, 11.x, 12.x); flash-attn 2 for Ampere and newer.
FA4_MAJORS = (9, 10, 11, 12)
FA2_MIN_CAPABILITY = (8, 0)
# diffusers runs FA4 as its flash_4_hub backend, whose kernel it would download from the Hub: `use_installed_fa4`
# hands it the installed package's function instead.
FA4_BACKEND = "flash_4_hub"


def flash_refusal(gpu: GPU | None, kernels: AttentionKernels) -> str | None:
    """Why ATTENTION=flash cannot run here, or None when FA4 or flash-attn 2 can."""
    need = (
        "ATTENTION=flash cannot run here: it needs FlashAttention 4 (flash-attn-4, in the CUDA image) on a Hopper or "
        "Blackwell GPU, or flash-attn 2 (images built with ./build.sh --flash-attn) on Ampere or newer"
    )
    if gpu is None:
        return f"{need}, and this machine has no CUDA GPU."
    if fa4_runs(gpu, kernels) or (kernels.fa2 and gpu.capability >= FA2_MIN_CAPABILITY):
        return None
    present = [name for name, there in (("flash-attn-4", kernels.fa4), ("flash-attn 2", kernels.fa2)) if there]
    return f"{need}; this machine has {gpu.describe()} and {' and '.join(present) or 'neither package'}."


def fa4_runs(gpu: GPU | None, kernels: AttentionKernels) -> bool:
    return kernels.fa4 and gpu is not None and gpu.capability[0] in FA4_MAJORS


def fp8_refusal(gpu: GPU | None) -> str | None:
    """Why FP8 cannot run here, or None when it can."""
    if gpu is None:
        return (
            "FP8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell), and this machine "
            "has no CUDA GPU: torchao refuses FP8 dynamic quantization on the CPU. Unset FP8."
        )
    if gpu.capability < FP8_MIN_CAPABILITY:
        return (
            f"FP8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell); {gpu.describe()} has no FP8 "
            "tensor cores. Unset FP8 to run bf16 here, or use Nunchaku's int4 FLUX (NUNCHAKU_TRANSFORMER), "
            "which runs on Turing, Ampere and Ada."
        )
    return None


def check_options(options: FastOptions, gpu: GPU | None, kernels: AttentionKernels) -> list[str]:
    """Every reason these options cannot run on this machine (empty: they can)."""
    problems = []
    if options.fp8 and (why := fp8_refusal(gpu)):
        problems.append(why)
    if options.attention == "flash" and (why := flash_refusal(gpu, kernels)):
        problems.append(why)
    if options.offload and gpu is None:
        problems.append("CPU_OFFLOAD moves each model onto the GPU when it runs, and this machine has no CUDA GPU.")
    if options.offload and options.compile:
        problems.append(
            "CPU_OFFLOAD and COMPILE do not go together: offloading moves the weights at every call, which a "
            "compiled graph cannot follow. Choose one (offload for small GPUs, compile for speed)."
        )
    return problems


def choose_attention(setting: str, gpu: GPU | None, kernels: AttentionKernels) -> str:
    """The diffusers attention backend. auto: FlashAttention 3 on Hopper where installed, else PyTorch SDPA
    ("native"). flash: FlashAttention 4 where it runs (Hopper, Blackwell), else flash-attn 2."""
    if setting == "flash" and fa4_runs(gpu, kernels):
        return FA4_BACKEND
    if setting != "auto":
        return setting
    if gpu is not None and gpu.capability[0] == 9 and kernels.fa3:
        return "_flash_3"
    return "native"


def use_installed_fa4() -> str:
    """Put the installed FA4 where diffusers' flash_4_hub backend keeps the kernel it downloads, so nothing is
    downloaded (the Hub's flash-attn4 kernel is built from the same package, with the same function). That slot is
    private to diffusers: tests/unit/test_fastpath.py fails when a diffusers upgrade moves it. Returns the label."""
    from diffusers.models.attention_dispatch import _HUB_KERNELS_REGISTRY, AttentionBackendName
    from flash_attn.cute import flash_attn_func

    _HUB_KERNELS_REGISTRY[AttentionBackendName.FLASH_4_HUB].kernel_fn = flash_attn_func
    return "flash (FlashAttention 4)"


def set_attention(model, backend: str, setting: str) -> str:
    """Put `backend` in place; an explicit setting that cannot run stops the server, "auto" falls back to SDPA."""
    if backend == "native":
        return "native (PyTorch SDPA)"  # diffusers' default: nothing to set
    try:
        label = use_installed_fa4() if backend == FA4_BACKEND else backend
        model.set_attention_backend(backend)
    except (RuntimeError, ValueError, ImportError) as exc:
        if setting != "auto":
            raise SystemExit(f"ATTENTION={setting} cannot run here: {exc}") from None
        log.warning("attention backend %s is not usable (%s); using PyTorch SDPA", backend, exc)
        model.set_attention_backend("native")  # also resets diffusers' global active backend
        return "native (PyTorch SDPA)"
    return label


def fuse_qkv(transformer) -> int:
    """Fuse each attention's q/k/v (and added q/k/v) projections into one matmul; returns how many were fused.

    diffusers keeps the unfused copies, which doubles those weights (about 4 GB in bf16 for FLUX.1);
    FLUX's attention never reads them once fused, so they are dropped there."""
    try:
        transformer.fuse_qkv_projections()
    except (ValueError, AttributeError) as exc:
        log.info("QKV projections not fused: %s", exc)
        return 0
    fused = [m for m in transformer.modules() if getattr(m, "fused_projections", False)]
    for module in fused:
        if type(module).__name__ != "FluxAttention":
            continue
        for part in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            if getattr(module, part, None) is not None:
                delattr(module, part)
    return len(fused)


def quantize_fp8(transformer, dtype: torch.dtype, config=None) -> str:
    """FP8 weights and activations on the transformer's linear layers (torchao); returns the precision label.

    `config` replaces the dynamic FP8 config: the CPU tests pass Float8WeightOnlyConfig, the only FP8
    config torchao runs on a CPU."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_
    except ImportError:
        raise SystemExit("FP8 needs torchao: pip install 'image-server[gpu]' (torchao 0.18).") from None
    if config is None:
        granularity = PerRow() if dtype == torch.bfloat16 else PerTensor()  # per-row scales need bf16 weights
        config = Float8DynamicActivationFloat8WeightConfig(granularity=granularity)
    quantize_(transformer, config)
    # torchao swaps quantized weights for tensor subclasses (Float8Tensor); layers it skips keep plain ones
    quantized = sum(
        1
        for m in transformer.modules()
        if isinstance(m, torch.nn.Linear) and type(m.weight) not in (torch.Tensor, torch.nn.Parameter)
    )
    log.info("FP8: %d linear layers quantized with %s", quantized, type(config).__name__)
    return f"fp8 ({type(config).__name__}, {quantized} linear layers)"


def compile_transformer(transformer, options: FastOptions) -> str:
    """torch.compile in place; returns how, for /v1/models."""
    # diffusers' first-block cache calls a torch.compiler.disable()d hook: whole-graph capture fails with it.
    fullgraph = options.cache_threshold <= 0
    mode = None if options.compile_mode == "default" else options.compile_mode
    how = f"torch.compile mode={options.compile_mode} fullgraph={fullgraph}"
    # Regional compilation: FLUX's 57 blocks are two classes, so inductor compiles a graph per class, not one
    # graph of 57 blocks. On an H100 with FP8: 5.4 min to ready instead of 8.8, 3% slower per image (BENCHMARKS.md).
    if options.compile_scope == "blocks" and getattr(transformer, "_repeated_blocks", None):
        transformer.compile_repeated_blocks(fullgraph=fullgraph, mode=mode)
        return how + " blocks"
    transformer.compile(fullgraph=fullgraph, mode=mode)
    return how


def enable_first_block_cache(transformer, threshold: float) -> str:
    """diffusers' first-block cache, where diffusers has it for this transformer's blocks (else the reason)."""
    from diffusers import FirstBlockCacheConfig
    from diffusers.models.cache_utils import CacheMixin

    name = type(transformer).__name__
    if not isinstance(transformer, CacheMixin):
        raise SystemExit(f"CACHE_THRESHOLD: diffusers has no cache for {name}; unset CACHE_THRESHOLD.")
    try:
        transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    except ValueError as exc:  # its block class is not in diffusers' block registry
        raise SystemExit(f"CACHE_THRESHOLD: diffusers' first-block cache cannot run on {name} ({exc}).") from None
    return f"first-block, threshold {threshold:g}"


def accelerate(
    pipe,
    options: FastOptions,
    gpu: GPU | None,
    dtype: torch.dtype,
    lora_applier: Callable[[], LoRAApplier | None] = lambda: None,
    fp8_config=None,
) -> tuple[dict, LoRAApplier | None]:
    """Apply the fast paths to a loaded pipeline. `lora_applier` asks the plugins how LoRA sets will get into
    the weights (merged, or a slot it installs after FP8 and before compilation). Returns (info for
    /v1/models, the applier or None)."""
    transformer = getattr(pipe, "transformer", None)
    info: dict = {"attention": "native (PyTorch SDPA)", "compile": False, "cache": None}
    applier = lora_applier()
    asked = options.fp8 or options.compile or options.cache_threshold or options.attention != "auto"
    if transformer is None and asked:
        raise SystemExit(
            f"FP8, COMPILE, CACHE_THRESHOLD and ATTENTION need a transformer; {type(pipe).__name__} has none."
        )
    if transformer is None:
        return info, applier
    if pipe.components.get("transformer_2") is not None and (asked or applier is not None):
        raise SystemExit(
            f"{type(pipe).__name__} has a second transformer (transformer_2: Wan 2.2 A14B's low-noise expert), which "
            "FP8, COMPILE, CACHE_THRESHOLD, ATTENTION and the LoRA slot do not cover; serve it without them."
        )
    backend = choose_attention(options.attention, gpu, installed_kernels() if gpu else AttentionKernels())
    info["attention"] = set_attention(transformer, backend, options.attention)
    # Under a LoRA slot QKV stays unfused: a fused to_qkv would triple the slot rank it needs there.
    fused = fuse_qkv(transformer) if options.compile and applier is None else 0
    if options.fp8:
        info["precision"] = quantize_fp8(transformer, dtype, fp8_config)
    if applier is not None:
        applier.install()
        info["lora"] = applier.describe()
    if options.cache_threshold > 0:
        info["cache"] = enable_first_block_cache(transformer, options.cache_threshold)
    if options.compile:
        info["compile"] = compile_transformer(transformer, options) + (" fused-qkv" if fused else "")
    return info, applier
