"""server/engines/processors.py: FLUX.2's and Qwen-Image-Edit's processors without torchvision (this machine has
none), saved as a model folder names them and loaded back as the loader loads them."""

import json

import pytest
import torch
from PIL import Image
from transformers import PixtralImageProcessorPil, Qwen2VLImageProcessorPil
from transformers.video_processing_utils import BaseVideoProcessor

from server.engines import processors
from server.engines.demos.tokenizers import mistral_tokenizer, qwen_tokenizer
from server.engines.processors import PixtralTextProcessor, Qwen2VLProcessorWithoutVideo, processor_components

CHAT = [[{"role": "user", "content": [{"type": "text", "text": "a red fox"}]}]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A pipeline folder with both processors, as transformers' classes, and a tokenizer that is no processor."""
    root = tmp_path_factory.mktemp("pipeline")
    mistral, qwen = mistral_tokenizer(), qwen_tokenizer()
    PixtralTextProcessor(PixtralImageProcessorPil(patch_size=8), mistral, mistral.chat_template).save_pretrained(
        root / "tokenizer"
    )
    Qwen2VLProcessorWithoutVideo(Qwen2VLImageProcessorPil(), qwen, qwen.chat_template).save_pretrained(
        root / "processor"
    )
    qwen.save_pretrained(root / "tokenizer_2")
    index = {
        "_class_name": "SomePipeline",
        "tokenizer": ["transformers", "PixtralProcessor"],
        "processor": ["transformers", "Qwen2VLProcessor"],
        "tokenizer_2": ["transformers", "Qwen2Tokenizer"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_the_processors_torchvision_builds_are_loaded_as_their_stand_ins(folder):
    components = processor_components(folder)
    assert sorted(components) == ["processor", "tokenizer"]  # the plain tokenizer loads as it is
    assert isinstance(components["tokenizer"], PixtralTextProcessor)
    assert isinstance(components["processor"], Qwen2VLProcessorWithoutVideo)
    assert isinstance(components["processor"].image_processor, Qwen2VLImageProcessorPil)


def test_nothing_is_given_where_torchvision_is_installed(folder, monkeypatch):
    monkeypatch.setattr(processors, "is_torchvision_available", lambda: True)
    assert processor_components(folder) == {}


def test_the_qwen2vl_folder_keeps_the_settings_transformers_builds_its_video_processor_from(folder):
    """Where torchvision is installed, transformers' own Qwen2VLProcessor loads the folder, its video processor too
    (before: "Can't load video processor")."""
    settings, _ = BaseVideoProcessor.get_video_processor_dict(str(folder / "processor"))
    assert settings["image_processor_type"] == "Qwen2VLImageProcessor"  # its video processor: Qwen2VLVideoProcessor
    assert settings["merge_size"] == 2 and settings["patch_size"] == 14


def test_pixtral_text_processor_encodes_a_prompt_as_its_tokenizer_does(folder):
    """FLUX.2's call: the chat template, padded and truncated to a length."""
    processor = processor_components(folder)["tokenizer"]
    asked = {"tokenize": True, "return_dict": True, "return_tensors": "pt", "padding": "max_length"}
    asked.update(truncation=True, max_length=24)
    got = processor.apply_chat_template(CHAT, **asked)
    expected = mistral_tokenizer().apply_chat_template(CHAT, **asked)
    assert got["input_ids"].shape == (1, 24)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])


def test_qwen2vl_processor_puts_an_image_into_the_prompt_through_pil():
    """Qwen-Image-Edit's call: one vision token per merged patch of the image, its pixels from the PIL processor."""
    tokenizer = qwen_tokenizer()
    processor = Qwen2VLProcessorWithoutVideo(Qwen2VLImageProcessorPil(), tokenizer, tokenizer.chat_template)
    image = Image.new("RGB", (112, 56), (200, 30, 30))
    out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>a fox"], images=[image], return_tensors="pt")
    grid = out["image_grid_thw"][0]
    assert grid.tolist() == [1, 4, 8]  # 56x112 in 14-pixel patches
    pads = (out["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum().item()
    assert pads == grid.prod().item() // 4  # merged 2x2
    expected = Qwen2VLImageProcessorPil()(images=[image], return_tensors="pt")["pixel_values"]
    assert torch.equal(out["pixel_values"], expected)
