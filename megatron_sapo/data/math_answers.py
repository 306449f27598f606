"""The math verifier: find a response's final answer and compare it with the reference.

The final answer is the content of the last complete ``\\boxed{...}`` (braces may nest); a
response without ``\\boxed`` falls back to its last number. A response whose only ``\\boxed``
is cut off scores nothing, rather than falling back to a number that happens to precede it.

Two answers match when both read as the same rational number, compared exactly as fractions
(so ``0.75 == 3/4`` with no float tolerance), or, when either is not a number, when their
normalised texts are equal. Numbers may be integers, decimals, ``a/b`` or ``\\frac{a}{b}``
(also ``\\dfrac``, ``\\tfrac``, nested), with thousands separators, a trailing period, ``$``,
``\\left`` / ``\\right`` (and their invisible ``.`` delimiter) and LaTeX spacing ignored.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_LAST_NUMBER = re.compile(r"(?:(?<![\d)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_FRAC = re.compile(r"\\[dt]?frac")
# LaTeX that changes how an answer looks but not what it is.
_COSMETIC = re.compile(r"\\(?:left|right)\.?|\\displaystyle|\\[,;:! ]|\s|\$")


def math_reward(response: str, answer: str | None) -> float:
    """1.0 when the response's final answer equals the reference answer, else 0.0."""
    predicted = extract_final_answer(response)
    if predicted is None or answer is None:
        return 0.0
    reference = extract_final_answer(answer) if _BOXED.search(answer) else answer
    return 1.0 if reference is not None and answers_match(predicted, reference) else 0.0


def extract_final_answer(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}``, else the last number, else None."""
    boxes = list(_BOXED.finditer(text))
    if boxes:
        for match in reversed(boxes):
            content = _braced(text, match.end())
            if content is not None:
                return content[0]
        return None
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def answers_match(predicted: str, reference: str) -> bool:
    """Equal as exact numbers when both are numbers, else equal as normalised text."""
    a, b = parse_number(predicted), parse_number(reference)
    if a is not None and b is not None:
        return a == b
    return _normalise(predicted) == _normalise(reference)


def parse_number(text: str) -> Fraction | None:
    """The exact value of a numeric answer, or None if it is not one."""
    text = _normalise(text)
    while text.startswith("{") and _braced(text, 0) == (text[1:-1], len(text)):
        text = text[1:-1]
    sign = 1
    if text.startswith(("-", "+")):
        sign, text = (-1 if text[0] == "-" else 1), text[1:]
    if _FRAC.match(text):
        return _parse_frac(text, sign)
    if not re.fullmatch(r"\d+(?:\.\d*)?(?:/\d+)?|\.\d+", text):
        return None
    try:
        return sign * Fraction(text)
    except ZeroDivisionError:
        return None


def _parse_frac(text: str, sign: int) -> Fraction | None:
    numerator = _braced(text, _FRAC.match(text).end())
    denominator = numerator and _braced(text, numerator[1])
    if not denominator or denominator[1] != len(text):
        return None
    top, bottom = parse_number(numerator[0]), parse_number(denominator[0])
    if top is None or not bottom:
        return None
    return sign * top / bottom


def _normalise(text: str) -> str:
    text = _THOUSANDS.sub("", _COSMETIC.sub("", text))
    return text.rstrip(".")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """(content, end) of the brace group opening at ``start`` (spaces skipped), or None if there
    is none or it never closes; ``end`` is just past the closing brace."""
    while start < len(text) and text[start] == " ":
        start += 1
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i], i + 1
    return None
