"""What to generate: the engine-facing form of one request, and the key that says which requests batch together."""

from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
    loras: LoRASet = ()
    frames: int = 0


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
    mode: str = "text2img"  # "img2img" with an input image, "inpaint" with a mask too
    image: Image.Image | None = None
    mask: Image.Image | None = None
    loras: LoRASet = ()
    previews: int = 0  # partial images per image, when streamed
    options: dict[str, Any] = field(default_factory=dict)  # validated plugin fields, by plugin name
    frames: int = 0  # 0: images; N > 0: one video of N frames

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
            self.loras,
            self.frames,
        )


@dataclass(frozen=True)
class VideoRules:
    """How a video family maps a request to frames and sizes (/v1/videos reads them; the engine makes the video)."""

    fps: int  # frames per second the family was trained at
    frame_step: int  # frames = 1 + frame_step * k (Wan: 4, its VAE's temporal compression)
    size_multiple: int  # width and height are multiples of it
    default_size: tuple[int, int]  # (width, height) when a request names none
    default_frames: int  # when a request names no `seconds`
    max_frames: int
    text_to_video: bool = True
    image_to_video: bool = False  # takes spec.image (the first frame)
