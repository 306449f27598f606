"""Megatron model -> Hugging Face tensors and sharded safetensors files.

``iter_hf_tensors`` walks this rank's parameters, gathers each over its split group (TP or
expert-TP) and turns it into HF tensors with the table's transform. Exactly one rank owns
each HF tensor (the first TP/expert-TP rank of the first data-parallel replica on its
pipeline stage), so every rank can write its own part of the export and only the index is
merged. Memory: one gathered weight at a time plus one output shard being filled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_sapo.convert.hf_checkpoint import INDEX_FILE, copy_tokenizer_files
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
    """Collective: write the model in the Hub layout (sharded safetensors + index + config.json)."""
    out = Path(out_dir)
    check_target(out, force)  # on every rank, so none waits at the barrier for a rank that raised
    rank = dist.get_rank()
    tmp = partial_dir(out) if rank == 0 else partial_path(out)
    dist.barrier()
    writer = ShardWriter(tmp, f"part-rank{rank:05d}", max_shard_bytes)
    for name, tensor in iter_hf_tensors(model, table, pg_collection):
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
