"""Qwen3-VL-MoE checkpoint conversion over 2 gloo ranks: every path is bit-exact, experts fused.

The tiny model's Hub checkpoint stores each layer's experts fused (``gate_up_proj [E, H, 2I]``,
``down_proj [E, I, H]``, with H=48, I=40, E=4), while the weight table names them one by one;
``convert/hf_layout.py`` translates. Each test compares every tensor of the source checkpoint
with what comes back (``torch.equal``, same dtype, same names: fused, nothing per expert).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from rank_files import assert_same_hf_tensors, shared_dir

from megatron_sapo import models
from megatron_sapo.config import ParallelConfig
from megatron_sapo.convert import streaming
from megatron_sapo.convert.export import export_hf
from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.convert.load import load_hf_into_model
from megatron_sapo.convert.mcore_checkpoint import load_model, save_model
from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel

CLI = shutil.which("megatron-sapo") or str(Path(sys.executable).with_name("megatron-sapo"))
EXPERTS, HIDDEN, WIDTH = 4, 48, 40
FUSED = "model.language_model.layers.{}.mlp.experts.{}"


def assert_hub_layout(path: Path, layers: int = 6) -> None:
    """Experts stored fused in the Hub orientation, and no per-expert tensor."""
    checkpoint = HFCheckpoint(path)
    assert not [n for n in checkpoint.names() if ".experts." in n and n.split(".experts.")[1][0].isdigit()]
    for layer in range(layers):
        assert checkpoint.shape(FUSED.format(layer, "gate_up_proj")) == (EXPERTS, HIDDEN, 2 * WIDTH)
        assert checkpoint.shape(FUSED.format(layer, "down_proj")) == (EXPERTS, WIDTH, HIDDEN)


class Layout:
    """The tiny VL model at one layout on the launch's ranks, loaded from an HF folder."""

    def __init__(self, hf_dir: Path, tp=1, ep=1, pp=1):
        self.parallel = ParallelConfig(tp=tp, ep=ep, pp=pp)
        self.pg = initialize_model_parallel(self.parallel)
        self.hf_config = models.read_hf_config(hf_dir)
        family = models.model_family(self.hf_config)
        spec = family.from_hf_config(self.hf_config, self.parallel)
        self.table = models.weight_table(family, spec)
        self.model = family.build_model(spec, self.pg, pp_rank=dist.get_rank(self.pg.pp))

    def load_hf(self, hf_dir: Path) -> "Layout":
        load_hf_into_model(self.model, HFCheckpoint(hf_dir), self.table, self.pg)
        return self


@pytest.fixture
def layouts():
    yield Layout
    destroy_model_parallel()


def streamed_to_hf(ckpt: Path, out: Path, hf_config: dict) -> Path:
    """The streaming mcore-to-hf conversion on every rank, each into its own folder."""
    return streaming.mcore_to_hf(ckpt, out.with_name(f"{out.name}-rank{dist.get_rank()}"), hf_config,
                                 torch.float32, max_shard_bytes=256 * 1024)


LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2)]


@pytest.mark.parametrize("tp, ep, pp", LAYOUTS, ids=[f"tp{t}-ep{e}-pp{p}" for t, e, p in LAYOUTS])
def test_hf_to_megatron_to_hf_is_bit_exact(layouts, tiny_vl, tmp_path_factory, tp, ep, pp):
    work = shared_dir(tmp_path_factory, "vl_round_trip")
    layout = layouts(tiny_vl, tp=tp, ep=ep, pp=pp).load_hf(tiny_vl)
    # Export straight from the sharded model: a layer's experts are gathered over EP and fused...
    export_hf(layout.model, layout.table, layout.pg, work / "direct", layout.hf_config, extra_files_from=tiny_vl)
    # ...and through a Megatron checkpoint saved at this layout, streamed back to HF on each rank.
    save_model(layout.model, work / "mcore", layout.hf_config)
    streamed = streamed_to_hf(work / "mcore", work / "streamed", layout.hf_config)
    if dist.get_rank() == 0:
        assert_same_hf_tensors(tiny_vl, work / "direct")
        assert_hub_layout(work / "direct")
        assert (work / "direct" / "processor_config.json").exists()
    assert_same_hf_tensors(tiny_vl, streamed)


