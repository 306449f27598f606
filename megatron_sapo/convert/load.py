"""Fill a (possibly sharded) Megatron model from a Hugging Face checkpoint, and read it back.

Each rank reads only the HF tensors behind its own parameters, applies the table's format
transform, and keeps its slice of the result (``split.shard`` over the entry's group).
Indices are mapped between Megatron's local numbering and the global one: layers by the
pipeline stage's offset, experts by the expert-parallel rank. Experts the Hub stores fused
(``table.fused_experts``) are read through ``hf_layout.py``, one fused tensor per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_sapo.convert.hf_checkpoint import HFCheckpoint
from megatron_sapo.convert.hf_layout import logical_view
from megatron_sapo.convert.mapping import Match, MappingTable
from megatron_sapo.errors import InputError


@dataclass(frozen=True)
class RankLayout:
    """Where this rank sits: pipeline layer offset, expert-parallel slot, split ranks."""

    layer_offset: int
    experts_per_rank: int
    ep_rank: int
    tp_rank: int
    tp_size: int
    etp_rank: int
    etp_size: int

    @classmethod
    def of(cls, model, pg_collection) -> "RankLayout":
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        config = model.config
        pp_rank = dist.get_rank(pg_collection.pp)
        ep_size = dist.get_world_size(pg_collection.ep)
        experts = config.num_moe_experts or 0
        return cls(
            layer_offset=get_transformer_layer_offset(config, vp_stage=None, pp_rank=pp_rank),
            experts_per_rank=experts // ep_size if experts else 0,
            ep_rank=dist.get_rank(pg_collection.ep),
            tp_rank=dist.get_rank(pg_collection.tp),
            tp_size=dist.get_world_size(pg_collection.tp),
            etp_rank=dist.get_rank(pg_collection.expt_tp),
            etp_size=dist.get_world_size(pg_collection.expt_tp),
        )

    def global_indices(self, match: Match) -> tuple[int | None, int | None]:
        layer = None if match.layer is None else match.layer + self.layer_offset
        expert = None if match.expert is None else match.expert + self.ep_rank * self.experts_per_rank
        return layer, expert

    def split_rank(self, match: Match) -> tuple[int, int]:
        if match.entry.group == "expert_tp":
            return self.etp_rank, self.etp_size
        return self.tp_rank, self.tp_size


@torch.no_grad()
def load_hf_into_model(model, checkpoint: HFCheckpoint, table: MappingTable, pg_collection) -> None:
    """Copy every parameter of ``model`` (this rank's share) from ``checkpoint``."""
    layout = RankLayout.of(model, pg_collection)
    source = logical_view(checkpoint, table.fused_experts)
    for name, param in model.named_parameters():
        match = table.match(name)
        layer, expert = layout.global_indices(match)
        hf_tensors = tuple(source.get(n) for n in match.entry.hf_names(layer, expert))
        full = match.entry.transform.to_megatron(hf_tensors)
        shard = match.entry.split.shard(full, *layout.split_rank(match))
        if shard.shape != param.shape:
            raise InputError(
                f"{checkpoint.dir}: {name}: HF tensors {match.entry.hf_names(layer, expert)} give a shard of shape "
                f"{tuple(shard.shape)}, the model expects {tuple(param.shape)}")
        param.copy_(shard)
