"""Prompt files (JSONL, parquet) with malformed rows, and the seeded data-parallel prompt order."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_sapo.config import DataConfig
from megatron_sapo.data.datasets import MalformedRowsError, PromptSampler, load_split, read_prompt_file

pytestmark = pytest.mark.unit

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_jsonl_reads_text_and_message_prompts_numeric_and_nested_answers(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 1+1?", "answer": "2"},
        "",  # blank lines are not rows
        {"prompt": MESSAGES, "answer": 4},
        {"prompt": "half?", "answer": 0.5, "extra": 1},
    ])
    records = read_prompt_file(path)
    assert [r.prompt for r in records] == ["What is 1+1?", MESSAGES, "half?"]
    assert [r.answer for r in records] == ["2", "4", "0.5"]
    assert [r.index for r in records] == [0, 1, 2]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3", f"{path}:4"]

    nested = write_jsonl(tmp_path / "n.jsonl", [{"q": {"text": "x?"}, "reward_model": {"ground_truth": "7"}}])
    (record,) = read_prompt_file(nested, prompt_key="q.text", answer_key="reward_model.ground_truth")
    assert (record.prompt, record.answer) == ("x?", "7")


def test_jsonl_malformed_rows_are_listed_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "ok", "answer": "1"},
        '{"prompt": "unterminated',
        {"answer": "3"},
        {"prompt": 5, "answer": "4"},
        {"prompt": [{"role": "robot", "content": "hi"}], "answer": "5"},
        {"prompt": "fine", "answer": None},
        "[1, 2]",
    ])
    with pytest.raises(MalformedRowsError) as excinfo:
        read_prompt_file(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: 6 malformed row(s); the first:")
    assert f"{path}:2: invalid JSON (Unterminated string" in message
    assert f"{path}:3: missing field 'prompt'" in message
    assert f"{path}:4: field 'prompt': the prompt must be a string or a non-empty list of messages, got 5" in message
    assert f"{path}:5: field 'prompt': message 0 has role 'robot'" in message
    assert f"{path}:6: field 'answer' must be a string or a number, got None" in message
    assert f"{path}:7" not in message  # only the first five are listed; the count says 6
    assert f"{path}:1:" not in message


def test_invalid_utf8_is_a_malformed_row(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(MalformedRowsError, match=f"{path}:2: not valid UTF-8"):
        read_prompt_file(path)


def test_parquet_with_messages_and_malformed_rows(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": [MESSAGES, [{"role": "user", "content": "3?"}]], "answer": ["4", "3"],
                             "unused": [1, 2]}), good)
    records = read_prompt_file(good)
    assert [r.prompt for r in records] == [MESSAGES, [{"role": "user", "content": "3?"}]]
    assert [r.source for r in records] == [f"{good}: row 0", f"{good}: row 1"]

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a", "", "c"], "answer": ["1", "2", None]}), bad)
    with pytest.raises(MalformedRowsError) as excinfo:
        read_prompt_file(bad)
    assert f"{bad}: row 1: field 'prompt': the prompt is empty" in str(excinfo.value)
    assert f"{bad}: row 2: field 'answer' must be a string or a number, got None" in str(excinfo.value)

    with pytest.raises(MalformedRowsError, match=f"{bad}: no column 'question' \\(columns: prompt, answer\\)"):
        read_prompt_file(bad, prompt_key="question")


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match="must end in .jsonl or .parquet"):
        read_prompt_file(tmp_path / "p.csv")
    with pytest.raises(FileNotFoundError, match="no such prompt file"):
        read_prompt_file(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompt_file(tmp_path / "empty.jsonl")


def test_load_split_from_files_and_from_a_task(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"question": "a", "solution": "1"}])
    cfg = DataConfig(train_path=str(train), prompt_key="question", answer_key="solution")
    assert [r.answer for r in load_split(cfg, "train")] == ["1"]
    with pytest.raises(ValueError, match="data.val_path is not set"):
        load_split(cfg, "val")
    task = DataConfig(task="tiny-reverse", seed=3)
    assert len(load_split(task, "train")) == 660 and len(load_split(task, "val")) == 220


def steps(sampler, n):
    return [sampler.next_indices() for _ in range(n)]


def test_each_epoch_visits_distinct_prompts_and_reshuffles():
    sampler = PromptSampler(50, 8, seed=1)
    assert sampler.steps_per_epoch == 6  # 48 of 50 prompts per epoch; the tail of 2 is dropped
    epochs = [sum(steps(sampler, 6), []) for _ in range(3)]
    assert sampler.epoch == 3
    for epoch in epochs:
        assert len(epoch) == 48 and len(set(epoch)) == 48 and set(epoch) <= set(range(50))
    assert len({tuple(epoch) for epoch in epochs}) == 3  # each epoch in its own order
    assert steps(PromptSampler(50, 8, seed=1), 18) == steps(PromptSampler(50, 8, seed=1), 18)
    assert steps(PromptSampler(50, 8, seed=2), 6) != steps(PromptSampler(50, 8, seed=1), 6)
    assert sum(steps(PromptSampler(50, 8, shuffle=False), 6), []) == list(range(48))


def test_resume_gives_exactly_the_later_prompts():
    uninterrupted = PromptSampler(37, 6, seed=9)
    reference = steps(uninterrupted, 25)
    first = PromptSampler(37, 6, seed=9)
    assert steps(first, 11) == reference[:11]
    state = json.loads(json.dumps(first.state_dict()))  # it must survive serialisation
    resumed = PromptSampler(37, 6, seed=9)
    resumed.load_state_dict(state)
    assert steps(resumed, 14) == reference[11:]


def test_resume_into_a_different_order_is_refused():
    state = PromptSampler(37, 6, seed=9).state_dict()
    with pytest.raises(ValueError, match="the saved seed is 9, this run's is 10"):
        PromptSampler(37, 6, seed=10).load_state_dict(state)
    with pytest.raises(ValueError, match="the saved num_prompts is 37, this run's is 36"):
        PromptSampler(36, 6, seed=9).load_state_dict(state)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((10, 0), {}, "prompts_per_step = 0 must be >= 1"),
        ((5, 6), {}, "the prompt set has 5 prompts, fewer than one step's 6"),
    ],
)
def test_sampler_argument_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptSampler(*args, **kwargs)
