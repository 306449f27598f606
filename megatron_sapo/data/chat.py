"""Prompts through the tokenizer's chat template into the token ids the rollout engine extends.

The template is rendered to text and the text encoded without added special tokens, rather than
asking ``apply_chat_template`` for ids: templates already write their own BOS where the model
wants one, and encoding the text ourselves keeps the result a plain ``list[int]`` whatever the
transformers version returns for ``tokenize=True``. ``add_generation_prompt=True`` ends the
prompt with the assistant header, so the response is exactly what the policy generates.

Supervised (cold-start) pairs are formatted the same way, with the completion written as a
perfect sampled response would be: the reference answer, then the EOS token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from jinja2 import TemplateError

from megatron_sapo.data.records import Message, PromptRecord, PromptValue
from megatron_sapo.types import Prompt


class MissingChatTemplateError(ValueError):
    """The tokenizer has no chat template, so prompts cannot be formatted as the model expects."""


def prompt_messages(prompt: PromptValue, system_prompt: str | None = None) -> list[Message]:
    """Chat messages of a prompt: text becomes one user message; the system prompt goes first."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt is None:
        return messages
    if any(m["role"] == "system" for m in messages):
        raise ValueError("the prompt has its own system message and data.system_prompt is set; keep one")
    return [{"role": "system", "content": system_prompt}, *messages]


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise MissingChatTemplateError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; prompts are "
            "formatted with it (add chat_template.jinja or tokenizer_config.json's chat_template)")


def render_prompt(tokenizer, prompt: PromptValue, system_prompt: str | None = None) -> str:
    """The prompt as the model sees it: chat template applied, ending with the assistant header."""
    require_chat_template(tokenizer)
    return tokenizer.apply_chat_template(
        prompt_messages(prompt, system_prompt), tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: PromptValue, system_prompt: str | None = None) -> list[int]:
    """Token ids of the rendered prompt."""
    return list(tokenizer(render_prompt(tokenizer, prompt, system_prompt), add_special_tokens=False)["input_ids"])


@dataclass
class EncodedPrompts:
    """Prompts ready for rollout, and those left out for being too long."""

    prompts: list[Prompt]
    too_long: list[str]
    """Sources (file:line) of the prompts longer than the limit."""


def encode_records(records: Sequence[PromptRecord], tokenizer, system_prompt: str | None,
                   max_prompt_tokens: int) -> EncodedPrompts:
    """Tokenise every record once, up front, so that the prompt order is over usable prompts
    only; over-long ones are reported back rather than cut (a cut problem is a different one)."""
    require_chat_template(tokenizer)
    prompts, too_long = [], []
    for record in records:
        try:
            text = render_prompt(tokenizer, record.prompt, system_prompt)
        except (ValueError, TemplateError) as err:  # e.g. a template refusing a message order
            raise ValueError(f"{record.source}: {err}") from None
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) > max_prompt_tokens:
            too_long.append(record.source)
            continue
        prompts.append(Prompt(index=len(prompts), prompt_ids=ids, answer=record.answer, text=text))
    return EncodedPrompts(prompts=prompts, too_long=too_long)


@dataclass(frozen=True)
class SFTExample:
    """One supervised pair as token ids; the loss covers the completion only."""

    prompt_ids: list[int]
    completion_ids: list[int]
    """The answer's tokens followed by EOS."""


def completion_text(answer: str, eos_token: str) -> str:
    """A worked answer as the policy should write it: the bare answer, then EOS (where the
    rollout engine stops), with no chat-turn closing added after it."""
    return answer + eos_token


def encode_sft_examples(records: Sequence[PromptRecord], tokenizer,
                        system_prompt: str | None = None) -> list[SFTExample]:
    """Supervised pairs: the chat-formatted prompt, and the answer followed by the EOS token."""
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end the completions with")
    examples = []
    for record in records:
        if record.answer is None:
            raise ValueError(f"{record.source}: a supervised pair needs an answer")
        completion = tokenizer(completion_text(record.answer, tokenizer.eos_token), add_special_tokens=False)
        examples.append(SFTExample(prompt_ids=encode_prompt(tokenizer, record.prompt, system_prompt),
                                   completion_ids=list(completion["input_ids"])))
    return examples
