"""Tokenizers for the demo models, trained here on a small corpus: nothing is downloaded."""

import io
import json

_WORDS = (
    "a an the of in on with and photo painting portrait drawing picture of cat dog fox bird horse "
    "astronaut robot castle city forest mountain river lake ocean beach desert snow rain sunset "
    "night morning red green blue yellow black white golden silver old young small large tiny "
    "huge bright dark soft sharp detailed cinematic watercolor oil pencil digital studio light "
    "shadow sky cloud tree flower garden street house window door table bowl fruit cup book"
).split()


def corpus() -> list[str]:
    n = len(_WORDS)
    return [" ".join(_WORDS[(i * k) % n] for k in range(1, 9)) for i in range(400)]


def clip_tokenizer():
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
    bpe.train_from_iterator(corpus(), trainer)
    model = json.loads(bpe.model.__getstate__())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=77)


def t5_tokenizer():
    import sentencepiece as spm
    from transformers import T5Tokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
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


def byte_bpe(special_tokens: list[str], vocab_size: int = 400):
    """A byte-level BPE (`tokenizers.Tokenizer`) trained on the corpus, its special tokens first (ids 0, 1, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(), trainer)
    return bpe


# Qwen's special tokens (Qwen2.5-VL's vision markers among them) and a chat template in Qwen's format.
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
QWEN_SPECIAL += ["<|video_pad|>"]
QWEN_CHAT = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tokenizer():
    """Qwen2's tokenizer format (Qwen-Image's Qwen2.5-VL, Z-Image's Qwen3)."""
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer(
        tokenizer_object=byte_bpe(QWEN_SPECIAL),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=QWEN_CHAT,
    )


# Mistral's special tokens (Pixtral's image markers among them) and a chat template in Mistral's format.
MISTRAL_SPECIAL = [
    "<unk>", "<s>", "</s>", "<pad>", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
]  # fmt: skip
MISTRAL_CHAT = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set text = namespace(value='') %}{% if message['content'] is string %}{% set text.value = message['content'] %}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}{% set text.value = text.value + "
    "'[IMG]' %}{% else %}{% set text.value = text.value + part['text'] %}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text.value }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text.value }}[/INST]{% else %}{{ text.value }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


def mistral_tokenizer():
    """A Mistral-format tokenizer (FLUX.2's Mistral Small 3 encoder)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=byte_bpe(MISTRAL_SPECIAL),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=MISTRAL_CHAT,
    )
