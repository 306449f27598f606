"""The CLI's error path: input errors in one line with status 2, bugs with their traceback."""

import pytest

from megatron_sapo import cli, selfcheck
from megatron_sapo.config import ConfigError
from megatron_sapo.convert.hf_checkpoint import SafetensorsError
from megatron_sapo.errors import InputError
from megatron_sapo.rollout.weight_sync import WeightSyncError
from megatron_sapo.training.checkpoint import CheckpointError

pytestmark = pytest.mark.unit


@pytest.fixture
def selfcheck_raises(monkeypatch):
    """Make the real ``selfcheck`` subcommand raise the error given."""

    def raising(error: Exception) -> None:
        def run():
            raise error

        monkeypatch.setattr(selfcheck, "run", run)

    return raising


@pytest.mark.parametrize("error", [
    InputError("data/train.jsonl:3: missing field 'prompt'"),
    ConfigError("train.steps = 0 must be >= 1"),
    SafetensorsError("m/model.safetensors: tensor 'x' is truncated"),
    FileNotFoundError("m/config.json: no such file"),
    CheckpointError("run/checkpoints/latest names step_00000002, but it is missing or incomplete"),
])
def test_an_input_error_is_one_line_and_status_2(selfcheck_raises, capsys, error):
    selfcheck_raises(error)
    assert cli.main(["selfcheck"]) == 2
    assert capsys.readouterr().err == f"megatron-sapo selfcheck: error: {error.args[0]}\n"


@pytest.mark.parametrize("error", [
    ValueError("logprobs must be [B, T]; got shape (3,)"),
    KeyError("no mapping for Megatron parameter 'decoder.mystery.weight'"),
    WeightSyncError("http://127.0.0.1:30000/update_weights_from_distributed: HTTP 400: unknown tensor"),
])
def test_a_bug_keeps_its_traceback(selfcheck_raises, capsys, error):
    selfcheck_raises(error)
    with pytest.raises(type(error)) as raised:
        cli.main(["selfcheck"])
    assert raised.value is error
    assert "error:" not in capsys.readouterr().err
