"""Reward registry, the math verifier, and scoring with timeouts and failure counts."""

import math
import os
import sys
import time
import types

import pytest

from megatron_sapo.data import rewards
from megatron_sapo.data.math_answers import answers_match, extract_final_answer, math_reward, parse_number
from megatron_sapo.data.rewards import RewardScorer, get_reward, register_reward, score_samples

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "response, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{3}{4}}", r"\frac{3}{4}"),
        (r"$\boxed{ {a}^{b_{c}} }$", " {a}^{b_{c}} "),
        (r"\boxed {7}", "7"),
        (r"\boxed{5} and finally \boxed{6", "5"),  # the last box is cut off: the complete one counts
        (r"\boxed{6", None),                        # no complete box: no fallback to the number inside
        ("the answer is 1,234.", "1,234"),
        ("x = -5", "-5"),
        ("3-5 is 2", "2"),
        ("ratio 3/4", "3/4"),
        ("2.50 dollars", "2.50"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_final_answer(response, expected):
    assert extract_final_answer(response) == expected


@pytest.mark.parametrize(
    "response, answer, score",
    [
        (r"The answer is \boxed{42}.", "42", 1.0),
        (r"\boxed{42.0}", "42", 1.0),
        (r"\boxed{\frac{3}{4}}", "0.75", 1.0),
        (r"\boxed{\dfrac{6}{8}}", "3/4", 1.0),
        (r"\boxed{-\frac{1}{2}}", "-0.5", 1.0),
        (r"\boxed{\frac{-1}{2}}", "-1/2", 1.0),
        (r"\boxed{$\left(\frac{3}{4}\right)$}", "0.75", 0.0),  # parentheses stay: "(3/4)" is compared as text
        (r"\boxed{\left.\frac{3}{4}\right.}", "3/4", 1.0),
        (r"$\boxed{1,000}$", "1000", 1.0),
        ("so we get 1,000,000.", "1000000", 1.0),
        ("I think it is 17.", "17", 1.0),
        ("it is 17, not 18", "17", 0.0),        # the last number counts
        (r"\boxed{41}", "42", 0.0),
        (r"\boxed{\frac{3}{0}}", "0", 0.0),
        (r"\boxed{x^2+1}", "x^2 + 1", 1.0),       # not numbers: normalised text must match
        (r"\boxed{\pi}", r"\pi", 1.0),
        (r"\boxed{A}", "B", 0.0),
        ("42", r"\boxed{42}", 1.0),              # a boxed reference is unboxed
        ("lorem ipsum", "42", 0.0),
        ("", "42", 0.0),
        ("}}{{\\boxed{", "1", 0.0),
        ("42", None, 0.0),
    ],
)
def test_math_reward(response, answer, score):
    assert math_reward(response, answer) == score


def test_parse_number_is_exact():
    assert parse_number(r"\frac{1}{3}") * 3 == 1
    assert parse_number("0.1") + parse_number("0.2") == parse_number("0.3")  # no float rounding
    assert parse_number("{{12}}") == 12 and parse_number("+7") == 7
    assert parse_number("1/0") is None and parse_number("12abc") is None and parse_number("1,2") is None
    assert answers_match("0.333", "1/3") is False


def test_registry():
    assert get_reward("math") is math_reward
    assert get_reward("exact_match")(" 704 ", "704") == 1.0 and get_reward("exact_match")("70", "704") == 0.0
    with pytest.raises(ValueError, match="unknown reward 'nope'; registered: exact_match, math"):
        get_reward("nope")


def test_register_reward(monkeypatch):
    monkeypatch.setattr(rewards, "_REGISTRY", dict(rewards._REGISTRY))

    @register_reward("length")
    def length_reward(response, answer):
        return float(len(response))

    assert get_reward("length") is length_reward
    with pytest.raises(ValueError, match="a reward named 'length' is already registered"):
        register_reward("length")(math_reward)


# Module-level, so the worker process can import them by name.
def flaky_reward(response: str, answer: str | None) -> float:
    if response == "slow":
        time.sleep(60)
    if response == "boom":
        raise RuntimeError("verifier exploded")
    if response == "nan":
        return math.nan
    if response == "text":
        return "1"
    if response == "crash":
        os._exit(3)
    return 1.0 if response == answer else 0.0


def test_failures_score_zero_and_are_counted():
    responses = ["8", "boom", "slow", "nan", "text", "crash", "8", "7"]
    start = time.monotonic()
    result = score_samples(flaky_reward, responses, ["8"] * len(responses), timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result.scores == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert result.timeouts == 1 and result.errors == 4
    assert result.first_error == "RuntimeError: verifier exploded"
    assert elapsed < 30, f"the slow call was not cut at its timeout ({elapsed:.1f} s)"


def test_scorer_keeps_its_worker_between_batches_and_checks_inputs():
    with RewardScorer(math_reward, timeout_s=5.0) as scorer:
        first = scorer.score([r"\boxed{2}", "3"], ["2", "4"])
        worker = scorer._worker
        second = scorer.score(["1/2"], ["0.5"])
        assert scorer._worker is worker
        with pytest.raises(ValueError, match="2 responses but 1 answers"):
            scorer.score(["a", "b"], ["a"])
    assert (first.scores, first.errors, first.timeouts) == ([1.0, 0.0], 0, 0) and second.scores == [1.0]
    assert not worker.is_alive()


def test_reward_functions_must_be_importable():
    with pytest.raises(ValueError, match="must be importable by name"):
        RewardScorer(lambda response, answer: 1.0, timeout_s=1.0)


def test_a_worker_that_cannot_start_is_an_error(monkeypatch):
    module = types.ModuleType("reward_only_in_this_process")
    exec("def reward(response, answer):\n    return 1.0\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)  # picklable here, not importable there
    with pytest.raises(RuntimeError, match="reward worker for reward_only_in_this_process.reward exited while starting"):
        score_samples(module.reward, ["a"], ["a"], timeout_s=5.0)
