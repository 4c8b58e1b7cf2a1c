"""The in-process engine: a diffusers pipeline on this process's GPU (or CPU).

Text-to-image, image-to-image and inpainting share one set of weights: the
img2img and inpaint pipelines are built with `from_pipe`, which reuses the
loaded components. Only the engine thread calls into the pipelines.
"""

import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from server.config import Settings
from server.engines.fastpath import FastOptions, accelerate, check_options, detect_gpu
from server.errors import APIError
from server.spec import GenerationSpec

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Pipelines whose negative prompt only acts through "true CFG" (FLUX, Qwen-Image).
DEFAULT_TRUE_CFG = 4.0


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def model_folder(settings: Settings) -> Path:
    if settings.model == "demo":
        from server.engines.demo import demo_model_path

        return demo_model_path(settings.cache_dir)
    path = Path(settings.model).expanduser()
    if not (path / "model_index.json").is_file():
        raise SystemExit(
            f"MODEL_PATH={settings.model!r} is not a diffusers model folder (no model_index.json). "
            "Point --model at a local folder such as one saved by `huggingface-cli download "
            "black-forest-labs/FLUX.1-dev --local-dir ...`, or use --model demo."
        )
    return path


def load_pipeline(path: Path, dtype: torch.dtype, **components):
    import transformers
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        return AutoPipelineForText2Image.from_pretrained(path, dtype=dtype, **components)
    except ValueError as exc:  # a pipeline class AutoPipeline does not map: load it as it is
        log.info("AutoPipelineForText2Image cannot load %s (%s); using DiffusionPipeline", path, exc)
        return DiffusionPipeline.from_pretrained(path, dtype=dtype, **components)


def _derived(factory, pipe):
    try:
        return factory.from_pipe(pipe)
    except (ValueError, KeyError, TypeError) as exc:
        log.info("no %s for %s: %s", factory.__name__, type(pipe).__name__, exc)
        return None


