"""Megatron -> HF streaming conversion of checkpoints saved at TP/EP/PP layouts, on 2 gloo ranks.

The vocabulary is padded per TP size (the tiny model's 301 tokens: 384 rows at TP1, 512 at TP2),
so the embedding and output keys of a checkpoint have as many rows as the layout that saved it,
while the streaming converter describes the model at TP1. Checkpoints here are written by real
Megatron-Core across the launch's ranks, by ``save_model`` and by the training checkpoint (its
``model/`` folder); the converter then runs in-process on every rank, each into its own folder.
Its HF tensors must equal the source HF checkpoint's bit for bit (``torch.equal``, same dtype).
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from rank_files import assert_same_hf_tensors, shared_dir

from megatron_sapo.config import OptimizerConfig, ParallelConfig
from megatron_sapo.convert import streaming
from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.convert.load import load_hf_into_model
from megatron_sapo.convert.mcore_checkpoint import load_model, save_model
from megatron_sapo.models import qwen3_moe
from megatron_sapo.parallel.groups import destroy_model_parallel, initialize_model_parallel
from megatron_sapo.training.checkpoint import MODEL_DIR, TrainerState, save_checkpoint
from megatron_sapo.training.optimizer import build_optimizer

VOCAB = 301
ROWS_AT_TP = {1: 384, 2: 512}
MAX_SHARD_BYTES = 256 * 1024  # several output files, so the index is exercised too


class Layout:
    """The tiny model at one layout on the launch's ranks, holding the HF checkpoint's weights."""

    def __init__(self, tiny_hf: Path, tp=1, ep=1, pp=1):
        self.parallel = ParallelConfig(tp=tp, ep=ep, pp=pp)
        self.pg = initialize_model_parallel(self.parallel)
        self.hf_config = qwen3_moe.read_hf_config(tiny_hf)
        spec = qwen3_moe.from_hf_config(self.hf_config, self.parallel)
        self.model = qwen3_moe.build_model(spec, self.pg, pp_rank=dist.get_rank(self.pg.pp))
        load_hf_into_model(self.model, HFCheckpoint(tiny_hf), qwen3_moe.weight_table(spec), self.pg)


@pytest.fixture(scope="module")
def saved(tiny_hf, tmp_path_factory):
    """``saved(tp, ep, pp)``: a checkpoint written by ``save_model`` at that layout (once per layout)."""
    work = shared_dir(tmp_path_factory, "padding_saved")
    done: dict[tuple[int, int, int], Path] = {}

    def save(tp=1, ep=1, pp=1) -> Path:
        if (tp, ep, pp) not in done:
            layout = Layout(tiny_hf, tp=tp, ep=ep, pp=pp)
            try:
                done[tp, ep, pp] = save_model(layout.model, work / f"tp{tp}-ep{ep}-pp{pp}", layout.hf_config)
            finally:
                destroy_model_parallel()
        return done[tp, ep, pp]

    return save


def convert(ckpt: Path, out: Path, hf_config: dict) -> Path:
    """The streaming conversion on every rank, each into its own folder."""
    return streaming.mcore_to_hf(ckpt, out.with_name(f"{out.name}-rank{dist.get_rank()}"), hf_config,
                                 torch.float32, max_shard_bytes=MAX_SHARD_BYTES)


def stored_rows(ckpt: Path, key: str) -> int:
    return dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata[key].size[0]


@pytest.mark.parametrize("tp, ep, pp", [(2, 1, 1), (2, 2, 1), (1, 1, 2)], ids=["tp2", "tp2-ep2", "pp2"])
def test_checkpoint_saved_at_layout_converts_bit_exact(saved, tiny_hf, tp, ep, pp):
    ckpt = saved(tp, ep, pp)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert stored_rows(ckpt, key) == ROWS_AT_TP[tp]  # the padding of the saving layout, not TP1's
    out = convert(ckpt, ckpt.parent / f"hf-from-tp{tp}-ep{ep}-pp{pp}", qwen3_moe.read_hf_config(tiny_hf))
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert_same_hf_tensors(tiny_hf, out)


def test_training_checkpoint_at_tp2_converts_bit_exact(tiny_hf, tmp_path_factory):
    root = shared_dir(tmp_path_factory, "padding_training") / "checkpoints"
    layout = Layout(tiny_hf, tp=2)
    try:
        trainable = build_optimizer(layout.model, OptimizerConfig(), layout.pg, total_steps=1)
        step = save_checkpoint(root, TrainerState(step=0), trainable.model, trainable.optimizer,
                               trainable.scheduler, hf_config=layout.hf_config)
    finally:
        destroy_model_parallel()
    assert stored_rows(step / MODEL_DIR, "embedding.word_embeddings.weight") == ROWS_AT_TP[2]
    out = convert(step / MODEL_DIR, root.parent / "hf-from-training", layout.hf_config)
    assert_same_hf_tensors(tiny_hf, out)


def test_tp2_checkpoint_loads_at_tp1_with_zero_padding(saved, tiny_hf):
    """``load_model`` of 512 saved rows into the TP1 model's 384: the true rows, then zeros."""
    ckpt = saved(2, 1, 1)
    parallel = ParallelConfig()
    pg = initialize_model_parallel(parallel)
    try:
        spec = qwen3_moe.from_hf_config(qwen3_moe.read_hf_config(tiny_hf), parallel)
        model = qwen3_moe.build_model(spec, pg)
        load_model(model, ckpt)
    finally:
        destroy_model_parallel()
    source = HFCheckpoint(tiny_hf)
    for param, hf_name in ((model.embedding.word_embeddings.weight, "model.embed_tokens.weight"),
                           (model.output_layer.weight, "lm_head.weight")):
        assert param.shape[0] == ROWS_AT_TP[1]
        assert torch.equal(param[:VOCAB], source.get(hf_name))
        assert torch.count_nonzero(param[VOCAB:]) == 0


def test_too_few_vocabulary_rows_are_refused_before_writing(saved, tiny_hf):
    ckpt = saved(2, 1, 1)
    hf_config = {**qwen3_moe.read_hf_config(tiny_hf), "vocab_size": 600}  # 512 rows cannot hold 600 tokens
    out = ckpt.parent / "hf-refused"
    refusal = r"'embedding.word_embeddings.weight' has shape \(512, 48\).*vocab_size=600"
    with pytest.raises(ValueError, match=refusal):
        convert(ckpt, out, hf_config)
    assert not list(ckpt.parent.glob(f"*{out.name}*"))
