"""NSFW post-filter: a ViT image classifier (Falconsai/nsfw_image_detection) on every generated image.

Fail closed: when the check times out (NSFW_TIMEOUT) or fails, the image is
flagged (`nsfw: true`, `nsfw_score: null`, `nsfw_error`: why); the request
itself still succeeds. NSFW_ACTION says what happens to a flagged image:
flag (returned with the flag), blur, or block (withheld; when every image of
a request is withheld the answer is a 400 `moderation_blocked`, as OpenAI's).
NSFW_CHECK=always checks every image whatever the request says.
"""

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Literal

from PIL import Image, ImageFilter
from pydantic import AliasChoices, BaseModel, Field

from plugins.nsfw.demo import write_demo_classifier
from plugins.settings import CHECK_MODES
from server.hooks import EngineView
from server.plugins import Plugin, Processed

log = logging.getLogger(__name__)


class NSFWFields(BaseModel):
    nsfw_check: bool | None = Field(default=None, validation_alias=AliasChoices("nsfw_check", "enable_nsfw_check"))


class NSFWVerdict(BaseModel):
    """What the check adds to each image's data[i]: `nsfw_error` only when the check failed, `nsfw_action` only
    when a flagged image was blurred or withheld."""

    nsfw: bool
    nsfw_score: float | None  # None: the check failed (the image is flagged)
    nsfw_error: str | None = None
    nsfw_action: Literal["blur", "block"] | None = None


class NSFWClassifier:
    """The classifier and its preprocessing, on the GPU when there is one; one batch per call."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.model = AutoModelForImageClassification.from_pretrained(path).to(self.device).eval()
        labels = {label.lower(): int(i) for i, label in self.model.config.id2label.items()}
        if "nsfw" not in labels:
            raise SystemExit(f"NSFW_MODEL_PATH={path}: the model has no 'nsfw' label ({sorted(labels)})")
        self.nsfw_index = labels["nsfw"]

    def scores(self, images: list[Image.Image]) -> list[float]:
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        with self.torch.inference_mode():
            logits = self.model(**inputs.to(self.device)).logits
        return logits.float().softmax(-1)[:, self.nsfw_index].tolist()


class NSFWPlugin(Plugin[bool]):
    name = "nsfw"
    fields = NSFWFields
    order = 10  # before upscale: classify what the model made, at the classifier's size

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.timeout = self.config.nsfw_timeout
        self.threshold = self.config.nsfw_threshold
        self.action = self.config.nsfw_action
        self.check = CHECK_MODES[self.config.nsfw_check.lower()]
        self.classifier: NSFWClassifier | None = None
        # One thread: the classifier runs one batch at a time; a stuck check makes the next ones time out too.
        self._runner = ThreadPoolExecutor(1, thread_name_prefix="nsfw")

    def load(self, engine: EngineView) -> None:
        path = Path(self.config.nsfw_model_path)
        if not (path / "config.json").is_file():
            raise SystemExit(
                f"NSFW_MODEL_PATH={str(path)!r} is not a model folder; download Falconsai/nsfw_image_detection "
                "on a connected machine and mount it."
            )
        self.classifier = NSFWClassifier(path)
        log.info("NSFW classifier loaded from %s on %s", path, self.classifier.device)

    @classmethod
    def demo_assets(cls, folder: Path) -> list[str]:
        return [f"NSFW_MODEL_PATH={write_demo_classifier(folder)}", "# a random classifier: its verdicts mean nothing"]

    def option(self, request) -> bool:
        if self.check == "always" or request.nsfw_check is None:
            return self.check != "off"
        return request.nsfw_check

    def postprocess(self, images: list[Image.Image | None], option: bool) -> list[Processed]:
        out = [Processed(image) for image in images]
        if not option:
            return out
        present = [i for i, image in enumerate(images) if image is not None]
        scores, error = self._classify([images[i] for i in present])
        for slot, i in enumerate(present):
            out[i] = self._verdict(images[i], scores[slot] if scores else None, error)
        return out

    def _verdict(self, image: Image.Image, score: float | None, error: str | None) -> Processed:
        flagged = score is None or score >= self.threshold
        verdict = NSFWVerdict(nsfw=flagged, nsfw_score=score)
        if error:
            verdict.nsfw_error = error
        if not flagged or self.action == "flag":
            return Processed(image, verdict)
        verdict.nsfw_action = self.action
        return Processed(None if self.action == "block" else _blur(image), verdict)

    def _classify(self, images: list[Image.Image]) -> tuple[list[float] | None, str | None]:
        if not images:
            return [], None
        started = time.monotonic()
        future = self._runner.submit(self.classifier.scores, images)
        try:
            return future.result(timeout=self.timeout), None
        except FutureTimeout:
            log.warning("NSFW check timed out after %.1fs: images flagged", time.monotonic() - started)
            return None, f"nsfw check timed out after {self.timeout:g}s"
        except Exception:
            log.exception("NSFW check failed: images flagged")
            return None, "nsfw check failed (the server log has the reason)"


def _blur(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=max(image.size) / 16))
