"""The tiny Qwen-Image-Edit (2509, "Plus"): the tiny Qwen-Image's parts with Qwen2-VL's processor, which puts
the input image into the prompt as vision tokens for the Qwen2.5-VL encoder."""

from server.engines.demos import qwen

VERSION = "qwen-image-edit-tiny-v1"
FAMILY = "Qwen-Image-Edit-2509"  # its row in server/families.py


def build():
    from diffusers import QwenImageEditPlusPipeline
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    parts = qwen.parts()
    tokenizer = parts["tokenizer"]
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    return QwenImageEditPlusPipeline(**parts, processor=processor)
