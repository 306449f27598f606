"""Qwen3-MoE on Megatron-Core over 2 gloo ranks: exact conversion and logit parity with transformers.

The tiny model has awkward sizes (head_dim != hidden/heads, hidden != 2 x expert width, a
dense layer among MoE layers, vocabulary 301 padded for TP) so that layout bugs cannot pass.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rank_files import assert_same_hf_tensors, shared_dir

from megatron_sapo import torchvision_compat
from megatron_sapo.config import ParallelConfig
from megatron_sapo.convert.export import export_hf
from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.convert.load import load_hf_into_model
from megatron_sapo.convert.mcore_checkpoint import load_model, save_model
from megatron_sapo.models import qwen3_moe
from megatron_sapo.parallel.collectives import all_gather_cat
from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel
from megatron_sapo.training.forward import forward_logits

SEQ = 16


@pytest.fixture(scope="module")
def reference_logits(tiny_hf):
    torchvision_compat.ensure_importable()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens()).logits


def tokens():
    return torch.randint(0, 301, (2, SEQ), generator=torch.Generator().manual_seed(1))


class Layout:
    """One Megatron layout on the launch's ranks; torn down after the test."""

    def __init__(self, tiny_hf: Path, tp=1, ep=1, pp=1):
        self.parallel = ParallelConfig(tp=tp, ep=ep, pp=pp)
        self.pg = initialize_model_parallel(self.parallel)
        self.hf_config = qwen3_moe.read_hf_config(tiny_hf)
        self.spec = qwen3_moe.from_hf_config(self.hf_config, self.parallel)
        self.table = qwen3_moe.weight_table(self.spec)
        self.model = qwen3_moe.build_model(self.spec, self.pg, pp_rank=dist.get_rank(self.pg.pp))

    def load_hf(self, path: Path) -> "Layout":
        load_hf_into_model(self.model, HFCheckpoint(path), self.table, self.pg)
        return self

    def full_logits(self):
        """Logits over the true vocabulary, on every rank (None where no last stage holds them)."""
        local = forward_logits(self.model, tokens(), self.pg)
        holder = torch.tensor([dist.get_rank() if local is not None else -1])
        dist.all_reduce(holder, op=dist.ReduceOp.MAX)
        if local is not None:
            local = all_gather_cat(local, self.pg.tp, dim=-1)[..., : self.spec.vocab_size].contiguous()
        else:
            local = torch.empty(2, SEQ, self.spec.vocab_size)
        dist.broadcast(local, src=int(holder.item()))
        return local


@pytest.fixture
def layouts():
    yield Layout
    destroy_model_parallel()


LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2)]
LAYOUT_IDS = [f"tp{t}-ep{e}-pp{p}" for t, e, p in LAYOUTS]


@pytest.mark.parametrize("tp, ep, pp", LAYOUTS, ids=LAYOUT_IDS)
def test_round_trip_is_bit_exact(layouts, tiny_hf, tmp_path_factory, tp, ep, pp):
    work = shared_dir(tmp_path_factory, "round_trip")
    layout = layouts(tiny_hf, tp=tp, ep=ep, pp=pp).load_hf(tiny_hf)
    # Export straight from the sharded layout (gathers over TP/EP, one part per stage)...
    export_hf(layout.model, layout.table, layout.pg, work / "direct", layout.hf_config)
    # ...and through a Megatron checkpoint written at this layout, read back at TP1/EP1/PP1.
    save_model(layout.model, work / "mcore", layout.hf_config)
    destroy_model_parallel()
    single = layouts(tiny_hf)
    load_model(single.model, work / "mcore")
    export_hf(single.model, single.table, single.pg, work / "via_checkpoint", single.hf_config)
    if dist.get_rank() == 0:
        assert_same_hf_tensors(tiny_hf, work / "direct")
        assert_same_hf_tensors(tiny_hf, work / "via_checkpoint")


@pytest.mark.parametrize("tp, ep, pp", [(2, 2, 1), (1, 1, 2), (2, 1, 1), (1, 2, 1)], ids=lambda v: str(v))
def test_logits_match_transformers(layouts, tiny_hf, reference_logits, tp, ep, pp):
    logits = layouts(tiny_hf, tp=tp, ep=ep, pp=pp).load_hf(tiny_hf).full_logits()
    assert (logits - reference_logits).abs().max().item() <= 1e-4


def test_tp2_equals_tp1(layouts, tiny_hf):
    single = layouts(tiny_hf).load_hf(tiny_hf).full_logits()
    destroy_model_parallel()
    sharded = layouts(tiny_hf, tp=2).load_hf(tiny_hf).full_logits()
    assert (sharded - single).abs().max().item() <= 1e-5


def test_checkpoint_saved_at_tp2_ep2_loads_at_tp1(layouts, tiny_hf, tmp_path_factory, reference_logits):
    work = shared_dir(tmp_path_factory, "reshard")
    saved = layouts(tiny_hf, tp=2, ep=2).load_hf(tiny_hf)
    before = saved.full_logits()
    save_model(saved.model, work / "mcore", saved.hf_config)
    destroy_model_parallel()
    single = layouts(tiny_hf)
    load_model(single.model, work / "mcore")
    after = single.full_logits()
    assert (after - before).abs().max().item() <= 1e-5
    assert (after - reference_logits).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def streamed_checkpoint(tiny_hf, tmp_path_factory):
    """A checkpoint written by the streaming converter (the real command, on rank 0)."""
    out = shared_dir(tmp_path_factory, "streamed") / "mcore"
    if dist.get_rank() == 0:
        subprocess.run([(shutil.which("megatron-sapo") or str(Path(sys.executable).with_name("megatron-sapo"))), "convert", "hf-to-mcore", "--hf", str(tiny_hf), "--out", str(out)],
                       check=True, capture_output=True, timeout=300)
    dist.barrier()
    return out


@pytest.mark.parametrize("tp, ep, pp", LAYOUTS, ids=LAYOUT_IDS)
def test_streamed_checkpoint_loads_at_every_layout(layouts, tiny_hf, streamed_checkpoint, reference_logits,
                                                   tp, ep, pp):
    layout = layouts(tiny_hf, tp=tp, ep=ep, pp=pp)
    load_model(layout.model, streamed_checkpoint)
    assert (layout.full_logits() - reference_logits).abs().max().item() <= 1e-4
