"""Small collectives shared by export, parity and tests."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_list(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in rank order."""
    size = dist.get_world_size(group)
    if size == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def all_gather_cat(tensor: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along ``dim`` (e.g. vocabulary or sequence shards)."""
    parts = all_gather_list(tensor, group)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
