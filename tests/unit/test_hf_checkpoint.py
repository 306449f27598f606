"""HFCheckpoint reads tensors with plain file reads; check it against the safetensors library."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_sapo.convert.hf_checkpoint import HFCheckpoint, SafetensorsError
from megatron_sapo.errors import InputError

pytestmark = pytest.mark.unit


def test_reads_what_safetensors_wrote(tmp_path):
    tensors = {
        "a.bf16": torch.randn(3, 5).bfloat16(),
        "b.f32": torch.randn(7),
        "c.i64": torch.arange(6).reshape(2, 3),
        "d.bool": torch.tensor([True, False, True]),
        "e.empty": torch.empty(0, 4),
        "f.f16": torch.randn(2, 2).half(),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    checkpoint = HFCheckpoint(tmp_path)
    reference = load_file(tmp_path / "model.safetensors")
    assert sorted(checkpoint.names()) == sorted(tensors)
    for name in tensors:
        got = checkpoint.get(name)
        assert got.dtype == reference[name].dtype and torch.equal(got, reference[name]), name


def test_sharded_index_and_errors(tmp_path):
    save_file({"x": torch.ones(2)}, str(tmp_path / "part-1.safetensors"))
    index = {"metadata": {}, "weight_map": {"x": "part-1.safetensors", "y": "part-1.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    checkpoint = HFCheckpoint(tmp_path)
    assert torch.equal(checkpoint.get("x"), torch.ones(2))
    with pytest.raises(SafetensorsError, match="'y' is listed in model.safetensors.index.json but not in the file"):
        checkpoint.get("y")
    with pytest.raises(InputError, match="'z' is not in the checkpoint"):
        checkpoint.get("z")
    index["weight_map"]["w"] = "part-2.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="part-2.safetensors is listed"):
        HFCheckpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(SafetensorsError, match=r"index\.json: not a JSON object with a weight_map .*KeyError"):
        HFCheckpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        HFCheckpoint(tmp_path / "nowhere")
