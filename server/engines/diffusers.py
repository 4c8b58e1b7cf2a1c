"""The in-process engine: a diffusers pipeline on this process's GPU (or CPU).

Text-to-image, image-to-image and inpainting share one set of weights: the img2img and inpaint pipelines
are built with `from_pipe`, which reuses the loaded components. A plugin may build the pipeline instead
(Nunchaku's 4-bit FLUX) and says how LoRA sets get into the weights; the engine asks through its hooks.
"""

import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from server.config import Settings
from server.engines.base import Engine, EngineHooks, Fallback, LoRATarget, PipelineContext, Progress, ProvidedPipeline
from server.engines.compile_cache import CompileCache
from server.engines.fastpath import FastOptions, accelerate, check_options, detect_gpu, installed_kernels
from server.engines.previews import PreviewDecoder, predicted_clean, preview_steps
from server.errors import bad_request
from server.lora import weight_shapes
from server.spec import GenerationSpec

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Pipelines whose negative prompt only acts through "true CFG" (FLUX, Qwen-Image).
DEFAULT_TRUE_CFG = 4.0

# A request field -> the pipeline argument it needs.
_ARGUMENTS = {"negative_prompt": "negative_prompt", "true_cfg_scale": "true_cfg_scale", "strength": "strength"}


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
    """The pipeline in `path`, with `components` given instead of loaded (a plugin's transformer)."""
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


class DiffusersEngine(Engine):
    """`build` loads a pipeline (path, dtype, **components); benchmarks hand in one built in memory."""

    def __init__(self, settings: Settings, build: Callable[..., object] = load_pipeline) -> None:
        super().__init__()
        self.settings = settings
        self.build = build
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.max_batch = settings.max_batch
        self.pipelines: dict[str, object] = {}
        self.previews: PreviewDecoder | None = None
        self._params: dict[str, set[str]] = {}
        self.name = settings.model_name or ("flux-demo" if settings.model == "demo" else Path(settings.model).name)
        self.info = {"engine": "diffusers", "device": str(self.device), "precision": str(self.dtype)[6:]}
        self.compiled = False
        self.compile_cache: CompileCache | None = None

    # -- loading ---------------------------------------------------------

    def load(self, hooks: EngineHooks) -> None:
        if not self.settings.allow_download:
            os.environ["HF_HUB_OFFLINE"] = "1"
        path = model_folder(self.settings)
        gpu = detect_gpu(self.device)
        self.info.update(gpu=gpu.describe() if gpu else None, offload=None, fallback=None)
        provided = hooks.provide_pipeline(PipelineContext(path, self.device, gpu, self.settings, self.build))
        if isinstance(provided, ProvidedPipeline):
            self._adopt_provided(provided)
            return
        options = FastOptions.from_settings(self.settings)
        if isinstance(provided, Fallback):
            options = options.with_fallback(provided.fp8, provided.compile)
            self.info["fallback"] = provided.reason
        self._load_diffusers(options, gpu, path, hooks)

    def _load_diffusers(self, options: FastOptions, gpu, path: Path, hooks: EngineHooks) -> None:
        problems = check_options(options, gpu, installed_kernels())
        if problems:
            fallback = f" [fallback: {self.info['fallback']}]" if self.info["fallback"] else ""
            raise SystemExit(" ".join(problems) + fallback)
        log.info("loading %s on %s as %s", path, self.device, self.dtype)
        pipe = self.build(path, self.dtype)
        self.use_pipeline(pipe, offload="model" if options.offload else "")
        mergeable = not (options.fp8 or options.compile)  # FP8 weights and compiled graphs take a slot instead
        target = LoRATarget(pipe, mergeable, weight_shapes(pipe), self.dtype)
        if options.compile and str(self.settings.compile_cache_dir) not in ("", "."):
            identity = (str(gpu), repr(options), str(path), self.settings.default_size, str(self.dtype))
            self.compile_cache = CompileCache(self.settings.compile_cache_dir, *identity)
            self.compile_cache.load()
        info, self.lora_applier = accelerate(pipe, options, gpu, self.dtype, lambda: hooks.lora_applier(target))
        self.compiled = options.compile
        self.info.update(info, offload="model CPU offload" if options.offload else None)
        self._log_path()

    def _adopt_provided(self, provided: ProvidedPipeline) -> None:
        self.dtype = provided.dtype
        self.use_pipeline(provided.pipe, offload=provided.offload)
        provided.finish(self.pipelines)
        self.lora_applier = provided.lora_applier
        self.info.update(provided.info, precision=provided.info.get("precision", str(self.dtype)[6:]))
        self._log_path()

    def _log_path(self) -> None:
        keys = ("gpu", "precision", "attention", "compile", "cache", "offload", "fallback", "lora")
        log.info("engine path: %s", "; ".join(f"{k}={self.info.get(k)}" for k in keys))

    def use_pipeline(self, pipe, offload: str = "") -> None:
        """Adopt a built text-to-image pipeline; offload: "", "model" or "sequential" (diffusers' CPU offload)."""
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
        self.previews = _preview_decoder(pipe, self.settings.preview_decoder)
        self.info.update(
            pipeline=type(pipe).__name__,
            modes=sorted(self.pipelines),
            previews=self.previews.kind if self.previews else None,
        )

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
        self.generate([spec], Progress())
        if self.compile_cache is not None:  # everything the warm-up compiled, for the next start
            self.info["compile_cache"] = self.compile_cache.save()

    # -- requests --------------------------------------------------------

    def check(self, spec: GenerationSpec) -> None:
        """What this pipeline cannot do is a 400 before the request queues, never a silently dropped field."""
        if spec.mode not in self.pipelines:
            raise bad_request(
                f"This model ({self.info['pipeline']}) does not support {spec.mode}.", "image", "unsupported"
            )
        params = self._params[spec.mode]
        given = {"negative_prompt": spec.negative_prompt, "true_cfg_scale": spec.true_cfg, "strength": spec.strength}
        for field, value in given.items():
            if value is not None and _ARGUMENTS[field] not in params:
                raise bad_request(
                    f"'{field}' is not supported by this model ({self.info['pipeline']}).", field, "unsupported"
                )
        if "guidance_scale" not in params and spec.guidance != self.defaults()[1]:
            raise bad_request(
                f"'guidance_scale' is not supported by this model ({self.info['pipeline']}).",
                "guidance_scale",
                "unsupported",
            )

    # -- generation (engine thread only) ---------------------------------

    def generate(self, specs: list[GenerationSpec], progress: Progress) -> list[list[Image.Image]]:
        head = specs[0]
        pipe = self.pipelines[head.mode]
        per_image = [Row(i, j, s, seed) for i, s in enumerate(specs) for j, seed in enumerate(s.seeds)]
        images: list[Image.Image] = []
        for start in range(0, len(per_image), self.max_batch):
            images += self._call(head.mode, pipe, per_image[start : start + self.max_batch], progress)
        out, at = [], 0
        for s in specs:
            out.append(images[at : at + s.n])
            at += s.n
        return out

    def _call(self, mode: str, pipe, rows: list["Row"], progress: Progress) -> list[Image.Image]:
        chunk = [(row.spec, row.seed) for row in rows]
        head = chunk[0][0]
        kwargs = {
            "prompt": [s.prompt for s, _ in chunk],
            "height": head.height,
            "width": head.width,
            "num_inference_steps": head.steps,
            "generator": [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk],
            "output_type": "pil",
            **_optional_arguments(head, self._params[mode]),
        }
        if mode != "text2img":
            kwargs["image"] = [s.image for s, _ in chunk]
        if mode == "inpaint":
            kwargs["mask_image"] = [s.mask for s, _ in chunk]
        if "negative_prompt" in kwargs:
            kwargs["negative_prompt"] = [head.negative_prompt] * len(chunk)
        watcher = StepWatcher(progress, rows, self.previews)
        if "callback_on_step_end" in self._params[mode]:
            kwargs["callback_on_step_end"] = watcher
        with torch.inference_mode():
            images = list(pipe(**kwargs).images)
        if watcher.stopped_after:
            log.info("batch stopped after %d of %d steps: nobody waits for it", watcher.stopped_after, head.steps)
        return images


