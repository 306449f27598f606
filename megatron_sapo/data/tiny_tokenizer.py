"""A character-level tokenizer with Qwen's special tokens, for the tiny demo model.

Built offline with the ``tokenizers`` library and saved as a plain fast tokenizer
(``tokenizer.json`` + ``tokenizer_config.json`` + ``chat_template.jinja``), which transformers'
``AutoTokenizer`` and therefore SGLang load. One token per character keeps the vocabulary
small enough for the tiny model (vocab_size 301) and makes every answer digit its own token.

The vocabulary is printable ASCII plus newline and tab (ids 0-96, in character order), then
``<|endoftext|>`` (padding), ``<|im_start|>``, ``<|im_end|>`` (end of a turn: EOS) and
``<|unk|>`` for characters outside it, then Qwen-VL's vision tokens ``<|vision_start|>``,
``<|vision_end|>``, ``<|image_pad|>`` and ``<|video_pad|>`` (ids 101-104, appended so that the
ids of the text demo never change). Text made of those characters round-trips exactly.

The chat template is Qwen's turn format without tools or thinking blocks. A message's content
is either a string or, as in Qwen-VL, a list of parts: ``{"type": "text", "text": ...}`` and
``{"type": "image"}``, the latter rendered as one ``<|vision_start|><|image_pad|><|vision_end|>``
that the Qwen-VL processor expands to the image's number of tokens.
"""

from __future__ import annotations

from pathlib import Path

from megatron_sapo import torchvision_compat

CHARACTERS: tuple[str, ...] = tuple(chr(c) for c in range(32, 127)) + ("\n", "\t")
PAD_TOKEN, BOS_OF_TURN, EOS_TOKEN, UNK_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_OF_TURN, EOS_TOKEN, UNK_TOKEN,
                                   VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
VOCAB: dict[str, int] = {token: i for i, token in enumerate(CHARACTERS + SPECIAL_TOKENS)}
PAD_ID, EOS_ID = VOCAB[PAD_TOKEN], VOCAB[EOS_TOKEN]
VISION_START_ID, VISION_END_ID = VOCAB[VISION_START], VOCAB[VISION_END]
IMAGE_PAD_ID, VIDEO_PAD_ID = VOCAB[IMAGE_PAD], VOCAB[VIDEO_PAD]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}"
    "{%- else %}{{- raise_exception('unsupported content part type: ' + part['type']) }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tiny_tokenizer():
    """The tokenizer as a transformers fast tokenizer (nothing written)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    torchvision_compat.ensure_importable()
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(VOCAB, unk_token=UNK_TOKEN))
    # Every character is its own piece; Fuse joins decoded pieces without separators.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   unk_token=UNK_TOKEN, chat_template=CHAT_TEMPLATE)


def save_tiny_tokenizer(out_dir: str | Path) -> Path:
    """Save the tokenizer into ``out_dir`` (created if needed, e.g. the tiny model's folder)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer().save_pretrained(out)
    return out
