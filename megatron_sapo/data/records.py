"""One problem of a prompt set, in the form every source (files, synthetic tasks) produces.

A prompt is either plain text, sent as a single user message, or a list of chat messages
(``{"role": ..., "content": ...}``). Checking that shape lives here so that files and
generators reject the same things with the same words.

A multimodal problem also carries images, as encoded files (PNG, JPEG, ...). Where they go is
marked by ``<image>`` in the prompt text (one per image, in order); a prompt without any
marker gets all its images before the text of its first user message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Message = dict[str, str]
PromptValue = str | list[Message]

ROLES: tuple[str, ...] = ("system", "user", "assistant")
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class PromptRecord:
    """A problem before tokenisation."""

    index: int
    """Position in its split (stable across epochs; the prompt order is a permutation of these)."""
    prompt: PromptValue
    """Prompt text, or chat messages."""
    answer: str | None
    """Reference answer for the verifier."""
    source: str
    """Where it came from, for error messages: ``file:line``, ``file: row N`` or ``task[split]``."""
    images: tuple[bytes, ...] = ()
    """Encoded image files of a multimodal problem, in placeholder order; empty for text."""
    fields: dict = field(default_factory=dict)
    """The row's other fields, passed to the reward function."""


def prompt_problem(value: object) -> str | None:
    """Why ``value`` is not a valid prompt, or None when it is."""
    if isinstance(value, str):
        return None if value.strip() else "the prompt is empty"
    if not isinstance(value, list) or not value:
        return f"the prompt must be a string or a non-empty list of messages, got {short_repr(value)}"
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"message {i} must be an object with string role and content, got {short_repr(message)}"
        if message.get("role") not in ROLES:
            return f"message {i} has role {message.get('role')!r}; expected one of {', '.join(ROLES)}"
    return None


def placeholder_count(prompt: PromptValue) -> int:
    """Number of ``<image>`` markers in a (valid) prompt."""
    if isinstance(prompt, str):
        return prompt.count(IMAGE_PLACEHOLDER)
    return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in prompt)


def image_placement_problem(prompt: PromptValue, num_images: int) -> str | None:
    """Why the ``<image>`` markers of a (valid) prompt do not fit ``num_images`` images, or None.
    A prompt without images is plain text, markers included (a text data set may spell one)."""
    if num_images == 0:
        return None
    markers = placeholder_count(prompt)
    if markers and markers != num_images:
        return (f"the prompt has {markers} {IMAGE_PLACEHOLDER} marker(s) but {num_images} image(s); "
                f"mark every image or none")
    if not markers and not isinstance(prompt, str) and not any(m["role"] == "user" for m in prompt):
        return "images without <image> markers go into the first user message, and the prompt has none"
    if markers and not isinstance(prompt, str) and any(
            IMAGE_PLACEHOLDER in m["content"] for m in prompt if m["role"] != "user"):
        return f"{IMAGE_PLACEHOLDER} markers may only appear in user messages"
    return None


def answer_text(value: object) -> str | None:
    """The reference answer as text (numbers are accepted and written out), or None if invalid."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
