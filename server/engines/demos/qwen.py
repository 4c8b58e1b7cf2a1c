"""The tiny Qwen-Image: Qwen-Image's MMDiT (2x2 packed latents), its 3D VAE with per-channel latent statistics,
and a Qwen2.5-VL text encoder (whose vision tower reads an edit's input image: qwen_edit.py); shrunk."""

from server.engines.demos.tokenizers import QWEN_SPECIAL, qwen_tokenizer

VERSION = "qwen-image-tiny-v1"
FAMILY = "Qwen-Image"  # its row in server/families.py

_Z = 4  # latent channels


def _token(name: str) -> int:
    return QWEN_SPECIAL.index(name)


def _text_encoder(vocab: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": vocab,
            "bos_token_id": None,
            "eos_token_id": _token("<|im_end|>"),
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=vocab,
        bos_token_id=None,
        eos_token_id=_token("<|im_end|>"),
        image_token_id=_token("<|image_pad|>"),
        video_token_id=_token("<|video_pad|>"),
        vision_start_token_id=_token("<|vision_start|>"),
        vision_end_token_id=_token("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def parts() -> dict:
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    torch.manual_seed(0)
    tokenizer = qwen_tokenizer()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=_Z * 4,
        out_channels=_Z,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=_Z,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # three downsamplings: 8x, as Qwen-Image's
        latents_mean=[0.0] * _Z,
        latents_std=[1.0] * _Z,
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": _text_encoder(len(tokenizer)),
        "tokenizer": tokenizer,
    }


def build():
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(**parts())
