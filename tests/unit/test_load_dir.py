"""checkpoint.load_dir: which folders name Megatron weights, and the architecture check."""

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_sapo.training.checkpoint import CheckpointError, weights_dir
from megatron_sapo.convert.mcore_checkpoint import config_differences
from megatron_sapo.training.setup import megatron_weights

pytestmark = pytest.mark.unit

CONFIG = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 48, "num_experts": 4, "dtype": "float32",
          "transformers_version": "5.0.0", "rope_scaling": None}


def weights(folder, config=CONFIG):
    folder.mkdir(parents=True)
    dcp.save({"w": torch.zeros(2)}, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    (folder / "hf_config.json").write_text(json.dumps(config))
    return folder


def test_converted_checkpoint_training_checkpoint_and_checkpoints_folder(tmp_path):
    converted = weights(tmp_path / "mcore")
    assert weights_dir(converted) == converted
    step = tmp_path / "run" / "checkpoints" / "step_00000004"
    weights(step / "model")
    (step / "trainer_state.json").write_text("{}")
    assert weights_dir(step) == step / "model"
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000004\n")
    assert weights_dir(tmp_path / "run" / "checkpoints") == step / "model"


def test_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights_dir(tmp_path / "missing")
    (tmp_path / "hf").mkdir()
    with pytest.raises(CheckpointError, match=r"hf is not a Megatron checkpoint \(no .metadata\)"):
        weights_dir(tmp_path / "hf")


def test_architecture_differences_are_named(tmp_path):
    other = {**CONFIG, "num_experts": 8, "transformers_version": "4.57.0", "dtype": "bfloat16"}
    assert config_differences(other, CONFIG) == ["num_experts: 8 -> 4"]
    nested = {"text_config": {"hidden_size": 48}, "vision_config": {"depth": 2}}
    assert config_differences(nested, {"text_config": {"hidden_size": 64}, "vision_config": {"depth": 2}}) == [
        "text_config.hidden_size: 48 -> 64"]
    folder = weights(tmp_path / "mcore", other)
    with pytest.raises(ValueError, match=r"load_dir = .*mcore: its model differs from /m/config.json in num_experts: 8 -> 4"):
        megatron_weights(str(folder), CONFIG, "/m")
    assert megatron_weights(str(folder), other, "/m") == folder
