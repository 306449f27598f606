"""Prompts through the tokenizer's chat template into the token ids the rollout engine extends.

The template is rendered to text and the text encoded without added special tokens, rather than
asking ``apply_chat_template`` for ids: templates already write their own BOS where the model
wants one, and encoding the text ourselves keeps the result a plain ``list[int]`` whatever the
transformers version returns for ``tokenize=True``. ``add_generation_prompt=True`` ends the
prompt with the assistant header, so the response is exactly what the policy generates.

Supervised (cold-start) pairs are formatted the same way, with the completion written as a
perfect sampled response would be: the reference answer, then the EOS token.

A prompt with images goes through the model's processor instead (``AutoProcessor`` of the model
folder): each image becomes an image content part (``{"type": "image"}``) where its ``<image>``
marker was, the chat template writes one image placeholder per part, and the processor expands
each placeholder to the image's number of tokens and computes the pixel patches the vision
encoder reads. Both are kept with the prompt (``Prompt.vision``) so the trainer feeds exactly
what was counted into ``prompt_ids``. Text-only prompts never touch the processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from jinja2 import TemplateError

from megatron_sapo.data.records import IMAGE_PLACEHOLDER, Message, PromptRecord, PromptValue
from megatron_sapo.errors import InputError
from megatron_sapo.types import Prompt, VisionInputs


class MissingChatTemplateError(InputError):
    """The tokenizer has no chat template, so prompts cannot be formatted as the model expects."""


def prompt_messages(prompt: PromptValue, system_prompt: str | None = None) -> list[Message]:
    """Chat messages of a prompt: text becomes one user message; the system prompt goes first."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt is None:
        return messages
    if any(m["role"] == "system" for m in messages):
        raise InputError("the prompt has its own system message and data.system_prompt is set; keep one")
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
                   max_prompt_tokens: int, processor=None) -> EncodedPrompts:
    """Tokenise every record once, up front, so that the prompt order is over usable prompts
    only; over-long ones are reported back rather than cut (a cut problem is a different one).

    ``processor``: the model's multimodal processor, needed by records with images."""
    require_chat_template(tokenizer)
    prompts, too_long = [], []
    for record in records:
        try:
            if record.images:
                prompt = encode_image_prompt(processor, record, system_prompt)
            else:
                text = render_prompt(tokenizer, record.prompt, system_prompt)
                prompt = Prompt(index=0, prompt_ids=list(tokenizer(text, add_special_tokens=False)["input_ids"]),
                                answer=record.answer, text=text, fields=record.fields)
        except (ValueError, TemplateError) as err:  # e.g. a template refusing a message order
            raise InputError(f"{record.source}: {err}") from None
        if len(prompt.prompt_ids) > max_prompt_tokens:
            too_long.append(record.source)
            continue
        prompt.index = len(prompts)
        prompts.append(prompt)
    return EncodedPrompts(prompts=prompts, too_long=too_long)


def image_messages(prompt: PromptValue, num_images: int, system_prompt: str | None = None) -> list[dict]:
    """Chat messages with content parts: each ``<image>`` marker becomes an image part, or, with
    no marker, all images come first in the first user message."""
    messages = prompt_messages(prompt, system_prompt)
    marked = any(IMAGE_PLACEHOLDER in m["content"] for m in messages)
    result, placed = [], 0
    for message in messages:
        pieces = message["content"].split(IMAGE_PLACEHOLDER)
        parts = [{"type": "text", "text": pieces[0]}]
        for piece in pieces[1:]:
            parts += [{"type": "image"}, {"type": "text", "text": piece}]
        if not marked and message["role"] == "user" and placed == 0:
            parts = [{"type": "image"}] * num_images + parts
        parts = [part for part in parts if part["type"] == "image" or part["text"]]
        placed += sum(part["type"] == "image" for part in parts)
        result.append({"role": message["role"], "content": parts})
    if placed != num_images:
        raise InputError(f"the prompt places {placed} image(s) but carries {num_images}")
    return result


def encode_image_prompt(processor, record: PromptRecord, system_prompt: str | None = None) -> Prompt:
    """A record with images through the chat template and the processor (``index`` 0: the
    caller numbers the prompts it keeps)."""
    if processor is None:
        raise InputError("the problem has images but the model has no multimodal processor "
                         "(a vision-language model folder holds its processor config)")
    tokenizer = processor.tokenizer
    require_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(image_messages(record.prompt, len(record.images), system_prompt),
                                         tokenize=False, add_generation_prompt=True)
    encoded = processor(text=[text], images=[decode_image(data) for data in record.images], return_tensors="pt")
    vision = VisionInputs(pixel_values=encoded["pixel_values"], image_grid_thw=encoded["image_grid_thw"].long())
    if vision.num_images != len(record.images):
        raise InputError(f"the processor made {vision.num_images} image(s) of {len(record.images)}: does the chat "
                         "template write one image placeholder per image part?")
    return Prompt(index=0, prompt_ids=encoded["input_ids"][0].tolist(), answer=record.answer, text=text,
                  images=list(record.images), vision=vision, fields=record.fields)


def decode_image(data: bytes):
    """An encoded image file as an RGB PIL image (what the processors expect)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


@dataclass(frozen=True)
class SFTExample:
    """One supervised pair as token ids; the loss covers the completion only."""

    prompt_ids: list[int]
    completion_ids: list[int]
    """The answer's tokens followed by EOS."""
    vision: VisionInputs | None = None
    """The prompt's images as the processor made them (None for a text prompt)."""


def completion_text(answer: str, eos_token: str) -> str:
    """A worked answer as the policy should write it: the bare answer, then EOS (where the
    rollout engine stops), with no chat-turn closing added after it."""
    return answer + eos_token


def encode_sft_examples(records: Sequence[PromptRecord], tokenizer, system_prompt: str | None = None,
                        processor=None) -> list[SFTExample]:
    """Supervised pairs: the chat-formatted prompt, and the answer followed by the EOS token.
    Records with images go through ``processor`` as prompts do (``encode_image_prompt``)."""
    if tokenizer.eos_token is None:
        raise InputError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end the completions with")
    examples = []
    for record in records:
        if record.answer is None:
            raise InputError(f"{record.source}: a supervised pair needs an answer")
        completion = list(tokenizer(completion_text(record.answer, tokenizer.eos_token),
                                    add_special_tokens=False)["input_ids"])
        if record.images:
            prompt = encode_image_prompt(processor, record, system_prompt)
            examples.append(SFTExample(prompt.prompt_ids, completion, prompt.vision))
        else:
            examples.append(SFTExample(encode_prompt(tokenizer, record.prompt, system_prompt), completion))
    return examples
