"""The model families SGLang serves, and what each accepts: one table, no scattered conditionals.

A family is found from the model folder's `model_index.json` (its pipeline
class, and for a few the folder name, as SGLang itself does), or named with
SGLANG_MODEL_ID. The table says what image-server must know to map a request:
the `--model-id` that selects SGLang's native pipeline, default steps and
guidance, how guidance reaches the model, whether a negative prompt works, and
which endpoints the family has. What SGLang reports at runtime
(`supported_task_types`) can only narrow the endpoints further.

Only FLUX.1 (the tiny demo checkpoint) runs on this project's CI; the other
rows come from SGLang 0.5.23's own configs (`configs/pipeline_configs`,
`configs/sample`) and are marked `verified=False`.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

# How the request's guidance_scale reaches the model.
EMBEDDED = "embedded"  # guidance-distilled: fixed when SGLang starts (--embedded-cfg-scale), not per request
CFG = "cfg"  # the request's guidance_scale is the classifier-free guidance weight
NONE = "none"  # step/guidance-distilled: the model takes no guidance


@dataclass(frozen=True)
class Family:
    name: str
    model_id: str  # SGLang --model-id ("" when SGLang only detects it by the folder name)
    pipelines: tuple[str, ...]  # model_index.json _class_name values of this family
    steps: int
    guidance: float
    guidance_mode: str
    negative_prompt: bool = True
    text2img: bool = True
    edits: bool = False
    edits_since: str = ""  # first SGLang version whose edits work for this family
    video: bool = False
    name_contains: tuple[str, ...] = ()  # folder-name words that tell variants of one pipeline class apart
    needs_name: str = ""  # SGLang recognises the family only by this word in the folder name
    guidance_embeds: bool | None = None  # FLUX.1: dev has a guidance embedding, schnell has none
    verified: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("FLUX.1-dev", "FLUX.1-dev", ("FluxPipeline",), 28, 3.5, EMBEDDED, guidance_embeds=True, verified=True),
    Family("FLUX.1-schnell", "FLUX.1-dev", ("FluxPipeline",), 4, 0.0, NONE, guidance_embeds=False),
    Family("FLUX.2-klein", "FLUX.2-klein-4B", ("Flux2KleinPipeline",), 4, 1.0, NONE, negative_prompt=False, edits=True),
    Family("FLUX.2-dev", "FLUX.2-dev", ("Flux2Pipeline",), 50, 4.0, EMBEDDED, negative_prompt=False, edits=True),
    Family(
        "Qwen-Image-Edit",
        "Qwen-Image-Edit-2509",
        ("QwenImageEditPlusPipeline",),
        40,
        4.0,
        CFG,
        text2img=False,
        edits=True,
    ),
    Family("Qwen-Image-Edit", "Qwen-Image-Edit", ("QwenImageEditPipeline",), 50, 4.0, CFG, text2img=False, edits=True),
    Family("Qwen-Image", "Qwen-Image", ("QwenImagePipeline",), 50, 4.0, CFG),
    Family(
        "GLM-Image", "", ("GlmImagePipeline",), 30, 1.5, CFG, edits=True, edits_since="0.5.19", needs_name="glm-image"
    ),
    Family("Z-Image-Turbo", "Z-Image-Turbo", ("ZImagePipeline",), 9, 0.0, NONE, name_contains=("turbo",)),
    Family("Z-Image", "Z-Image", ("ZImagePipeline",), 50, 5.0, CFG),
    Family(
        "Wan2.2-TI2V",
        "Wan2.2-TI2V-5B-Diffusers",
        ("WanPipeline",),
        50,
        5.0,
        CFG,
        text2img=False,
        video=True,
        name_contains=("ti2v",),
    ),
    Family(
        "Wan2.2-T2V",
        "Wan2.2-T2V-A14B-Diffusers",
        ("WanPipeline",),
        40,
        4.0,
        CFG,
        text2img=False,
        video=True,
    ),
    Family(
        "Wan2.2-I2V",
        "Wan2.2-I2V-A14B-Diffusers",
        ("WanImageToVideoPipeline",),
        40,
        3.5,
        CFG,
        text2img=False,
        video=True,
    ),
)

# Anything else: SGLang picks its backend itself (often its diffusers fallback, which has no LoRA).
GENERIC = Family("generic", "", (), 28, 3.5, CFG)

# SGLang task types that mean an endpoint is there.
IMAGE_TASKS = {"T2I", "TI2I"}
EDIT_TASKS = {"I2I", "TI2I"}
VIDEO_TASKS = {"T2V", "I2V", "TI2V"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _has_guidance_embeds(folder: Path) -> bool:
    return bool(_read_json(folder / "transformer" / "config.json").get("guidance_embeds", True))


def _matches(family: Family, pipeline: str, folder: Path) -> bool:
    if pipeline not in family.pipelines:
        return False
    name = folder.name.lower()
    if family.name_contains and not any(word in name for word in family.name_contains):
        return False
    return family.guidance_embeds is None or family.guidance_embeds == _has_guidance_embeds(folder)


def detect_family(folder: Path, model_id: str = "") -> Family:
    """The family of the model in `folder`; SGLANG_MODEL_ID (`model_id`) names one explicitly."""
    if model_id:
        named = [f for f in FAMILIES if f.model_id.lower() == model_id.lower() or f.name.lower() == model_id.lower()]
        return named[0] if named else Family(model_id, model_id, (), 28, 3.5, CFG)
    pipeline = _read_json(folder / "model_index.json").get("_class_name", "")
    return next((f for f in FAMILIES if _matches(f, pipeline, folder)), GENERIC)


def version_tuple(version: str) -> tuple[int, ...]:
    """'0.5.23' -> (0, 5, 23); a suffix such as 'rc1' or '.post1' is ignored."""
    parts = []
    for part in version.split(".")[:3]:
        digits = re.match(r"\d+", part)
        parts.append(int(digits[0]) if digits else 0)
    return tuple(parts)
