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
from megatron_sapo.errors import InputError

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
    assert result.first_error.startswith("Traceback (most recent call last):")
    assert result.first_error.endswith("RuntimeError: verifier exploded") and "in flaky_reward" in result.first_error
    assert elapsed < 30, f"the slow call was not cut at its timeout ({elapsed:.1f} s)"


def test_scorer_keeps_its_worker_between_batches_and_checks_inputs():
    with RewardScorer(math_reward, timeout_s=5.0) as scorer:
        first = scorer.score([r"\boxed{2}", "3"], ["2", "4"])
        worker = scorer._pool[0].process
        second = scorer.score(["1/2"], ["0.5"])
        assert scorer._pool[0].process is worker
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


# ---- reward plugins: a file or a module, called with the row's fields, several workers ----------

PLUGIN = """
import time

def graded(response, answer, fields):
    if response == "boom":
        raise ValueError("cannot parse " + response)
    if response == "slow":
        time.sleep(float(fields.get("delay", 60)))
    right = response == answer
    return {"score": float(right), "format_ok": float(response.isdigit()), "level": fields.get("level", 0)}

def two_args(response, answer):
    return 0.5

def no_args():
    return 1.0

not_a_function = 3
"""


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(PLUGIN)
    return path


def test_a_plugin_file_gets_the_rows_fields_and_its_extras_are_averaged(plugin):
    responses, answers = ["4", "x", "boom", "7"], ["4", "4", "4", "4"]
    fields = [{"level": 1}, {"level": 3}, {}, {"level": 2}]
    result = score_samples(f"{plugin}:graded", responses, answers, timeout_s=10.0, fields=fields)
    assert result.scores == [1.0, 0.0, 0.0, 0.0] and result.errors == 1
    assert "ValueError: cannot parse boom" in result.first_error and "in graded" in result.first_error
    assert result.extras == {"format_ok": [1.0, 0.0, 1.0], "level": [1.0, 3.0, 2.0]}
    assert result.extra_means() == {"reward_format_ok_mean": pytest.approx(2 / 3), "reward_level_mean": 2.0}
    assert score_samples(f"{plugin}:two_args", ["a"], ["b"], timeout_s=10.0).scores == [0.5]


def test_a_plugin_module_by_import_path():
    assert get_reward("megatron_sapo.data.rewards:exact_match_reward") is rewards.exact_match_reward


@pytest.mark.parametrize("spec, message", [
    ("{dir}/absent.py:graded", "no such file {dir}/absent.py"),
    ("{plugin}:missing", "{plugin} has no function 'missing'"),
    ("{plugin}:not_a_function", "not_a_function is a int, not a function"),
    ("{plugin}:no_args", r"no_args\(\) cannot be called as \(response, answer, fields\)"),
    ("no_such_module_here:f", "cannot import module 'no_such_module_here'"),
    ("nope", "unknown reward 'nope'"),
])
def test_bad_plugins_are_refused_naming_the_file_and_function(plugin, spec, message):
    spec, message = (x.format(dir=plugin.parent, plugin=plugin) for x in (spec, message))
    with pytest.raises(InputError, match=message):
        RewardScorer(spec, timeout_s=1.0)


def test_workers_score_at_once_and_a_timeout_costs_only_its_call(plugin):
    """4 calls that sleep 1 s each: one worker takes 4 s, four take about 1 s. A call past its
    timeout (2 s) scores 0, is counted, and its worker is replaced."""
    fields = [{"delay": 1.0}] * 4
    with RewardScorer(f"{plugin}:graded", timeout_s=2.0, workers=4) as pool, \
            RewardScorer(f"{plugin}:graded", timeout_s=2.0, workers=1) as one:
        for scorer in (pool, one):  # start the workers before timing
            scorer.score(["1"] * scorer.workers, ["1"] * scorer.workers)
        start = time.monotonic()
        assert pool.score(["slow"] * 4, ["slow"] * 4, fields).scores == [1.0] * 4
        parallel = time.monotonic() - start
        start = time.monotonic()
        assert one.score(["slow"] * 4, ["slow"] * 4, fields).scores == [1.0] * 4
        serial = time.monotonic() - start
        mixed = pool.score(["slow", "2", "slow", "3"], ["x", "2", "slow", "3"],
                           [{"delay": 30}, {}, {"delay": 0.2}, {}])
    print(f"\n4 calls of 1 s: {serial:.2f} s with one worker, {parallel:.2f} s with four")
    assert serial > 3.9 and parallel < serial / 2
    assert mixed.scores == [0.0, 1.0, 1.0, 1.0] and mixed.timeouts == 1 and mixed.errors == 0
    assert mixed.first_error.startswith("timeout")


