"""A stand-in for Falconsai/nsfw_image_detection for `image-server demo-assets` and the tests: its config,
labels and preprocessing (ViTForImageClassification, 224x224, patch 16, labels {0: normal, 1: nsfw},
mean/std 0.5) with random weights and a smaller width and depth (the real one is ViT-B/16, 86M parameters,
on the Hugging Face hub only). The server's real loading and preprocessing code runs on it; its verdicts
mean nothing."""

from pathlib import Path

import torch
import transformers
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor


def write_demo_classifier(path: Path, hidden: int = 32, layers: int = 2) -> Path:
    if (path / "config.json").exists():
        return path
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=4 * hidden,
        image_size=224,
        patch_size=16,
        num_channels=3,
        qkv_bias=True,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-12,
        encoder_stride=16,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
        problem_type="single_label_classification",
    )
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(
        do_resize=True,
        size={"height": 224, "width": 224},
        resample=2,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(path)
    return path
