"""Declarative two-way weight mapping: one table per model, used by every direction.

A ``WeightMap`` ties one Megatron parameter (a name template with ``{layer}`` and
``{expert}``) to the HF tensor(s) it is made of, with a format transform and a parallel
split. The loader, the exporter, the checkpoint converter, the parity check and weight sync
all read the same table, so a layout is written down exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from megatron_sapo.convert.sharding import Replicate
from megatron_sapo.convert.transforms import Identity

if TYPE_CHECKING:
    from megatron_sapo.convert.hf_layout import FusedExperts

ParallelGroup = Literal["tp", "expert_tp"]


@dataclass(frozen=True)
class WeightMap:
    megatron: str
    """Megatron parameter name; ``{layer}`` and ``{expert}`` stand for indices."""
    hf: tuple[str, ...]
    """HF tensor names (same placeholders) that the Megatron tensor is made of, in order."""
    transform: object = field(default_factory=Identity)
    """HF tensors <-> unsharded Megatron tensor (see transforms.py)."""
    split: object = field(default_factory=Replicate)
    """Unsharded Megatron tensor <-> this rank's shard (see sharding.py)."""
    group: ParallelGroup = "tp"
    """The group the split runs over: tensor parallel, or expert tensor parallel."""

    def hf_names(self, layer: int | None, expert: int | None) -> tuple[str, ...]:
        return tuple(name.format(layer=layer, expert=expert) for name in self.hf)


@dataclass(frozen=True)
class Match:
    entry: WeightMap
    layer: int | None
    """Layer index as it appears in the Megatron name (local to a pipeline stage)."""
    expert: int | None
    """Expert index as it appears in the Megatron name (local to an expert-parallel rank)."""


class MappingTable:
    def __init__(self, entries: list[WeightMap], *, fused_experts: FusedExperts | None = None):
        self.entries = tuple(entries)
        self.fused_experts = fused_experts
        """How the Hub stores the experts the entries name one by one: fused per layer (see
        ``hf_layout.py``), or None: as named."""
        self._patterns = [(re.compile(_template_regex(e.megatron)), e) for e in self.entries]

    def stored_as(self, fused_experts: FusedExperts | None) -> "MappingTable":
        """The same entries, with the Hub storage of their experts."""
        return MappingTable(list(self.entries), fused_experts=fused_experts)

    def match(self, megatron_name: str) -> Match:
        for pattern, entry in self._patterns:
            m = pattern.fullmatch(megatron_name)
            if m:
                groups = m.groupdict()
                layer = int(groups["layer"]) if "layer" in groups else None
                expert = int(groups["expert"]) if "expert" in groups else None
                return Match(entry, layer, expert)
        raise KeyError(f"no mapping for Megatron parameter {megatron_name!r}")


def _template_regex(template: str) -> str:
    escaped = re.escape(template)
    return escaped.replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