def test_registered_rewards_reach_the_workers_by_name():
    with RewardScorer("exact_match", timeout_s=5.0, workers=2) as scorer:
        assert scorer.score(["a", "b", "c"], ["a", "x", "c"]).scores == [1.0, 0.0, 1.0]


def test_a_config_naming_a_missing_plugin_fails_when_it_loads(tmp_path, plugin):
    from megatron_sapo.config import ConfigError
    from megatron_sapo.config_file import load_config

    config = tmp_path / "run.toml"
    base = '[model]\nbuiltin = "tiny-qwen3-moe"\n[data]\ntask = "tiny-reverse"\n'
    config.write_text(base + f'reward = "{tmp_path}/absent.py:graded"\n')
    with pytest.raises(ConfigError, match=f"data.reward: reward '{tmp_path}/absent.py:graded': no such file"):
        load_config(config)
    config.write_text(base + f'reward = "{plugin}:graded"\nreward_workers = 4\n')
    assert load_config(config).data.reward_workers == 4


def test_eval_sets_can_be_given_with_set(tmp_path):
    from megatron_sapo.config_file import load_config

    config = tmp_path / "run.toml"
    config.write_text('[model]\nbuiltin = "tiny-qwen3-moe"\n[data]\ntask = "tiny-reverse"\n')
    cfg = load_config(config, ['eval.sets=[{name = "held_out", path = "x.jsonl", samples = 2}]'])
    assert [(s.name, s.path, s.samples, s.reward) for s in cfg.eval.sets] == [("held_out", "x.jsonl", 2, "math")]


@pytest.mark.parametrize("overrides, message", [
    (["data.reward_url=ftp://host/score"], "data.reward_url must start with http:// or https://, got 'ftp:"),
    (["data.reward_url=http://host/score", "data.reward=math"], "data.reward and data.reward_url both name a reward"),
    (["data.reward_workers=0"], "data.reward_workers"),
    (["data.reward_retries=-1"], "data.reward_retries"),
    (["rollout.filter_groups=all_equal"], "rollout.filter_groups must be one of"),
    (["rollout.max_sampling_rounds=0"], "rollout.max_sampling_rounds"),
    (['eval.sets=[{name = "Held-Out", path = "x.jsonl"}]'], "name must be lowercase letters, digits and _, got 'Hel"),
    (['eval.sets=[{name = "a", path = "x.jsonl"}, {name = "a", path = "y.jsonl"}]'], r"must differ, got \['a', 'a'\]"),
    (['eval.sets=[{name = "a", path = "x.jsonl", samples = 0}]'], r"eval.sets\['a'\].samples"),
    (['eval.sets=[{name = "a", path = "x.jsonl", temperature = 0}]'], r"eval.sets\['a'\].temperature"),
])
def test_bad_reward_filtering_and_eval_settings_are_refused_naming_the_field(tmp_path, overrides, message):
    from megatron_sapo.config import ConfigError
    from megatron_sapo.config_file import load_config

    config = tmp_path / "run.toml"
    config.write_text('[model]\nbuiltin = "tiny-qwen3-moe"\n[data]\ntask = "tiny-reverse"\n')
    with pytest.raises(ConfigError, match=message):
        load_config(config, overrides)
