"""The tiny FLUX.2 [dev]: FLUX.2's transformer (4-axis RoPE, shared modulation), its VAE with batch-normalized
2x2 patch latents, a Mistral 3 text encoder read at layers 10, 20 and 30 as FLUX.2 does (so it keeps 31 layers,
each tiny) behind Pixtral's processor (its text half: server/engines/processors.py); shrunk. Edits are the same
pipeline with reference images."""

from server.engines.demos.tokenizers import MISTRAL_SPECIAL, mistral_tokenizer

VERSION = "flux2-tiny-v2"
FAMILY = "FLUX.2-dev"  # its row in server/families.py

_HIDDEN = 16
_LAYERS = 31  # FLUX.2 reads hidden states 10, 20 and 30


def _text_encoder(vocab: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = {"bos_token_id": MISTRAL_SPECIAL.index("<s>"), "eos_token_id": MISTRAL_SPECIAL.index("</s>"),
           "pad_token_id": MISTRAL_SPECIAL.index("<pad>")}  # fmt: skip
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": vocab,
            "hidden_size": _HIDDEN,
            "intermediate_size": 24,
            "max_position_embeddings": 1024,
            "num_attention_heads": 2,
            "num_hidden_layers": _LAYERS,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "rms_norm_eps": 1e-05,
            "rope_theta": 1000000000.0,
            "sliding_window": None,
            **ids,
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 24,
            "image_size": 32,
            "patch_size": 8,
            "num_channels": 3,
        },
        image_token_index=MISTRAL_SPECIAL.index("[IMG]"),
        vision_feature_layer=-1,
        **ids,
    )
    return Mistral3ForConditionalGeneration(config).eval()


def build():
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import PixtralImageProcessorPil

    from server.engines.processors import PixtralTextProcessor

    torch.manual_seed(0)
    tokenizer = mistral_tokenizer()
    processor = PixtralTextProcessor(PixtralImageProcessorPil(patch_size=8), tokenizer, tokenizer.chat_template)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * _HIDDEN,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
    )
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_text_encoder(len(tokenizer)),
        tokenizer=processor,
        transformer=transformer,
    )
    pipe.register_to_config(tokenizer=("transformers", "PixtralProcessor"))  # saved as a real FLUX.2 folder names it
    return pipe
