"""Small collectives shared by export, parity, training and tests, and the device each group
communicates on."""

from __future__ import annotations

import torch
import torch.distributed as dist


def comm_device(group=None) -> torch.device:
    """The device of the tensors a collective on ``group`` (None: the default group) takes:
    NCCL moves only CUDA tensors (the current device's), gloo CPU ones. A group with a backend
    per device ("cpu:gloo,cuda:nccl") gets CUDA, where the trainer's tensors live."""
    if "nccl" in dist.get_backend(group):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
