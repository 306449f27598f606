"""The tiny character tokenizer: saved offline, loaded by AutoTokenizer, exact round trips."""

import json

import pytest

from megatron_sapo.data.tiny_tokenizer import (CHARACTERS, EOS_ID, IMAGE_PAD_ID, PAD_ID, VIDEO_PAD_ID, VISION_END_ID,
                                               VISION_START_ID, VOCAB, save_tiny_tokenizer)
from megatron_sapo.models.tiny import TINY_QWEN3_MOE

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok")))


def test_saved_as_a_plain_fast_tokenizer(tmp_path):
    out = save_tiny_tokenizer(tmp_path / "model")
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in config  # no custom code: SGLang's AutoTokenizer loads it as is


def test_vocabulary_fits_the_tiny_model(tokenizer):
    assert len(tokenizer) == len(VOCAB) == 105
    assert len(tokenizer) <= TINY_QWEN3_MOE["vocab_size"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == EOS_ID
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == PAD_ID
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == VOCAB["<|im_start|>"]


def test_text_ids_are_stable_and_vision_tokens_come_after_them(tokenizer):
    # The CPU demo's model and data depend on these ids: the vision tokens were appended.
    assert [VOCAB[c] for c in CHARACTERS] == list(range(97))
    assert (PAD_ID, VOCAB["<|im_start|>"], EOS_ID, VOCAB["<|unk|>"]) == (97, 98, 99, 100)
    assert (VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID, VIDEO_PAD_ID) == (101, 102, 103, 104)
    for token in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"):
        assert tokenizer.convert_tokens_to_ids(token) == VOCAB[token]
    ids = tokenizer("<|vision_start|><|image_pad|><|image_pad|><|vision_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [VISION_START_ID, IMAGE_PAD_ID, IMAGE_PAD_ID, VISION_END_ID]
    assert tokenizer.decode(ids, skip_special_tokens=True) == ""


def test_text_round_trips_one_token_per_character(tokenizer):
    text = "".join(CHARACTERS) + "  rev 407=704\n\t{}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert ids[:3] == [VOCAB[" "], VOCAB["!"], VOCAB['"']]
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_tokens_and_skippable(tokenizer):
    text = "<|im_start|>assistant\n42<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == VOCAB["<|im_start|>"] and ids[-1] == EOS_ID and len(ids) == 1 + 10 + 2 + 1
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n42"


def test_characters_outside_the_vocabulary_become_unk(tokenizer):
    ids = tokenizer("é1", add_special_tokens=False)["input_ids"]
    assert ids == [VOCAB["<|unk|>"], VOCAB["1"]]


def test_chat_template_is_qwens_turn_format(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "rev 12="}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nrev 12=<|im_end|>\n<|im_start|>assistant\n"
    text = tokenizer.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=False)
    assert text == "<|im_start|>user\nrev 12=<|im_end|>\n"


def test_chat_template_renders_content_parts_with_image_placeholders(tokenizer):
    messages = [{"role": "system", "content": "S"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "rev 12="},
                                             {"type": "image"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    assert text == (f"<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n{image}rev 12={image}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    parts_only_text = [{"role": "user", "content": [{"type": "text", "text": "rev 12="}]}]
    assert tokenizer.apply_chat_template(parts_only_text, tokenize=False) == "<|im_start|>user\nrev 12=<|im_end|>\n"