@pytest.fixture(scope="module")
def cli_checkpoint(tiny_vl, tmp_path_factory):
    """``megatron-sapo convert hf-to-mcore`` of the tiny VL model (the real command, on rank 0)."""
    out = shared_dir(tmp_path_factory, "vl_cli") / "mcore"
    if dist.get_rank() == 0:
        run("convert", "hf-to-mcore", "--hf", str(tiny_vl), "--out", str(out), "--tp", "2", "--ep", "2")
    dist.barrier()
    return out


def run(*args) -> None:
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_convert_cli_both_ways_is_bit_exact_with_fused_hub_tensors(tiny_vl, cli_checkpoint):
    back = cli_checkpoint.parent / "back"
    if dist.get_rank() == 0:
        run("convert", "mcore-to-hf", "--mcore", str(cli_checkpoint), "--out", str(back))
        assert_same_hf_tensors(tiny_vl, back)
        assert_hub_layout(back)
        assert (back / "processor_config.json").exists() and (back / "chat_template.jinja").exists()
    dist.barrier()


@pytest.mark.parametrize("tp, ep, pp", [(2, 2, 1), (1, 1, 2)], ids=["tp2-ep2", "pp2"])
def test_streamed_checkpoint_loads_at_a_layout(layouts, tiny_vl, cli_checkpoint, tmp_path_factory, tp, ep, pp):
    work = shared_dir(tmp_path_factory, "vl_streamed_load")
    layout = layouts(tiny_vl, tp=tp, ep=ep, pp=pp)
    load_model(layout.model, cli_checkpoint)
    export_hf(layout.model, layout.table, layout.pg, work / "exported", layout.hf_config)
    if dist.get_rank() == 0:
        assert_same_hf_tensors(tiny_vl, work / "exported")


@pytest.fixture(scope="module")
def transformers_orientation(tiny_vl, tmp_path_factory):
    """The tiny checkpoint with its fused experts as some transformers versions save them:
    ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``."""
    out = shared_dir(tmp_path_factory, "vl_transformers_orientation") / "hf"
    if dist.get_rank() == 0:
        shutil.copytree(tiny_vl, out)
        source = HFCheckpoint(tiny_vl)
        tensors = {n: source.get(n) for n in source.names()}
        for name in tensors:
            if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                tensors[name] = tensors[name].transpose(1, 2).contiguous()
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        assert HFCheckpoint(out).shape(FUSED.format(0, "gate_up_proj")) == (EXPERTS, 2 * WIDTH, HIDDEN)
    dist.barrier()
    return out


def test_transformers_orientation_converts_to_hub_orientation(tiny_vl, transformers_orientation, tmp_path_factory):
    work = shared_dir(tmp_path_factory, "vl_from_transformers_orientation")
    if dist.get_rank() == 0:
        run("convert", "hf-to-mcore", "--hf", str(transformers_orientation), "--out", str(work / "mcore"))
        run("convert", "mcore-to-hf", "--mcore", str(work / "mcore"), "--out", str(work / "back"))
        assert_same_hf_tensors(tiny_vl, work / "back")
        assert_hub_layout(work / "back")
    dist.barrier()


def test_transformers_orientation_loads_into_the_sharded_model(layouts, tiny_vl, transformers_orientation,
                                                               tmp_path_factory):
    work = shared_dir(tmp_path_factory, "vl_load_transformers_orientation")
    layout = layouts(tiny_vl, tp=2, ep=2).load_hf(transformers_orientation)
    export_hf(layout.model, layout.table, layout.pg, work / "exported", layout.hf_config)
    if dist.get_rank() == 0:
        assert_same_hf_tensors(tiny_vl, work / "exported")
