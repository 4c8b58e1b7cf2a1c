"""The tiny Qwen-Image-Edit (2509, "Plus"): the tiny Qwen-Image's parts with Qwen2-VL's processor (without its video
part: server/engines/processors.py), which puts the input image into the prompt as vision tokens for the
Qwen2.5-VL encoder."""

from server.engines.demos import qwen

VERSION = "qwen-image-edit-tiny-v3"
FAMILY = "Qwen-Image-Edit-2509"  # its row in server/families.py


def build():
    from diffusers import QwenImageEditPlusPipeline
    from transformers import Qwen2VLImageProcessorPil

    from server.engines.processors import Qwen2VLProcessorWithoutVideo

    parts = qwen.parts()
    tokenizer = parts["tokenizer"]
    processor = Qwen2VLProcessorWithoutVideo(Qwen2VLImageProcessorPil(), tokenizer, tokenizer.chat_template)
    pipe = QwenImageEditPlusPipeline(**parts, processor=processor)
    pipe.register_to_config(processor=("transformers", "Qwen2VLProcessor"))  # as a real Qwen-Image-Edit folder
    return pipe
