"""Prompts through a real tokenizer's chat template (the tiny tokenizer, saved and reloaded)."""

import pytest

from megatron_sapo.data.chat import (
    MissingChatTemplateError,
    encode_prompt,
    encode_sft_examples,
    encode_records,
    prompt_messages,
    render_prompt,
)
from megatron_sapo.data.records import PromptRecord
from megatron_sapo.data.tiny_tokenizer import save_tiny_tokenizer

pytestmark = pytest.mark.unit

HEADER = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path_factory.mktemp("chat_tok")))


def test_text_prompt_becomes_a_user_turn_ending_with_the_assistant_header(tokenizer):
    text = render_prompt(tokenizer, "rev 12=")
    assert text == "<|im_start|>user\nrev 12=<|im_end|>\n" + HEADER
    ids = encode_prompt(tokenizer, "rev 12=")
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_system_prompt_goes_first_and_messages_pass_through(tokenizer):
    assert render_prompt(tokenizer, "q", system_prompt="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n" + HEADER)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert render_prompt(tokenizer, messages).count("<|im_start|>") == 5
    with pytest.raises(ValueError, match="has its own system message and data.system_prompt is set"):
        prompt_messages(messages, system_prompt="T")


def test_missing_chat_template_is_a_clear_error(tokenizer):
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    bare.chat_template = None
    with pytest.raises(MissingChatTemplateError, match="has no chat template"):
        encode_prompt(bare, "q")
    with pytest.raises(MissingChatTemplateError):
        encode_records([PromptRecord(0, "q", "1", "f:1")], bare, None, 100)


def test_encode_records_leaves_out_and_reports_over_long_prompts(tokenizer):
    records = [PromptRecord(0, "short", "1", "f:1"), PromptRecord(1, "x" * 40, "2", "f:2"),
               PromptRecord(2, [{"role": "user", "content": "also short"}], "3", "f:3")]
    limit = len(encode_prompt(tokenizer, "also short"))
    encoded = encode_records(records, tokenizer, None, max_prompt_tokens=limit)
    assert encoded.too_long == ["f:2"]
    assert [p.answer for p in encoded.prompts] == ["1", "3"]
    assert [p.index for p in encoded.prompts] == [0, 1]  # indices of the usable prompts, for the order
    assert encoded.prompts[1].prompt_ids == encode_prompt(tokenizer, "also short")
    assert encoded.prompts[0].text == render_prompt(tokenizer, "short")


def test_encode_records_names_the_record_on_a_bad_prompt(tokenizer):
    record = PromptRecord(0, [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}], "1", "f.jsonl:7")
    with pytest.raises(ValueError, match="f.jsonl:7: the prompt has its own system message"):
        encode_records([record], tokenizer, "T", 100)


def test_supervised_pairs_need_an_answer(tokenizer):
    (example,) = encode_sft_examples([PromptRecord(0, "rev 12=", "21", "t")], tokenizer, system_prompt="S")
    assert tokenizer.decode(example.prompt_ids) == render_prompt(tokenizer, "rev 12=", system_prompt="S")
    assert tokenizer.decode(example.completion_ids) == "21<|im_end|>"
    with pytest.raises(ValueError, match="f.jsonl:3: a supervised pair needs an answer"):
        encode_sft_examples([PromptRecord(0, "q", None, "f.jsonl:3")], tokenizer)
