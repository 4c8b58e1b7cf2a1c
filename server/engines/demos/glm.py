"""The tiny GLM-Image: its autoregressive stage (a GLM-Image vision-language model that writes the picture's
layout as codebook tokens, with its vision encoder and VQ codebook for an edit's input image), its DiT decoder
conditioned on those tokens and on ByT5 glyph embeddings of quoted text, a 2D VAE; shrunk. Its tokenizer holds
the image codes first (ids 0..CODES-1), then the image and grid markers, then text, as GLM-Image's does."""

from server.engines.demos.tokenizers import byte_bpe

VERSION = "glm-image-tiny-v1"
FAMILY = "GLM-Image"  # its row in server/families.py

CODES = 128  # the VQ codebook: what the autoregressive stage writes, and what the DiT reads
MARKERS = {  # GLM-Image's processor reads these tokenizer attributes
    "bos_token": "<|begin_of_image|>",  # the image start: generation goes on from it
    "eos_token": "<|end_of_image|>",
    "image_token": "<|image|>",
    "grid_bos_token": "<sop>",
    "grid_eos_token": "<eop>",
    "pad_token": "<|endoftext|>",
}
CHAT = (
    "{% for message in messages %}<|user|>\n{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endfor %}"
)
_SPECIAL = [f"<|dit_token_{i}|>" for i in range(CODES)] + list(MARKERS.values()) + ["<|user|>"]


def _processor():
    from transformers import GlmImageImageProcessor, GlmImageProcessor, PreTrainedTokenizerFast

    bpe = byte_bpe(_SPECIAL, vocab_size=len(_SPECIAL) + 300)
    named = {k: v for k, v in MARKERS.items() if k in ("bos_token", "eos_token", "pad_token")}
    extra = {k: v for k, v in MARKERS.items() if k not in named}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, extra_special_tokens=extra, **named)
    image_processor = GlmImageImageProcessor(patch_size=32, temporal_patch_size=1, merge_size=1)
    return GlmImageProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT)


def _autoregressive(vocab: int):
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    start, end = _SPECIAL.index(MARKERS["bos_token"]), _SPECIAL.index(MARKERS["eos_token"])
    config = GlmImageConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "vision_vocab_size": CODES,  # it writes codes only: never an end before the picture is complete
            "rope_parameters": {"mrope_section": (4, 2, 2)},
            "pad_token_id": _SPECIAL.index(MARKERS["pad_token"]),
            "eos_token_id": end,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "num_heads": 2,
            "image_size": 64,
            "patch_size": 32,
            "intermediate_size": 32,
        },
        vq_config={"embed_dim": 32, "num_embeddings": CODES, "latent_channels": 32},
        image_token_id=_SPECIAL.index(MARKERS["image_token"]),
        image_start_token_id=start,
        image_end_token_id=end,
    )
    return GlmImageForConditionalGeneration(config).eval()


def build():
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImagePipeline, GlmImageTransformer2DModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    processor = _processor()
    glyph_tokenizer = ByT5Tokenizer(extra_ids=0)
    glyph_encoder = T5EncoderModel(
        T5Config(vocab_size=len(glyph_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    ).eval()
    transformer = GlmImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        text_embed_dim=32,
        time_embed_dim=16,
        condition_dim=8,
        prior_vq_quantizer_codebook_size=CODES,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 4, 8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        mid_block_add_attention=False,
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    return GlmImagePipeline(
        tokenizer=glyph_tokenizer,
        processor=processor,
        text_encoder=glyph_encoder,
        vision_language_encoder=_autoregressive(len(processor.tokenizer)),
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