class DiffusersEngine:
    can_batch = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.max_batch = settings.max_batch
        self.pipelines: dict[str, object] = {}
        self._params: dict[str, set[str]] = {}
        self.name = settings.model_name or ("flux-demo" if settings.model == "demo" else Path(settings.model).name)
        self.info: dict = {"engine": "diffusers", "device": str(self.device), "precision": str(self.dtype)[6:]}
        self.lora_applier = None  # set by a fast path whose weights LoRAMerger cannot merge into
        self.compiled = False

    # -- loading ---------------------------------------------------------

    def load(self) -> None:
        if not self.settings.allow_download:
            os.environ["HF_HUB_OFFLINE"] = "1"
        path = model_folder(self.settings)
        gpu = detect_gpu(self.device)
        self.info.update(gpu=gpu.describe() if gpu else None, offload=None, fallback=None)
        settings = self.settings
        if settings.nunchaku_transformer:
            from plugins import nunchaku_flux

            choice = nunchaku_flux.choose(settings, gpu)  # SystemExit: Nunchaku cannot run and no fallback is set
            if isinstance(choice, nunchaku_flux.Plan):
                self._load_nunchaku(choice, path)
                return
            settings = nunchaku_flux.fallback_settings(settings, choice)
            self.info["fallback"] = f"{choice.to} (NUNCHAKU_FALLBACK): {choice.reason}"
        self._load_diffusers(FastOptions.from_settings(settings), gpu, path)

    def _load_diffusers(self, options: FastOptions, gpu, path: Path) -> None:
        problems = check_options(options, gpu)
        if problems:
            raise SystemExit(
                " ".join(problems) + (f" [fallback: {self.info['fallback']}]" if self.info["fallback"] else "")
            )
        log.info("loading %s on %s as %s", path, self.device, self.dtype)
        pipe = load_pipeline(path, self.dtype)
        self.use_pipeline(pipe, offload="model" if options.offload else "")
        info, self.lora_applier = accelerate(pipe, options, gpu, self.dtype)
        if self.lora_applier is None and "lora" in self.settings.plugin_names:
            info["lora"] = "merged into the weights per set"
        self.compiled = options.compile
        self.info.update(info, offload="model CPU offload" if options.offload else None)
        self._log_path()

    def _load_nunchaku(self, plan, path: Path) -> None:
        from plugins import nunchaku_flux

        self.dtype = torch.float16 if plan.dtype == "fp16" else torch.bfloat16
        pipe = nunchaku_flux.build_pipeline(plan, path, self.device, load_pipeline)
        self.use_pipeline(pipe, offload="sequential" if plan.offload else "")
        info, self.lora_applier = nunchaku_flux.finish(plan, self.pipelines)
        self.info.update(info)
        self._log_path()

    def _log_path(self) -> None:
        keys = ("gpu", "precision", "attention", "compile", "cache", "offload", "fallback")
        log.info("engine path: %s", "; ".join(f"{k}={self.info.get(k)}" for k in keys))

    def use_pipeline(self, pipe, offload: str = "") -> None:
        """Adopt a built text-to-image pipeline (the GPU fast paths build their own).

        offload: "" (everything on the device), "model" or "sequential" (diffusers' CPU offload)."""
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        if offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipelines = {"text2img": pipe}
        for mode, factory in (("img2img", AutoPipelineForImage2Image), ("inpaint", AutoPipelineForInpainting)):
            derived = _derived(factory, pipe)
            if derived is not None:
                derived.set_progress_bar_config(disable=True)
                self.pipelines[mode] = derived
        self._params = {m: set(inspect.signature(p.__call__).parameters) for m, p in self.pipelines.items()}
        self.info.update(pipeline=type(pipe).__name__, modes=sorted(self.pipelines))

    @property
    def pipe(self):
        return self.pipelines["text2img"]

    def defaults(self) -> tuple[int, float]:
        """(steps, guidance) when a request names none: the pipeline's own, 4 and 0 for FLUX schnell."""
        signature = inspect.signature(self.pipe.__call__).parameters
        steps = signature["num_inference_steps"].default if "num_inference_steps" in signature else 28
        guidance = signature["guidance_scale"].default if "guidance_scale" in signature else 0.0
        transformer = getattr(self.pipe, "transformer", None)
        if "Flux" in type(self.pipe).__name__ and not getattr(transformer.config, "guidance_embeds", True):
            steps, guidance = 4, 0.0  # FLUX.1-schnell: timestep-distilled, no guidance
        return int(steps), float(guidance)

    def warmup(self) -> None:
        width, height = 256, 256
        if self.compiled:  # torch.compile specialises on the first shape: compile for the size most requests use
            width, height = (int(side) for side in self.settings.default_size.lower().split("x"))
        spec = GenerationSpec(prompt="warm up", n=1, width=width, height=height, steps=2, guidance=0.0, seeds=[0])
        self.generate([spec], lambda: False)

    # -- generation (engine thread only) ---------------------------------

    def generate(self, specs: list[GenerationSpec], should_stop: Callable[[], bool]) -> list[list[Image.Image]]:
        head = specs[0]
        pipe = self.pipelines.get(head.mode)
        if pipe is None:
            raise APIError(
                400, f"This model ({self.info['pipeline']}) does not support {head.mode}.", code="unsupported"
            )
        per_image = [(s, seed) for s in specs for seed in s.seeds]
        images: list[Image.Image] = []
        for start in range(0, len(per_image), self.max_batch):
            images += self._call(head.mode, pipe, per_image[start : start + self.max_batch], should_stop)
        out, at = [], 0
        for s in specs:
            out.append(images[at : at + s.n])
            at += s.n
        return out

    def _call(self, mode: str, pipe, chunk: list[tuple[GenerationSpec, int]], should_stop) -> list[Image.Image]:
        head = chunk[0][0]
        params = self._params[mode]
        kwargs = {
            "prompt": [s.prompt for s, _ in chunk],
            "height": head.height,
            "width": head.width,
            "num_inference_steps": head.steps,
            "guidance_scale": head.guidance,
            "generator": [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk],
            "output_type": "pil",
        }
        if head.negative_prompt is not None:
            kwargs["negative_prompt"] = [head.negative_prompt] * len(chunk)
            if "true_cfg_scale" in params:
                kwargs["true_cfg_scale"] = head.true_cfg if head.true_cfg is not None else DEFAULT_TRUE_CFG
        if mode != "text2img":
            kwargs["image"] = [s.image for s, _ in chunk]
            if head.strength is not None:
                kwargs["strength"] = head.strength
        if mode == "inpaint":
            kwargs["mask_image"] = [s.mask for s, _ in chunk]
        if "callback_on_step_end" in params:
            kwargs["callback_on_step_end"] = _stopper(should_stop)
        kwargs = {k: v for k, v in kwargs.items() if k in params}
        with torch.inference_mode():
            return list(pipe(**kwargs).images)


def _stopper(should_stop: Callable[[], bool]):
    """Skips the remaining denoising steps once every waiter of the batch has gone."""

    def on_step_end(pipe, step, timestep, callback_kwargs):
        if should_stop():
            pipe._interrupt = True
        return {}

    return on_step_end
