"""FLUX.2's and Qwen-Image-Edit's processors where torchvision is not installed.

transformers (5.4 and later) builds two processors these families load only with torchvision: Qwen2-VL's
(Qwen-Image-Edit) takes a video processor, and every video processor is torchvision's; Pixtral's (FLUX.2) imports
its torchvision image processor. Neither pipeline needs torchvision for what it does with them: Qwen-Image-Edit
gives its processor text and images, which transformers' PIL image processor reads from the same config; FLUX.2
gives its processor text only (images only to upsample a prompt, `caption_upsample_temperature`, which the server
never asks for). So where torchvision is missing, the loader is given stand-ins made of the same parts, read from
the same files; where it is installed, transformers' own classes load as they are. The demo models are built with
the stand-ins (no torchvision needed to build them) and saved as transformers' classes, as a real model folder is.

This module imports transformers: import it where a pipeline is built or loaded.
"""

import json
import logging
from pathlib import Path

from transformers import ProcessorMixin
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.utils import is_torchvision_available

log = logging.getLogger(__name__)


class Qwen2VLProcessorWithoutVideo(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor (ProcessorMixin takes its parts from the parameters of
    `__init__`): text and images, through whichever image processor it is given (the PIL one here)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict:
        """As transformers' Qwen2-VL processor saves itself: with its video processor's settings (its image
        processor's, from which transformers infers the video processor), which it loads where torchvision is."""
        saved = super().to_dict()
        saved["video_processor"] = saved["image_processor"]
        return saved


class PixtralTextProcessor(ProcessorMixin):
    """Pixtral's processor for text (chat template, tokenizer), as FLUX.2 encodes its prompts. It keeps Pixtral's
    image processor so that it saves and loads the files Pixtral's processor does, but does not expand images into
    Pixtral's image tokens: it reads no images."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **image_tokens) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template)  # Pixtral's image tokens: unused


# transformers' processor class (model_index.json) -> its stand-in where torchvision is missing
STAND_INS: dict[str, type[ProcessorMixin]] = {
    "PixtralProcessor": PixtralTextProcessor,
    "Qwen2VLProcessor": Qwen2VLProcessorWithoutVideo,
}


def processor_components(folder: Path) -> dict[str, ProcessorMixin]:
    """The components of the pipeline in `folder` that transformers cannot load without torchvision, loaded as their
    stand-ins, for from_pretrained to take instead ({} where torchvision is installed or none is needed)."""
    if is_torchvision_available():
        return {}
    index = json.loads((folder / "model_index.json").read_text())
    components = {}
    for name, entry in index.items():
        if isinstance(entry, list) and entry[0] == "transformers" and entry[1] in STAND_INS:
            stand_in = STAND_INS[entry[1]]
            components[name] = stand_in.from_pretrained(folder / name)
            log.info("torchvision is not installed: %s (%s) is loaded as %s", name, entry[1], stand_in.__name__)
    return components
