"""The model families: what each one is, what it accepts and its defaults, in one table for both engines.

A family is found from the model folder's `model_index.json` (its pipeline class, for a few a key of that file,
the transformer's config or the folder name, as SGLang itself tells variants apart), or named with
SGLANG_MODEL_ID. The diffusers engine reads its defaults (steps, guidance, how the guidance and the negative
prompt reach the pipeline, size multiples, the video rules) and what it refuses from here; the SGLang engine
reads the same rows plus SGLang's `--model-id` and the version its edits need.

The steps, guidance, frame rates and sizes come from the model cards and SGLang 0.5.23's configs
(`configs/pipeline_configs`, `configs/sample`).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

# How the request's guidance_scale reaches the model.
EMBEDDED = "embedded"  # guidance-distilled: a model input (SGLang fixes it at start: --embedded-cfg-scale)
CFG = "cfg"  # the classifier-free guidance weight
NONE = "none"  # step/guidance-distilled: the model takes no guidance

# How a negative prompt acts.
TRUE_CFG = "true_cfg"  # through "true CFG", with its own weight (true_cfg_scale): FLUX.1
WITH_CFG = "cfg"  # as the unconditional side of the family's CFG, at guidance_scale
DEFAULT_TRUE_CFG = 4.0  # the true-CFG weight when a negative prompt comes without one

# How a flow-matching pipeline holds its latents while it denoises: how a partial image is decoded
# (engines/partial_images.py).
FLUX_PACKED = "flux"  # 2x2 patches packed into tokens, a 2D VAE (FLUX.1)
FLUX2_PACKED = "flux2"  # 2x2 patches as channels, batch-normalized, one token per position (FLUX.2)
QWEN_PACKED = "qwen"  # packed as FLUX.1, a 3D (video) VAE with per-channel mean and std (Qwen-Image)
PLAIN = "plain"  # (C, H, W) latents, a 2D VAE with scaling and shift (Z-Image)
PLAIN_NORMALIZED = "plain-normalized"  # (C, H, W) latents, a 2D VAE with per-channel mean and std (GLM-Image)

# Wan's negative prompt (Wan 2.2's sample_neg_prompt, in the English its model cards and SGLang use).
WAN_NEGATIVE = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)


@dataclass(frozen=True)
class Video:
    """How a video family makes videos: frame rate, the frame counts its VAE takes, sizes."""

    fps: int
    frame_step: int  # frame counts are frame_step * k + 1 (the VAE's temporal compression)
    default_frames: int
    max_frames: int
    default_size: tuple[int, int]  # (width, height)

    def frames_problem(self, frames: int) -> str | None:
        """Why this model cannot make `frames` frames, or None when it can."""
        if frames > self.max_frames:
            return f"at most {self.max_frames} frames ({self.max_frames / self.fps:g} s at {self.fps} fps)"
        if frames < 1 or (frames - 1) % self.frame_step:
            step = self.frame_step
            return f"a frame count of the form {step}k+1 (1, {step + 1}, {2 * step + 1}, ...), not {frames}"
        return None


@dataclass(frozen=True)
class Family:
    name: str
    pipelines: tuple[str, ...]  # model_index.json _class_name values of this family
    steps: int
    guidance: float
    guidance_mode: str
    negative: str = ""  # TRUE_CFG, WITH_CFG or "" (no negative prompt)
    cfg_argument: str = "guidance_scale"  # the diffusers argument that carries a CFG weight
    default_negative: str | None = None  # used when a request gives none (CFG needs one for Qwen-Image)
    size_multiple: int = 16  # of width and height: the VAE's downscale times the transformer's patch
    batch: bool = True  # images with their own seeds may share one pipeline call
    text2img: bool = True  # makes images (or videos) from a prompt alone
    edits: bool = False  # from an input image: an edit, or for a video family the video's first frame
    edit_pipeline: str = ""  # diffusers' class for edits, built on the loaded weights ("": the loaded one)
    video: Video | None = None
    latents: str = ""  # how its latents are laid out for partial images ("": none)
    no_first_block_cache: str = ""  # why diffusers' first-block cache cannot run with its pipeline ("": it may)
    # how it is told apart from other families of the same pipeline class
    config: dict = field(default_factory=dict)  # model_index.json keys and values
    name_contains: tuple[str, ...] = ()  # folder-name words
    needs_name: str = ""  # SGLang recognises the family only by this word in the folder name
    guidance_embeds: bool | None = None  # FLUX.1: dev has a guidance embedding, schnell has none
    # SGLang
    sglang_model_id: str = ""  # its --model-id ("" when SGLang only detects it by the folder name)
    sglang_edits_since: str = ""  # first SGLang version whose edits work for this family
    sglang_verified: bool = False  # run here through SGLang (the tiny FLUX.1)

    @property
    def negative_prompt(self) -> bool:
        return bool(self.negative)


_WAN_TI2V = Video(fps=24, frame_step=4, default_frames=121, max_frames=121, default_size=(1280, 704))
_WAN_A14B = Video(fps=16, frame_step=4, default_frames=81, max_frames=81, default_size=(1280, 720))

FAMILIES: tuple[Family, ...] = (
    Family(
        "FLUX.1-dev",
        ("FluxPipeline",),
        28,
        3.5,
        EMBEDDED,
        negative=TRUE_CFG,
        latents=FLUX_PACKED,
        guidance_embeds=True,
        sglang_model_id="FLUX.1-dev",
        sglang_verified=True,
    ),
    Family(
        "FLUX.1-schnell",
        ("FluxPipeline",),
        4,
        0.0,
        NONE,
        negative=TRUE_CFG,
        latents=FLUX_PACKED,
        guidance_embeds=False,
        sglang_model_id="FLUX.1-dev",
    ),
    Family(
        "FLUX.2-klein",
        ("Flux2KleinPipeline",),
        4,
        1.0,
        NONE,
        edits=True,
        edit_pipeline="Flux2KleinPipeline",  # the same pipeline, given reference images
        latents=FLUX2_PACKED,
        sglang_model_id="FLUX.2-klein-4B",
    ),
    Family(
        "FLUX.2-dev",
        ("Flux2Pipeline",),
        50,
        4.0,
        EMBEDDED,
        edits=True,
        edit_pipeline="Flux2Pipeline",  # the same pipeline, given reference images
        latents=FLUX2_PACKED,
        no_first_block_cache="diffusers' Flux2Pipeline calls its transformer outside a cache context, which the cache "
        "keeps its state in",
        sglang_model_id="FLUX.2-dev",
    ),
    Family(
        "Qwen-Image-Edit-2509",
        ("QwenImageEditPlusPipeline",),
        40,
        4.0,
        CFG,
        negative=WITH_CFG,
        cfg_argument="true_cfg_scale",
        default_negative=" ",
        batch=False,  # its pipeline takes one prompt per call
        text2img=False,
        edits=True,
        latents=QWEN_PACKED,
        sglang_model_id="Qwen-Image-Edit-2509",
    ),
    Family(
        "Qwen-Image-Edit",
        ("QwenImageEditPipeline",),
        50,
        4.0,
        CFG,
        negative=WITH_CFG,
        cfg_argument="true_cfg_scale",
        default_negative=" ",
        batch=False,  # its pipeline takes one prompt per call
        text2img=False,
        edits=True,
        latents=QWEN_PACKED,
        sglang_model_id="Qwen-Image-Edit",
    ),
    Family(
        "Qwen-Image",
        ("QwenImagePipeline",),
        50,
        4.0,
        CFG,
        negative=WITH_CFG,
        cfg_argument="true_cfg_scale",
        default_negative=" ",
        latents=QWEN_PACKED,
        sglang_model_id="Qwen-Image",
    ),
    Family(
        "GLM-Image",
        ("GlmImagePipeline",),
        30,
        1.5,
        CFG,
        size_multiple=32,
        batch=False,  # its autoregressive stage samples a whole batch from the first image's seed
        # SGLang's edits; the diffusers engine has no edit pipeline for it: diffusers 0.42.1 concatenates the input
        # images' features that transformers 5.24's get_image_tokens takes one per image, and past that its
        # autoregressive and diffusion stages read the input image at grids that agree only at sizes its processor
        # does not rescale (SGLang resizes edit inputs to multiples of 32 for the same reason)
        edits=True,
        latents=PLAIN_NORMALIZED,
        needs_name="glm-image",
        sglang_edits_since="0.5.19",
    ),
    Family(
        "Z-Image-Turbo",
        ("ZImagePipeline",),
        9,
        0.0,
        NONE,
        latents=PLAIN,
        name_contains=("turbo",),
        sglang_model_id="Z-Image-Turbo",
    ),
    Family(
        "Z-Image",
        ("ZImagePipeline",),
        50,
        5.0,
        CFG,
        negative=WITH_CFG,
        latents=PLAIN,
        sglang_model_id="Z-Image",
    ),
    Family(
        "Wan2.2-TI2V",
        ("WanPipeline",),
        50,
        5.0,
        CFG,
        negative=WITH_CFG,
        default_negative=WAN_NEGATIVE,
        size_multiple=32,  # its VAE downscales 16x, its transformer takes 2x2 patches
        edits=True,
        edit_pipeline="WanImageToVideoPipeline",
        video=_WAN_TI2V,
        config={"expand_timesteps": True},
        sglang_model_id="Wan2.2-TI2V-5B-Diffusers",
    ),
    Family(
        "Wan2.2-T2V",
        ("WanPipeline",),
        40,
        4.0,
        CFG,
        negative=WITH_CFG,
        default_negative=WAN_NEGATIVE,
        video=_WAN_A14B,
        sglang_model_id="Wan2.2-T2V-A14B-Diffusers",
    ),
    Family(
        "Wan2.2-I2V",
        ("WanImageToVideoPipeline",),
        40,
        3.5,
        CFG,
        negative=WITH_CFG,
        default_negative=WAN_NEGATIVE,
        text2img=False,
        edits=True,
        video=_WAN_A14B,
        sglang_model_id="Wan2.2-I2V-A14B-Diffusers",
    ),
)

# Anything else: the diffusers engine takes the pipeline's own defaults and arguments; SGLang picks its backend
# itself (often its diffusers fallback, which has no LoRA).
GENERIC = Family("generic", (), 28, 3.5, CFG, negative=TRUE_CFG)


def true_cfg_weight(requested: float | None, negative_prompt: str | None) -> float | None:
    """The true-CFG weight a request runs at, for both engines: its own, else DEFAULT_TRUE_CFG when it gives a
    negative prompt, else None (no true CFG)."""
    if requested is not None:
        return requested
    return DEFAULT_TRUE_CFG if negative_prompt is not None else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _has_guidance_embeds(folder: Path) -> bool:
    return bool(_read_json(folder / "transformer" / "config.json").get("guidance_embeds", True))


def _matches(family: Family, index: dict, folder: Path) -> bool:
    if index.get("_class_name", "") not in family.pipelines:
        return False
    if any(index.get(key) != value for key, value in family.config.items()):
        return False
    name = folder.name.lower()
    if family.name_contains and not any(word in name for word in family.name_contains):
        return False
    return family.guidance_embeds is None or family.guidance_embeds == _has_guidance_embeds(folder)


def detect_family(folder: Path, model_id: str = "") -> Family:
    """The family of the model in `folder`; SGLANG_MODEL_ID (`model_id`) names one explicitly."""
    if model_id:
        wanted = model_id.lower()
        named = [f for f in FAMILIES if wanted in (f.sglang_model_id.lower(), f.name.lower())]
        return named[0] if named else Family(model_id, (), 28, 3.5, CFG, negative=TRUE_CFG, sglang_model_id=model_id)
    index = _read_json(folder / "model_index.json")
    return next((f for f in FAMILIES if _matches(f, index, folder)), GENERIC)


def family_named(name: str) -> Family:
    return next(family for family in FAMILIES if family.name == name)
