"""The shipped own-data example (examples/my_data): a math set in the common public layout
(problem, answer, level, ...) and its reward plugin, through the same loaders training uses."""

from __future__ import annotations

from pathlib import Path

from megatron_sapo.data.datasets import read_prompt_file
from megatron_sapo.data.rewards import RewardScorer, get_reward

EXAMPLE = Path(__file__).parents[2] / "examples" / "my_data"
PLUGIN = f"{EXAMPLE / 'boxed_reward.py'}:boxed_math"


def test_the_example_set_loads_with_its_fields():
    records = read_prompt_file(EXAMPLE / "math_tiny.jsonl", prompt_key="problem", answer_key="answer")
    assert len(records) == 16
    assert set(records[0].fields) == {"level", "subject", "unique_id"} and records[0].answer == "56"


def test_the_plugin_scores_boxed_answers_and_reports_its_extras():
    records = read_prompt_file(EXAMPLE / "math_tiny.jsonl", prompt_key="problem", answer_key="answer")
    plugin = get_reward(PLUGIN)
    for record in records:  # every reference answer, boxed, is right; a wrong one is not
        assert plugin(f"so the answer is \\boxed{{{record.answer}}}", record.answer, record.fields)["score"] == 1.0
        assert plugin("\\boxed{99999}", record.answer, record.fields)["score"] == 0.0
    responses = ["\\boxed{56}", "7/8", "\\boxed{4}"]
    with RewardScorer(PLUGIN, timeout_s=30, workers=2) as scorer:
        scores = scorer.score(responses, [r.answer for r in records[:3]], [r.fields for r in records[:3]])
    assert scores.scores == [1.0, 1.0, 0.0]
    assert scores.extra_means() == {"reward_boxed_mean": 2 / 3, "reward_level_mean": 1.0}
