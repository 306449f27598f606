"""The built-in synthetic tasks: deterministic, disjoint splits, correct answers, cold-start pairs."""

import pytest

from megatron_sapo.data.rewards import get_reward
from megatron_sapo.data.chat import completion_text, encode_sft_examples
from megatron_sapo.data.synthetic import SPLITS, TASKS
from megatron_sapo.data.tasks import get_task
from megatron_sapo.data.tiny_tokenizer import EOS_ID, VOCAB, save_tiny_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp_path_factory.mktemp("synthetic_tok")))


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_deterministic_disjoint_and_cover_every_problem(name):
    task = get_task(name)
    splits = {split: task.records(split, seed=7) for split in SPLITS}
    assert splits == {split: task.records(split, seed=7) for split in SPLITS}
    assert task.records("train", seed=8) != splits["train"]
    prompts = {split: [r.prompt for r in records] for split, records in splits.items()}
    everything = [p for p, _ in task.enumerate_problems()]
    assert sorted(sum(prompts.values(), [])) == sorted(everything)
    assert len(set(everything)) == len(everything)
    for split in SPLITS:
        assert len(set(prompts[split])) == len(prompts[split])
    assert len(prompts["val"]) == len(prompts["sft"]) == round(0.2 * len(everything))
    assert [r.index for r in splits["train"]] == list(range(len(splits["train"])))


def test_reverse_task_answers_and_graded_difficulty():
    records = get_task("tiny-reverse").records("train", seed=0)
    for record in records:
        digits = record.prompt.removeprefix("rev ").removesuffix("=")
        assert digits.isdigit() and record.answer == digits[::-1]
    widths = {len(r.answer) for r in records}
    assert widths == {2, 3}


def test_addition_task_answers():
    for record in get_task("tiny-add").records("val", seed=0):
        a, b = record.prompt.removesuffix("=").split("+")
        assert record.answer == str(int(a) + int(b))


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown synthetic task 'sudoku'; known: tiny-reverse, tiny-add"):
        get_task("sudoku")
    with pytest.raises(ValueError, match="has splits train, val, sft, not 'test'"):
        get_task("tiny-reverse").records("test", seed=0)


ANSWER_TOKENS = {"tiny-reverse": (3, 4), "tiny-add": (2, 4), "tiny-reverse-long": (4, 7)}
"""Fewest and most completion tokens (answer and EOS) of each task."""


def test_long_reverse_task_answers_widths_and_a_fixed_problem_set():
    problems = get_task("tiny-reverse-long").enumerate_problems()
    assert problems == get_task("tiny-reverse-long").enumerate_problems()
    assert len(problems) == len(set(problems)) == 4000
    for prompt, answer in problems:
        digits = prompt.removeprefix("rev ").removesuffix("=")
        assert digits.isdigit() and answer == digits[::-1]
    widths = [len(answer) for _, answer in problems]
    assert {w: widths.count(w) for w in set(widths)} == {3: 1000, 4: 1000, 5: 1000, 6: 1000}


@pytest.mark.parametrize("name", list(TASKS))
def test_cold_start_pairs_end_with_eos_and_fit_in_their_answer_tokens(tokenizer, name):
    records = get_task(name).records("sft", seed=0)
    examples = encode_sft_examples(records, tokenizer)
    assert len(examples) == len(records)
    reward = get_reward(get_task(name).reward)
    for record, example in zip(records, examples):
        fewest, most = ANSWER_TOKENS[name]
        assert example.completion_ids[-1] == EOS_ID and fewest <= len(example.completion_ids) <= most
        assert VOCAB["<|unk|>"] not in example.prompt_ids + example.completion_ids
        assert tokenizer.decode(example.prompt_ids).endswith(f"user\n{record.prompt}<|im_end|>\n<|im_start|>assistant\n")
        response = tokenizer.decode(example.completion_ids, skip_special_tokens=True)
        assert reward(response, record.answer) == 1.0  # a perfect response scores 1 with the task's verifier
    assert completion_text("704", "<|im_end|>") == "704<|im_end|>"
