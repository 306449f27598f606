"""Everything a run builds once: the starting HF checkpoint, the Megatron model and optimizer,
the rollout servers and client, the prompts, the reward scorer.

Rank 0 owns the rollout side (servers, client, prompt order, rewards) and hands each step's
batch to the other ranks; every rank owns its part of the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_sapo.config import RunConfig
from megatron_sapo.convert import mcore_checkpoint
from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.convert.load import load_hf_into_model
from megatron_sapo.errors import InputError
from megatron_sapo.models import model_family, read_hf_config, use_transformer_engine, weight_table
from megatron_sapo.training.checkpoint import weights_dir
from megatron_sapo.training.optimizer import Trainable, build_optimizer

if TYPE_CHECKING:  # annotations only: the families are imported when a config asks for them
    from megatron_sapo.convert.mapping import MappingTable
    from megatron_sapo.models.qwen3_moe import Qwen3MoeSpec
    from megatron_sapo.models.qwen3_vl import Qwen3VLSpec

PARAMS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def prepare_start_model(cfg: RunConfig, out_dir: Path) -> Path:
    """Rank 0: the HF checkpoint training starts from (and SGLang first serves).

    A built-in model is created from its config and given the configured supervised cold start,
    once: a resumed run finds it in ``out_dir/start_model``."""
    if cfg.model.hf_dir is not None:
        return Path(cfg.model.hf_dir)
    target = out_dir / "start_model"
    if (target / "config.json").is_file():
        return target
    from megatron_sapo import torchvision_compat
    from megatron_sapo.convert.output import partial_dir, publish
    from megatron_sapo.data.chat import encode_sft_examples
    from megatron_sapo.data.tasks import get_task
    from megatron_sapo.data.tiny_tokenizer import PAD_ID, build_tiny_tokenizer
    from megatron_sapo.models.tiny import save_demo_model
    from megatron_sapo.training.cold_start import cold_start

    tmp = partial_dir(target)
    if cfg.model.builtin == "tiny-qwen3-vl-moe":
        from megatron_sapo.models.tiny_vl import save_tiny_qwen3_vl_moe

        save_tiny_qwen3_vl_moe(tmp, seed=cfg.train.seed, dtype=torch.float32)
    else:
        save_demo_model(tmp, seed=cfg.train.seed, **cfg.model.builtin_overrides)
    if cfg.train.sft_steps:
        records = get_task(cfg.data.task).records("sft", cfg.data.seed)
        processor = None
        if any(r.images for r in records):
            torchvision_compat.ensure_importable()
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(tmp)
        examples = encode_sft_examples(records, build_tiny_tokenizer(), cfg.data.system_prompt, processor)
        losses = cold_start(tmp, examples, steps=cfg.train.sft_steps, batch_size=cfg.train.sft_batch_size,
                            lr=cfg.train.sft_lr or cfg.optimizer.lr, seed=cfg.train.seed, pad_id=PAD_ID)
        (tmp / "cold_start_losses.json").write_text(json.dumps(losses))
    publish(tmp, target)
    return target


@dataclass
class Policy:
    """The Megatron side: the bare model (for weight export), its DDP wrapper and optimizer."""

    module: torch.nn.Module
    """This rank's bare model (a ``GPTModel``, or the vision-language model)."""
    trainable: Trainable
    spec: Qwen3MoeSpec | Qwen3VLSpec
    """The model family's spec."""
    table: MappingTable
    """Its weight table, with the Hub storage of its experts (export and weight sync follow it)."""
    hf_config: dict


def build_policy(cfg: RunConfig, hf_dir: Path, pg, total_steps: int, load_dir: str | None = None) -> Policy:
    """The model of ``hf_dir`` with its weights, or with the Megatron weights of ``load_dir``."""
    hf_config = read_hf_config(hf_dir)
    family = model_family(hf_config, str(Path(hf_dir) / "config.json"))
    use_te = use_transformer_engine(cfg.model.transformer_impl)
    spec = family.from_hf_config(hf_config, cfg.parallel, router=cfg.router,
                                 params_dtype=PARAMS_DTYPES[cfg.model.params_dtype], use_te=use_te)
    module = family.build_model(spec, pg, pp_rank=dist.get_rank(pg.pp), use_te=use_te)
    table = weight_table(family, spec)
    if load_dir is None:
        load_hf_into_model(module, HFCheckpoint(hf_dir), table, pg)
    else:
        mcore_checkpoint.load_model(module, megatron_weights(load_dir, hf_config, hf_dir))
    trainable = build_optimizer(module, cfg.optimizer, pg, total_steps=total_steps)
    return Policy(module=module, trainable=trainable, spec=spec, table=table, hf_config=hf_config)


def megatron_weights(load_dir: str, hf_config: dict, hf_dir: Path) -> Path:
    """``checkpoint.load_dir``'s weights folder, checked against the model's architecture where it
    records one (``hf_config.json``)."""
    path = weights_dir(load_dir)
    if (path / mcore_checkpoint.HF_CONFIG_FILE).exists():
        differ = mcore_checkpoint.config_differences(mcore_checkpoint.read_hf_config(path), hf_config)
        if differ:
            raise InputError(f"checkpoint.load_dir = {load_dir}: its model differs from {hf_dir}/config.json in "
                             + ", ".join(differ[:5]) + (" ..." if len(differ) > 5 else ""))
    return path
