"""Megatron model -> Hugging Face tensors and sharded safetensors files.

``iter_hf_tensors`` walks this rank's parameters, gathers each over its split group (TP or
expert-TP) and turns it into HF tensors with the table's transform, under the table's logical
names (experts one by one). Exactly one rank owns each HF tensor (the first TP/expert-TP rank
of the first data-parallel replica on its pipeline stage), so every rank can write its own part
of the export and only the index is merged. Memory: one gathered weight at a time plus one
output shard being filled.

``iter_stored_tensors`` gives the same tensors in the Hub's storage layout. Where the Hub fuses
a layer's experts (``table.fused_experts``), the experts of one layer live on every
expert-parallel rank: once a rank has its share of a layer, the expert-parallel group gathers
the layer to one of its ranks (round robin over layers), which writes the fused tensors.
Memory: one layer's experts more.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_sapo.convert.hf_checkpoint import INDEX_FILE, copy_tokenizer_files
from megatron_sapo.convert.hf_layout import ExpertFuser, ExpertName, FusedExperts
from megatron_sapo.convert.load import RankLayout
from megatron_sapo.convert.mapping import MappingTable
from megatron_sapo.convert.output import check_target, partial_dir, partial_path, publish
from megatron_sapo.parallel.collectives import all_gather_list


@torch.no_grad()
def iter_hf_tensors(model, table: MappingTable, pg_collection) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` for the HF tensors this rank owns; collective over TP/expert-TP."""
    layout = RankLayout.of(model, pg_collection)
    first_dp = dist.get_rank(pg_collection.dp) == 0
    first_expert_dp = dist.get_rank(pg_collection.expt_dp) == 0
    for name, param in model.named_parameters():
        match = table.match(name)
        expert = match.entry.group == "expert_tp"
        shards = all_gather_list(param.detach(), pg_collection.expt_tp if expert else pg_collection.tp)
        split_rank, _ = layout.split_rank(match)
        owner = split_rank == 0 and (first_expert_dp if expert else first_dp)
        if not owner:
            continue
        full = match.entry.split.unshard(shards)
        layer, expert_index = layout.global_indices(match)
        yield from zip(match.entry.hf_names(layer, expert_index), match.entry.transform.to_hf(full))


@torch.no_grad()
def iter_stored_tensors(model, table: MappingTable, pg_collection) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` in the Hub storage layout for the tensors this rank writes; collective
    over TP/expert-TP and, where experts are stored fused, over expert parallelism."""
    fused = table.fused_experts
    if fused is None:
        yield from iter_hf_tensors(model, table, pg_collection)
        return
    ep_size = dist.get_world_size(pg_collection.ep)
    share = 3 * fused.num_experts // ep_size  # a rank's gate, up and down tensors of one layer
    fuser = ExpertFuser(fused)
    pending: dict[str, dict[ExpertName, torch.Tensor]] = {}
    gathered_layers = 0
    for name, tensor in iter_hf_tensors(model, table, pg_collection):
        parsed = ExpertName.parse(name)
        if parsed is None:
            yield name, tensor
            continue
        layer = pending.setdefault(parsed.layer, {})
        layer[parsed] = tensor
        if len(layer) < share:
            continue
        del pending[parsed.layer]
        owner = gathered_layers % ep_size
        gathered_layers += 1
        for logical, full in _gather_layer_experts(layer, fused, owner, pg_collection.ep):
            yield from fuser.add(logical, full)
    if pending:
        raise RuntimeError(f"expert tensors of {sorted(pending)} did not add up to this rank's share of "
                           f"{fused.num_experts} experts over {ep_size} expert-parallel ranks")
    fuser.check_complete()


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _gather_layer_experts(local: dict[ExpertName, torch.Tensor], fused: FusedExperts, owner: int, ep_group
                          ) -> list[tuple[str, torch.Tensor]]:
    """Collective over ``ep_group``: every rank's experts of one layer, on rank ``owner`` of the
    group (as logical ``(name, tensor)``; an empty list elsewhere). Rank ``r`` of the group
    holds the ``r``-th contiguous block of experts, as Megatron assigns them."""
    ep_rank, ep_size = dist.get_rank(ep_group), dist.get_world_size(ep_group)
    per_rank = fused.num_experts // ep_size
    first = ep_rank * per_rank
    layer = next(iter(local)).layer
    names = {(n.expert, n.proj): n for n in local}
    expected = {(e, proj) for e in range(first, first + per_rank) for proj in PROJECTIONS}
    if set(names) != expected:
        raise RuntimeError(f"{layer}: expert-parallel rank {ep_rank} holds experts "
                           f"{sorted({e for e, _ in names})}, expected {first}..{first + per_rank - 1}")
    result = []
    for proj in PROJECTIONS:
        stacked = torch.stack([local[names[e, proj]] for e in range(first, first + per_rank)])
        if ep_size == 1:
            parts = [stacked]
        else:
            parts = [torch.empty_like(stacked) for _ in range(ep_size)] if ep_rank == owner else None
            dist.gather(stacked.contiguous(), parts, group_dst=owner, group=ep_group)
        if parts is None:
            continue
        for rank, part in enumerate(parts):
            result += [(f"{layer}.{rank * per_rank + j}.{proj}.weight", part[j]) for j in range(per_rank)]
    return result


class ShardWriter:
    """Fills safetensors files of at most ``max_shard_bytes`` under a rank-specific prefix."""

    def __init__(self, out_dir: Path, prefix: str, max_shard_bytes: int):
        self.out_dir, self.prefix, self.max_bytes = out_dir, prefix, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.files: list[str] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        file = f"{self.prefix}-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.out_dir / file), metadata={"format": "pt"})
        self.files.append(file)
        self.weight_map.update({name: file for name in self.pending})
        self.pending, self.pending_bytes = {}, 0


def export_hf(model, table: MappingTable, pg_collection, out_dir: str | Path, hf_config: dict, *,
              dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30, extra_files_from: Path | None = None,
              force: bool = False) -> Path:
    """Collective: write the model in the Hub layout (sharded safetensors + index + config.json),
    experts fused where ``table.fused_experts`` says the Hub stores them so."""
    out = Path(out_dir)
    check_target(out, force)  # on every rank, so none waits at the barrier for a rank that raised
    rank = dist.get_rank()
    tmp = partial_dir(out) if rank == 0 else partial_path(out)
    dist.barrier()
    writer = ShardWriter(tmp, f"part-rank{rank:05d}", max_shard_bytes)
    for name, tensor in iter_stored_tensors(model, table, pg_collection):
        writer.add(name, tensor.to(dtype) if dtype is not None else tensor)
    writer.flush()
    maps: list = [None] * dist.get_world_size()
    dist.all_gather_object(maps, (writer.files, writer.weight_map, writer.total_bytes))
    if rank == 0:
        finish_export(tmp, out, maps, hf_config, extra_files_from)
    dist.barrier()
    return out


def finish_export(tmp: Path, out: Path, maps, hf_config: dict, extra_files_from: Path | None) -> None:
    """Name the parts ``model-i-of-n``, write the index, config and tokenizer files, move into place.

    ``maps``: per writer, ``(files, weight_map, total_bytes)``."""
    files = [f for rank_files, _, _ in maps for f in rank_files]
    renamed = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    for old, new in renamed.items():
        (tmp / old).rename(tmp / new)
    weight_map = {name: renamed[f] for _, rank_map, _ in maps for name, f in rank_map.items()}
    total = sum(total_bytes for _, _, total_bytes in maps)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    if extra_files_from is not None:
        copy_tokenizer_files(extra_files_from, tmp)
    publish(tmp, out)
