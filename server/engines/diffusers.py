"""The in-process engine: a diffusers pipeline on this process's GPU (or CPU).

The model's family (server/families.py, found from its model_index.json) says its defaults, how guidance and
negative prompts reach the pipeline, its size multiple, and what it does from an input image. Text-to-image (or
-video), edits and inpainting share one set of weights: the other modes' pipelines are built with `from_pipe`,
which reuses the loaded components (the family's own edit pipeline, or diffusers' AutoPipeline img2img and
inpaint where it has them). A plugin may build the pipeline instead (Nunchaku's 4-bit FLUX) and says how LoRA
sets get into the weights; the engine asks through its hooks.
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
from server.engines.base import Engine, Progress
from server.engines.compile_cache import CompileCache
from server.engines.fastpath import FastOptions, accelerate, check_options, detect_gpu, installed_kernels
from server.engines.partial_images import PreviewDecoder, decoder_problem, partial_image_steps, predicted_clean
from server.errors import bad_request
from server.families import (
    CFG,
    GENERIC,
    NONE,
    TRUE_CFG,
    Family,
    detect_family,
    true_cfg_weight,
)
from server.hooks import EngineHooks, EnginePath, LoRATarget, PipelineContext, ProvidedPipeline
from server.lora import weight_shapes
from server.spec import GenerationSpec

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# What a mode needs from the request, named in a refusal.
_MODE_FIELDS = {"text2img": "image", "img2img": "image", "inpaint": "mask"}


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def model_folder(settings: Settings) -> Path:
    from server.engines.demos import demo_model_path, demo_name

    demo = demo_name(settings.model)
    if demo is not None:
        return demo_model_path(settings.cache_dir, demo)
    path = Path(settings.model).expanduser()
    if not (path / "model_index.json").is_file():
        raise SystemExit(
            f"MODEL_PATH={settings.model!r} is not a diffusers model folder (no model_index.json). "
            "Point --model at a local folder such as one saved by `huggingface-cli download "
            "black-forest-labs/FLUX.1-dev --local-dir ...`, or use --model demo (or demo:FAMILY)."
        )
    return path


def load_pipeline(path: Path, dtype: torch.dtype, **components):
    """The pipeline in `path`, with `components` given instead of loaded (a plugin's transformer). A processor that
    transformers builds only with torchvision, where it is missing, is loaded as its stand-in (processors.py) and
    set after: diffusers checks a component given to from_pretrained against the class the folder names, which is
    then transformers' placeholder."""
    import transformers
    from diffusers.utils import logging as diffusers_logging

    from server.engines.processors import processor_components

    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    processors = processor_components(path)
    pipe = _from_pretrained(path, dtype, **components, **dict.fromkeys(processors))
    for name, processor in processors.items():
        setattr(pipe, name, processor)
    return pipe


def _from_pretrained(path: Path, dtype: torch.dtype, **components):
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

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


def served_name(settings: Settings) -> str:
    """The model id in /v1/models: MODEL_NAME, else `flux-demo` / `FAMILY-demo`, else the folder's name."""
    from server.engines.demos import DEFAULT, demo_name

    demo = demo_name(settings.model)
    if settings.model_name:
        return settings.model_name
    if demo is None:
        return Path(settings.model).name
    return "flux-demo" if demo == DEFAULT else f"{demo}-demo"


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
        self.unserved: dict[str, str] = {}  # mode -> why this server does not serve it (a setting's doing)
        self.preview_decoder: PreviewDecoder | None = None
        self._params: dict[str, set[str]] = {}
        self.name = served_name(settings)
        self.info = {"engine": "diffusers", "device": str(self.device), "precision": str(self.dtype)[6:]}
        self.compiled = False
        self.compile_cache: CompileCache | None = None

    # -- loading ---------------------------------------------------------

    def load(self, hooks: EngineHooks) -> None:
        if not self.settings.allow_download:
            os.environ["HF_HUB_OFFLINE"] = "1"
        path = model_folder(self.settings)
        self.family = detect_family(path)
        gpu = detect_gpu(self.device)
        self.info.update(family=self.family.name, gpu=gpu.describe() if gpu else None, offload=None, fallback=None)
        context = PipelineContext(path, self.device, gpu, self.settings, self.build, self.family)
        provided = hooks.provide_pipeline(context)
        if isinstance(provided, ProvidedPipeline):
            self._adopt_provided(provided)
            return
        options = FastOptions.from_settings(self.settings)
        if isinstance(provided, EnginePath):
            options = options.with_fallback(provided.fp8, provided.compile)
            self.info["fallback"] = provided.reason
        self._load_diffusers(options, gpu, path, hooks)

    def _load_diffusers(self, options: FastOptions, gpu, path: Path, hooks: EngineHooks) -> None:
        problems = check_options(options, gpu, installed_kernels())
        if options.cache_threshold and self.family.no_first_block_cache:
            problems.append(f"CACHE_THRESHOLD: {self.family.no_first_block_cache}; unset CACHE_THRESHOLD.")
        if problems:
            fallback = f" [fallback: {self.info['fallback']}]" if self.info["fallback"] else ""
            raise SystemExit(" ".join(problems) + fallback)
        log.info("loading %s (%s) on %s as %s", path, self.family.name, self.device, self.dtype)
        pipe = self.build(path, self.dtype)
        self.use_pipeline(pipe, offload="model" if options.offload else "")
        mergeable = not (options.fp8 or options.compile)  # FP8 weights and compiled graphs take a slot instead
        target = LoRATarget(pipe, mergeable, weight_shapes(pipe), self.dtype)
        if options.compile and str(self.settings.compile_cache_dir) not in ("", "."):
            identity = (str(gpu), repr(options), str(path), self.settings.default_size, str(self.dtype))
            self.compile_cache = CompileCache(self.settings.compile_cache_dir, *identity)
            self.compile_cache.load()
        ask = (lambda: hooks.lora_applier(target)) if _loads_loras(pipe) else (lambda: None)
        info, self.lora_applier = accelerate(pipe, options, gpu, self.dtype, ask)
        self.compiled = options.compile
        self.info.update(info, offload="model CPU offload" if options.offload else None)
        if options.cache_threshold:
            self._drop_modes_without_cache_context()
        if not _loads_loras(pipe):
            self.info["lora"] = f"none: diffusers has no LoRA loader for {type(pipe).__name__}"
        self._log_path()

    def _drop_modes_without_cache_context(self) -> None:
        """diffusers' first-block cache needs the pipeline to open a cache context around each transformer call;
        some pipelines of a family do not (FLUX.1's img2img and inpaint): that mode is not served with the cache,
        and a request for it is a 400 saying why, not a 500 at its first step."""
        for mode, mode_pipe in list(self.pipelines.items()):
            if "cache_context" not in inspect.getsource(type(mode_pipe).__call__):
                del self.pipelines[mode]
                self.unserved[mode] = f"{type(mode_pipe).__name__} cannot run with CACHE_THRESHOLD (first-block cache)"
        if not self.pipelines:
            raise SystemExit(f"CACHE_THRESHOLD: {self.unserved}; unset CACHE_THRESHOLD.")
        self.info["modes"] = sorted(self.pipelines)

    def _adopt_provided(self, provided: ProvidedPipeline) -> None:
        self.dtype = provided.dtype
        self.use_pipeline(provided.pipe, offload=provided.offload)
        provided.finish(self.pipelines)
        self.lora_applier = provided.lora_applier
        self.info.update(provided.info, precision=provided.info.get("precision", str(self.dtype)[6:]))
        self._log_path()

    def _log_path(self) -> None:
        keys = ("family", "gpu", "precision", "attention", "compile", "cache", "offload", "fallback", "lora")
        log.info("engine path: %s", "; ".join(f"{k}={self.info.get(k)}" for k in keys))

    def use_pipeline(self, pipe, offload: str = "") -> None:
        """Adopt a built pipeline of this engine's family; offload: "", "model" or "sequential" (diffusers' CPU
        offload)."""
        if offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        elif offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        self.pipelines = _mode_pipelines(pipe, self.family)
        for mode_pipe in self.pipelines.values():
            mode_pipe.set_progress_bar_config(disable=True)
        self._params = {m: set(inspect.signature(p.__call__).parameters) for m, p in self.pipelines.items()}
        self.preview_decoder = self._decoder_for(pipe)
        if not self.family.batch:
            self.max_batch = 1
        self.info.update(
            pipeline=type(pipe).__name__,
            modes=sorted(self.pipelines),
            previews=self.preview_decoder.kind if self.preview_decoder else None,
        )

    def _decoder_for(self, pipe) -> PreviewDecoder | None:
        """Partial images for a flow-matching family whose latents it knows; a decoder that cannot read them stops the
        server."""
        layout, kind = self.family.latents, self.settings.preview_decoder
        if not layout or getattr(pipe, "vae", None) is None:
            return None
        problem = decoder_problem(kind, layout)
        if problem:
            raise SystemExit(f"{problem} ({self.family.name})")
        return PreviewDecoder(pipe, kind, layout)

    @property
    def pipe(self):
        """The loaded pipeline (for a family that only edits, its edit pipeline)."""
        return next(iter(self.pipelines.values()))

    def defaults(self) -> tuple[int, float]:
        """(steps, guidance) when a request names none: the family's; for an unknown one the pipeline's own."""
        if self.family is not GENERIC:
            return self.family.steps, self.family.guidance
        signature = inspect.signature(self.pipe.__call__).parameters
        steps = signature["num_inference_steps"].default if "num_inference_steps" in signature else 28
        guidance = signature["guidance_scale"].default if "guidance_scale" in signature else 0.0
        return int(steps), float(guidance or 0.0)

    def warmup(self) -> None:
        width, height = 256, 256
        if self.compiled:  # torch.compile specialises on the first shape: compile for the size most requests use
            width, height = self.settings.default_dimensions
        spec = GenerationSpec(
            prompt="warm up", n=1, width=width, height=height, steps=2, guidance=self.defaults()[1], seeds=[0]
        )
        if self.family.video is not None:
            spec.frames = self.family.video.frame_step + 1
        if "text2img" not in self.pipelines:  # a family that only edits: edit a grey picture
            spec.mode, spec.image = "img2img", Image.new("RGB", (width, height), (128, 128, 128))
        self.generate([spec], Progress())
        if self.compile_cache is not None:  # everything the warm-up compiled, for the next start
            self.info["compile_cache"] = self.compile_cache.save()

    # -- requests --------------------------------------------------------

    def check(self, spec: GenerationSpec) -> None:
        """What this family and pipeline cannot do is a 400 before the request queues, never a silently dropped
        field."""
        self._check_output(spec)
        self._check_mode(spec)
        self._check_arguments(spec, self._params[spec.mode])

    def _check_output(self, spec: GenerationSpec) -> None:
        family, video = self.family, self.family.video
        if video is None and spec.frames:
            raise bad_request(f"This model ({family.name}) makes images, not videos.", "model", "unsupported")
        if video is not None and not spec.frames:
            raise bad_request(f"This model ({family.name}) makes videos: use /v1/videos.", "model", "unsupported")
        if video is not None and spec.n != 1:
            raise bad_request(f"A video request makes one video, not n={spec.n}.", "n", "unsupported")
        problem = video.frames_problem(spec.frames) if video is not None else None
        if problem:
            raise bad_request(f"This model ({family.name}) makes {problem}.", "seconds", "unsupported")
        if spec.partial_images and self.preview_decoder is None:
            raise bad_request(
                f"This model ({family.name}) has no partial images; ask without 'partial_images'.",
                "partial_images",
                "unsupported",
            )

    def _check_mode(self, spec: GenerationSpec) -> None:
        if spec.mode in self.pipelines:
            return
        if spec.mode in self.unserved:
            message = f"This server does not serve {spec.mode} on this model: {self.unserved[spec.mode]}."
            raise bad_request(message, _MODE_FIELDS[spec.mode], "unsupported")
        reasons = {
            "text2img": f"This model ({self._label}) needs an input image: use the edits endpoint.",
            "img2img": f"This model ({self._label}) has no edit pipeline in this engine.",
            "inpaint": f"This model ({self._label}) does not inpaint: send no mask.",
        }
        raise bad_request(reasons[spec.mode], _MODE_FIELDS[spec.mode], "unsupported")

    def _check_arguments(self, spec: GenerationSpec, params: set[str]) -> None:
        family = self.family
        accepted = {
            "negative_prompt": bool(family.negative) and "negative_prompt" in params,
            "true_cfg_scale": family.negative == TRUE_CFG and "true_cfg_scale" in params,
            "strength": "strength" in params,
        }
        given = {"negative_prompt": spec.negative_prompt, "true_cfg_scale": spec.true_cfg, "strength": spec.strength}
        for field, value in given.items():
            if value is not None and not accepted[field]:
                raise bad_request(f"'{field}' is not supported by this model ({self._label}).", field, "unsupported")
        takes_guidance = family.guidance_mode != NONE and _guidance_argument(family) in params
        if not takes_guidance and spec.guidance != self.defaults()[1]:
            raise bad_request(
                f"'guidance_scale' is not supported by this model ({self._label}).", "guidance_scale", "unsupported"
            )

    @property
    def _label(self) -> str:
        return self.info["pipeline"] if self.family is GENERIC else f"{self.family.name}, {self.info['pipeline']}"

    # -- generation (engine thread only) ---------------------------------

    def generate(self, specs: list[GenerationSpec], progress: Progress) -> list[list[Image.Image]]:
        head = specs[0]
        pipe = self.pipelines[head.mode]
        per_image = [Row(i, j, s, seed) for i, s in enumerate(specs) for j, seed in enumerate(s.seeds)]
        outputs: list = []
        for chunk in self._chunks(head, per_image):
            outputs += self._call(head.mode, pipe, chunk, progress)
        if head.frames:  # one video per spec: its frames are the spec's images
            return [list(video) for video in outputs]
        out, at = [], 0
        for s in specs:
            out.append(outputs[at : at + s.n])
            at += s.n
        return out

    def _chunks(self, head: GenerationSpec, rows: list["Row"]) -> list[list["Row"]]:
        """The pipeline calls: up to max_batch images each; one video per call (a video fills the GPU alone); a
        family's own edit pipeline takes one input image per call (several images would be references)."""
        if not head.frames and not (head.mode == "img2img" and self.family.edits):
            return [rows[i : i + self.max_batch] for i in range(0, len(rows), self.max_batch)]
        size = 1 if head.frames else self.max_batch
        by_spec: dict[int, list[Row]] = {}
        for row in rows:
            by_spec.setdefault(row.spec_index, []).append(row)
        return [group[i : i + size] for group in by_spec.values() for i in range(0, len(group), size)]

    def arguments(self, mode: str, rows: list["Row"]) -> dict:
        """The pipeline call for these images (one BatchKey), as this family's pipeline takes it."""
        head = rows[0].spec
        kwargs = {
            "prompt": [row.spec.prompt for row in rows],
            "height": head.height,
            "width": head.width,
            "num_inference_steps": head.steps,
            "generator": [torch.Generator("cpu").manual_seed(row.seed) for row in rows],
            "output_type": "pil",
            **_optional_arguments(head, self.family, self._params[mode]),
            **_input_images(mode, rows, shared=self.family.edits, video=bool(head.frames)),
        }
        if head.frames:
            kwargs["num_frames"] = head.frames
        if "negative_prompt" in kwargs:
            kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(rows)
        return kwargs

    def _call(self, mode: str, pipe, rows: list["Row"], progress: Progress) -> list:
        head = rows[0].spec
        kwargs = self.arguments(mode, rows)
        watcher = StepWatcher(progress, rows, self.preview_decoder)
        if "callback_on_step_end" in self._params[mode]:
            kwargs["callback_on_step_end"] = watcher
        with torch.inference_mode():
            result = pipe(**kwargs)
        if watcher.stopped_after:
            log.info("batch stopped after %d of %d steps: nobody waits for it", watcher.stopped_after, head.steps)
        return list(result.frames if head.frames else result.images)


def _mode_pipelines(pipe, family: Family) -> dict[str, object]:
    """mode -> its pipeline, all on the loaded weights: text2img (the loaded one, for a family that makes
    anything from a prompt alone), img2img (the family's edit pipeline, or diffusers' img2img) and inpaint
    (diffusers' inpainting, for image families)."""
    import diffusers
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    if not family.text2img:
        return {"img2img": pipe}
    pipelines = {"text2img": pipe}
    if family.edit_pipeline:
        pipelines["img2img"] = getattr(diffusers, family.edit_pipeline).from_pipe(pipe)
    elif family.video is None:
        for mode, factory in (("img2img", AutoPipelineForImage2Image), ("inpaint", AutoPipelineForInpainting)):
            derived = _derived(factory, pipe)
            if derived is not None:
                pipelines[mode] = derived
    return pipelines


def _loads_loras(pipe) -> bool:
    """Whether diffusers loads LoRAs for this pipeline (its LoRA loader converts the files people ship)."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    return isinstance(pipe, LoraBaseMixin)


def _guidance_argument(family: Family) -> str:
    """The pipeline argument the request's guidance_scale goes to."""
    return family.cfg_argument if family.guidance_mode == CFG else "guidance_scale"


def _optional_arguments(spec: GenerationSpec, family: Family, params: set[str]) -> dict:
    """The arguments only some families take (`check` refused the request if it needs one that is missing)."""
    kwargs = {}
    guidance = _guidance_argument(family)
    if guidance in params:
        kwargs[guidance] = spec.guidance
    negative = spec.negative_prompt if spec.negative_prompt is not None else family.default_negative
    if negative is not None and "negative_prompt" in params:
        kwargs["negative_prompt"] = negative
    true_cfg = true_cfg_weight(spec.true_cfg, spec.negative_prompt)
    if family.negative == TRUE_CFG and "true_cfg_scale" in params and true_cfg is not None:
        kwargs["true_cfg_scale"] = true_cfg
    if spec.strength is not None:
        kwargs["strength"] = spec.strength
    return kwargs


def _input_images(mode: str, rows: list["Row"], shared: bool, video: bool) -> dict:
    """The input image (and mask) of each image of the call; `shared`: one image for the whole call, a list of one
    (a family's own edit pipeline reads a list as the reference images of each prompt)."""
    if mode == "text2img":
        return {}
    if shared and mode == "img2img" and video:
        return {"image": rows[0].spec.image}  # a video's first frame
    if shared and mode == "img2img":
        return {"image": [rows[0].spec.image]}
    images = {"image": [row.spec.image for row in rows]}
    if mode == "inpaint":
        images["mask_image"] = [row.spec.mask for row in rows]
    return images


@dataclass(frozen=True)
class Row:
    """One image of a batch: its spec's index in the batch, its index in the spec, the spec, its seed."""

    spec_index: int
    image_index: int
    spec: GenerationSpec
    seed: int


class StepWatcher:
    """The pipeline's step callback (engine thread): stops the batch once every waiter has gone, and hands
    over the partial images its streamed requests asked for."""

    def __init__(self, progress: Progress, rows: list[Row], decoder: PreviewDecoder | None) -> None:
        self.progress = progress
        self.rows = rows
        self.decoder = decoder
        self.wanted: dict[int, list[int]] = {}  # step -> rows that want a partial image after it
        if progress.partial_image is not None and decoder is not None:
            for index, row in enumerate(rows):
                for step in partial_image_steps(row.spec.steps, row.spec.partial_images):
                    self.wanted.setdefault(step, []).append(index)
        self.before: torch.Tensor | None = None  # the latents before the next partial image's step
        self.stopped_after = 0

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if self.progress.should_stop():
            pipe._interrupt = True
            self.stopped_after = step + 1
            return {}
        if self.progress.step is not None:
            self.progress.step(step + 1, pipe.num_timesteps)
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
            self.progress.partial_image(row.spec_index, row.image_index, render)
