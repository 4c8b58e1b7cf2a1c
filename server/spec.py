"""What to generate: the engine-facing form of one request, and the key that says which requests batch together."""

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from PIL import Image


class BatchKey(NamedTuple):
    """Requests with equal keys run as one pipeline call.

    `prep` is what must be applied to the pipeline before the call (the LoRA
    set); the scheduler prefers requests whose `prep` is already applied.
    """

    mode: str  # "text2img", "img2img" or "inpaint"
    width: int
    height: int
    steps: int
    guidance: float
    true_cfg: float | None
    strength: float | None
    negative_prompt: str | None
    prep: tuple = ()


@dataclass(eq=False)
class GenerationSpec:
    prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance: float
    seeds: list[int]
    negative_prompt: str | None = None
    true_cfg: float | None = None
    strength: float | None = None
    image: Image.Image | None = None
    mask: Image.Image | None = None
    prep: tuple = ()
    options: dict[str, Any] = field(default_factory=dict)  # validated plugin fields, by plugin name

    @property
    def mode(self) -> str:
        if self.image is None:
            return "text2img"
        return "img2img" if self.mask is None else "inpaint"

    @property
    def key(self) -> BatchKey:
        return BatchKey(
            self.mode,
            self.width,
            self.height,
            self.steps,
            self.guidance,
            self.true_cfg,
            self.strength,
            self.negative_prompt,
            self.prep,
        )
