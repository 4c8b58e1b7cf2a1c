"""The embedded demo model: a tiny FLUX.1 pipeline with random weights.

Same architecture as FLUX.1 (16-channel latents, an 8x VAE, CLIP + T5 text
encoders, a flow-matching scheduler), shrunk so that it builds in seconds and
runs on a laptop CPU. Tokenizers are trained here on a small corpus, so
nothing is downloaded. Its images are noise; the point is to exercise the
whole serving stack exactly as a real FLUX checkpoint would.
"""

import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the architecture or the build changes: old caches are ignored.
DEMO_VERSION = "flux-tiny-v2"

_WORDS = (
    "a an the of in on with and photo painting portrait drawing picture of cat dog fox bird horse "
    "astronaut robot castle city forest mountain river lake ocean beach desert snow rain sunset "
    "night morning red green blue yellow black white golden silver old young small large tiny "
    "huge bright dark soft sharp detailed cinematic watercolor oil pencil digital studio light "
    "shadow sky cloud tree flower garden street house window door table bowl fruit cup book"
).split()


def _corpus() -> list[str]:
    n = len(_WORDS)
    return [" ".join(_WORDS[(i * k) % n] for k in range(1, 9)) for i in range(400)]


def _clip_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    state = bpe.model.__getstate__()
    import json

    model = json.loads(state)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=77)


def _t5_tokenizer():
    import sentencepiece as spm
    from transformers import T5Tokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=buf,
        vocab_size=300,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=1,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )


def _text_encoders(clip_tok, t5_tok):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
            max_position_embeddings=77,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4))
    return clip, t5


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        mid_block_add_attention=False,  # a local decoder: inpainting tests can see where pixels change
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def build_demo_pipeline():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    transformer = _transformer()
    clip, t5 = _text_encoders(clip_tok, t5_tok)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def demo_model_path(cache_dir: Path) -> Path:
    """The demo pipeline's folder, built and saved on first use."""
    path = cache_dir / DEMO_VERSION
    if (path / "model_index.json").exists():
        return path
    log.info("building the demo model in %s (first use)", path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".build-"))
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # a bar per shard, in the server's log
        build_demo_pipeline().save_pretrained(tmp)
        os.replace(tmp, path)  # atomic: concurrent instances never see half a model
    except OSError:
        if not (path / "model_index.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
