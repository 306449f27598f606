"""Tensor/expert-parallel splitting of Megatron's unsharded tensors (no format knowledge).

``Split(dim)``: equal contiguous parts along ``dim`` (Megatron's column/row-parallel layers,
and the vocabulary). ``SplitGLU(dim)``: ``[gate; up]`` split so each rank holds
``[gate_r; up_r]``, as Megatron's gated ``linear_fc1`` does. ``Replicate``: every rank holds all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Replicate:
    def shard(self, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        return tensor

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        return shards[0]


@dataclass(frozen=True)
class Split:
    dim: int

    def shard(self, tensor, rank, size):
        if tensor.shape[self.dim] % size:
            raise ValueError(f"dimension {self.dim} of size {tensor.shape[self.dim]} does not split into {size} parts")
        return tensor.chunk(size, dim=self.dim)[rank]

    def unshard(self, shards):
        return torch.cat(shards, dim=self.dim)


@dataclass(frozen=True)
class SplitGLU:
    dim: int = 0

    def shard(self, tensor, rank, size):
        gate, up = tensor.chunk(2, dim=self.dim)
        return torch.cat([Split(self.dim).shard(gate, rank, size), Split(self.dim).shard(up, rank, size)], dim=self.dim)

    def unshard(self, shards):
        halves = [s.chunk(2, dim=self.dim) for s in shards]
        gate = torch.cat([h[0] for h in halves], dim=self.dim)
        up = torch.cat([h[1] for h in halves], dim=self.dim)
        return torch.cat([gate, up], dim=self.dim)
