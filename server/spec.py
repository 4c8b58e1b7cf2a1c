"""What to generate: the engine-facing form of one request, and the key that says which requests batch together."""

from dataclasses import dataclass
from typing import NamedTuple

from PIL import Image

from server.lora import LoRASet


class BatchKey(NamedTuple):
    """Requests with equal keys run as one pipeline call. The scheduler prefers requests whose LoRA set is
    the one already applied."""

    mode: str  # "text2img", "img2img" or "inpaint"
    width: int
    height: int
    steps: int
    guidance: float
    true_cfg: float | None
    strength: float | None
    negative_prompt: str | None
    frames: int = 0
    loras: LoRASet = ()


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
    mode: str = "text2img"  # "img2img" with an input image (for a video: its first frame), "inpaint" with a mask too
    frames: int = 0  # 0: n images; N > 0: one video of N frames (the spec's images are its frames)
    image: Image.Image | None = None
    mask: Image.Image | None = None
    loras: LoRASet = ()
    partial_images: int = 0  # per image, when streamed

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
            self.frames,
            self.loras,
        )
