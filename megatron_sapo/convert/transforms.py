"""Format transforms between Hugging Face tensors and Megatron's *unsharded* tensors.

Each transform maps the tuple of HF tensors of one weight to the single Megatron tensor
(``to_megatron``) and back (``to_hf``), exactly inverting each other. Tensor/expert
parallel splitting is a separate step (``convert/sharding.py``): transforms never see ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sapo.errors import InputError


class Identity:
    def to_megatron(self, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        (tensor,) = tensors
        return tensor

    def to_hf(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (tensor,)


@dataclass(frozen=True)
class PadVocab:
    """Rows of an embedding/output matrix padded with zeros from ``true_size`` to ``padded_size``."""

    true_size: int
    padded_size: int

    def to_megatron(self, tensors):
        (tensor,) = tensors
        if tensor.shape[0] != self.true_size:
            raise InputError(f"vocabulary dimension is {tensor.shape[0]}; config.json says {self.true_size}")
        pad = tensor.new_zeros(self.padded_size - self.true_size, *tensor.shape[1:])
        return torch.cat([tensor, pad], dim=0)

    def to_hf(self, tensor):
        return (tensor[: self.true_size],)


@dataclass(frozen=True)
class FuseQKV:
    """Separate q/k/v projections <-> Megatron's fused ``linear_qkv``, grouped by KV head.

    Megatron stores, for each query group g: its ``heads_per_group`` query heads, then its key
    head, then its value head, each ``head_dim`` rows. Splitting that along rows into TP equal
    parts gives every rank whole groups.
    """

    num_heads: int
    num_groups: int
    head_dim: int

    def to_megatron(self, tensors):
        q, k, v = tensors
        per_group = self.num_heads // self.num_groups
        q = q.reshape(self.num_groups, per_group * self.head_dim, *q.shape[1:])
        k = k.reshape(self.num_groups, self.head_dim, *k.shape[1:])
        v = v.reshape(self.num_groups, self.head_dim, *v.shape[1:])
        return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])

    def to_hf(self, tensor):
        per_group = self.num_heads // self.num_groups
        grouped = tensor.reshape(self.num_groups, (per_group + 2) * self.head_dim, *tensor.shape[1:])
        q, k, v = grouped.split([per_group * self.head_dim, self.head_dim, self.head_dim], dim=1)
        return tuple(t.reshape(-1, *tensor.shape[1:]).contiguous() for t in (q, k, v))


class FuseGLU:
    """``gate_proj`` and ``up_proj`` <-> Megatron's ``linear_fc1`` = [gate; up] (rows)."""

    def to_megatron(self, tensors):
        gate, up = tensors
        return torch.cat([gate, up], dim=0)

    def to_hf(self, tensor):
        gate, up = tensor.chunk(2, dim=0)
        return gate.contiguous(), up.contiguous()


@dataclass(frozen=True)
class FlattenPatchConv:
    """A patch-embedding ``Conv3d`` weight ``[D, C, T, P, P]`` (kernel = stride, so one patch per
    output) <-> the equivalent linear weight ``[D, C*T*P*P]`` applied to flattened patches."""

    kernel: tuple[int, ...]
    """``(C, T, P, P)``: input channels, temporal patch size, patch size twice."""

    def to_megatron(self, tensors):
        (tensor,) = tensors
        if tuple(tensor.shape[1:]) != tuple(self.kernel):
            raise InputError(f"patch-embedding kernel has shape {tuple(tensor.shape[1:])}; config.json says "
                             f"{tuple(self.kernel)}")
        return tensor.reshape(tensor.shape[0], -1)

    def to_hf(self, tensor):
        return (tensor.reshape(tensor.shape[0], *self.kernel).contiguous(),)


@dataclass(frozen=True)
class SplitFusedQKV:
    """One fused HF ``qkv`` projection ``[q; k; v]`` (all heads of each, as in vision towers) <->
    Megatron's ``linear_qkv`` grouped by head (see ``FuseQKV``)."""

    num_heads: int
    num_groups: int
    head_dim: int

    def to_megatron(self, tensors):
        (tensor,) = tensors
        q_rows = self.num_heads * self.head_dim
        kv_rows = self.num_groups * self.head_dim
        q, k, v = tensor.split([q_rows, kv_rows, kv_rows], dim=0)
        return FuseQKV(self.num_heads, self.num_groups, self.head_dim).to_megatron((q, k, v))

    def to_hf(self, tensor):
        q, k, v = FuseQKV(self.num_heads, self.num_groups, self.head_dim).to_hf(tensor)
        return (torch.cat([q, k, v], dim=0),)
