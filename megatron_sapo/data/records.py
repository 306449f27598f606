"""One problem of a prompt set, in the form every source (files, synthetic tasks) produces.

A prompt is either plain text, sent as a single user message, or a list of chat messages
(``{"role": ..., "content": ...}``). Checking that shape lives here so that files and
generators reject the same things with the same words.
"""

from __future__ import annotations

from dataclasses import dataclass

Message = dict[str, str]
PromptValue = str | list[Message]

ROLES: tuple[str, ...] = ("system", "user", "assistant")


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


def prompt_problem(value: object) -> str | None:
    """Why ``value`` is not a valid prompt, or None when it is."""
    if isinstance(value, str):
        return None if value.strip() else "the prompt is empty"
    if not isinstance(value, list) or not value:
        return f"the prompt must be a string or a non-empty list of messages, got {_short(value)}"
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"message {i} must be an object with string role and content, got {_short(message)}"
        if message.get("role") not in ROLES:
            return f"message {i} has role {message.get('role')!r}; expected one of {', '.join(ROLES)}"
    return None


def answer_text(value: object) -> str | None:
    """The reference answer as text (numbers are accepted and written out), or None if invalid."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
