"""hf-to-mcore's writer: one checkpoint file per layer, so finished layers leave memory.

torch's file-system writer keeps the last tensor written under each key until it closes the
file. These tests convert the tiny model for real and watch which of the tensors handed to
torch are still alive while the next ones are produced.
"""

import json
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_sapo.convert import streaming
from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.models.tiny import save_tiny_qwen3_moe

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_qwen3_moe(tmp_path_factory.mktemp("streaming") / "hf")


def convert(hf_dir: Path, out: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    streaming.hf_to_mcore(hf_dir, out, config, torch.float32)


@pytest.mark.parametrize("key, group", [
    ("embedding.word_embeddings.weight", "embedding.word_embeddings.weight"),
    ("decoder.layers.3.self_attention.linear_qkv.weight", "decoder.layers.3"),
    ("decoder.layers.12.mlp.experts.experts.linear_fc1._extra_state/shard_5_128", "decoder.layers.12"),
    ("vision_model.blocks.0.attn.qkv.weight", "vision_model.blocks.0"),
    ("decoder.final_layernorm.weight", "decoder.final_layernorm.weight"),
])
def test_file_group(key, group):
    assert streaming.file_group(key) == group


def test_one_file_per_layer(hf_dir, tmp_path):
    convert(hf_dir, tmp_path / "mcore")
    metadata = dcp.FileSystemReader(str(tmp_path / "mcore")).read_metadata()
    files: dict[str, set[str]] = {}
    for index, info in metadata.storage_data.items():
        files.setdefault(streaming.file_group(index.fqn), set()).add(info.relative_path)
    layers = json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"]
    assert {f"decoder.layers.{i}" for i in range(layers)} <= set(files)
    assert all(len(names) == 1 for names in files.values()), files
    assert len({name for names in files.values() for name in names}) == len(files)
    on_disk = {p.name for p in (tmp_path / "mcore").glob("*.distcp")}
    assert on_disk == {name for names in files.values() for name in names}


def test_finished_layers_are_released(hf_dir, tmp_path, monkeypatch):
    """While a layer is written, at most one tensor of an earlier group is still alive: the
    previous file's last tensor, which torch's loop variable holds until the next one arrives."""
    handed_out: list[tuple[str, weakref.ref]] = []
    held_back: list[tuple[str, list[str]]] = []
    resolve = streaming._LazyHFPlanner.resolve_data

    def watched(self, item):
        data = resolve(self, item)
        if isinstance(data, torch.Tensor):
            group = streaming.file_group(item.index.fqn)
            earlier = [g for g, ref in handed_out if g != group and ref() is not None]
            if len(earlier) > 1:
                held_back.append((item.index.fqn, earlier))
            handed_out.append((group, weakref.ref(data)))
        return data

    monkeypatch.setattr(streaming._LazyHFPlanner, "resolve_data", watched)
    convert(hf_dir, tmp_path / "mcore")
    assert len(handed_out) > 50
    assert not held_back, f"tensors of earlier layers still alive: {held_back[:3]}"


def test_converted_checkpoint_reads_back(hf_dir, tmp_path):
    """Every key, wherever its file, reads back as the HF tensors it came from."""
    convert(hf_dir, tmp_path / "mcore")
    hf = HFCheckpoint(hf_dir)
    state = {"decoder.layers.1.self_attention.linear_proj.weight": torch.empty(hf.shape(
        "model.layers.1.self_attn.o_proj.weight"))}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(tmp_path / "mcore")), no_dist=True)
    assert torch.equal(state["decoder.layers.1.self_attention.linear_proj.weight"],
                       hf.get("model.layers.1.self_attn.o_proj.weight"))