def _optional_arguments(spec: GenerationSpec, params: set[str]) -> dict:
    """The arguments only some pipelines take (`check` refused the request if it needs one that is missing)."""
    kwargs = {}
    if "guidance_scale" in params:
        kwargs["guidance_scale"] = spec.guidance
    if spec.negative_prompt is not None:
        kwargs["negative_prompt"] = spec.negative_prompt
        if "true_cfg_scale" in params:
            kwargs["true_cfg_scale"] = spec.true_cfg if spec.true_cfg is not None else DEFAULT_TRUE_CFG
    elif spec.true_cfg is not None:
        kwargs["true_cfg_scale"] = spec.true_cfg
    if spec.strength is not None:
        kwargs["strength"] = spec.strength
    return kwargs


def _preview_decoder(pipe, kind: str) -> PreviewDecoder | None:
    """Previews need FLUX-style packed latents and a VAE; other pipelines stream completed images only."""
    if not (hasattr(pipe, "_unpack_latents") and getattr(pipe, "vae", None) is not None):
        return None
    return PreviewDecoder(pipe, kind)


@dataclass(frozen=True)
class Row:
    """One image of a batch: its spec's index in the batch, its index in the spec, the spec, its seed."""

    spec_index: int
    image_index: int
    spec: GenerationSpec
    seed: int


class StepWatcher:
    """The pipeline's step callback (engine thread): stops the batch once every waiter has gone, and hands
    over the previews its streamed requests asked for."""

    def __init__(self, progress: Progress, rows: list[Row], decoder: PreviewDecoder | None) -> None:
        self.progress = progress
        self.rows = rows
        self.decoder = decoder
        self.wanted: dict[int, list[int]] = {}  # step -> rows that want a preview after it
        if progress.preview is not None and decoder is not None:
            for index, row in enumerate(rows):
                for step in preview_steps(row.spec.steps, row.spec.previews):
                    self.wanted.setdefault(step, []).append(index)
        self.before: torch.Tensor | None = None  # the latents before the next preview's step
        self.stopped_after = 0

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if self.progress.should_stop():
            pipe._interrupt = True
            self.stopped_after = step + 1
            return {}
        if not self.wanted:
            return {}
        done, latents = step + 1, callback_kwargs["latents"]
        if done in self.wanted and self.before is not None:
            self._hand_over(predicted_clean(pipe.scheduler, self.before, latents), self.wanted[done])
        self.before = latents.clone() if done + 1 in self.wanted else None
        return {}

    def _hand_over(self, clean: torch.Tensor, indices: list[int]) -> None:
        for index in indices:
            row = self.rows[index]
            render = self.decoder.render(clean[index].clone(), row.spec.width, row.spec.height)
            self.progress.preview(row.spec_index, row.image_index, render)
