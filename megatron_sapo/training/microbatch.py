"""Microbatches: which of a rank's rows run together, and how they are laid out for the model.

A rank trains its own rows (``loop.py`` sends each data-parallel replica its share). Before a
pass, :func:`plan_microbatches` groups those rows into microbatches and :func:`build_microbatch`
lays one microbatch out, just before the schedule runs it:

* **Fixed rows** (``max_tokens = 0``): ``micro_batch_size`` consecutive rows per microbatch.
* **Token budget** (``max_tokens > 0``): rows sorted by length, longest first, go into the first
  microbatch whose cost stays within the budget (first-fit decreasing). The cost is what the
  model computes: ``rows x longest row`` when padded, the sum of the lengths when packed (both
  rounded up to the sequence-parallel multiple). Long rows run alone or with a few others,
  short ones many together, so the processed tokens follow the real ones.
* **Padded** layout: ``[b, S]``, each microbatch padded only to its own longest row.
* **Packed** layout (``pack = True``): the rows one after another in ``[1, S]``, positions
  restarting at each row. With TransformerEngine attention the model gets ``PackedSeqParams``
  (THD, ``cu_seqlens``); with the local spec (CPU, GPUs without TE) an equivalent
  block-diagonal causal mask. Rotary embeddings of the local spec run over ``0..S-1``; since
  RoPE scores depend only on the distance between two positions and the mask keeps every token
  inside its own row, that is the same attention as restarting positions. Multimodal (mrope)
  positions are passed per token and restart at each row.

Every rank of an expert-parallel group must run the same number of microbatches, since the
MoE all-to-all is collective: :func:`plan_microbatches` agrees on the largest count over the
data-parallel group (model-parallel peers hold the same rows) and reaches it by splitting the
microbatches with most rows, and, where every microbatch already holds one row, with empty
microbatches that carry no loss token. The loss normaliser is global (``training/update.py``),
so the objective does not depend on the split.

A microbatch keeps its rows in *row form* ``[b, T]`` (what the loss reads: log-probs, masks,
advantages) and its model input in *model layout*; :meth:`Microbatch.unpack` maps per-token
outputs of the model (log-probs, entropies, recorded routes) back to row form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_sapo.types import TrainBatch

if TYPE_CHECKING:  # Megatron is imported only where a packed microbatch is built for TE
    from megatron.core.packed_seq_params import PackedSeqParams


@dataclass(frozen=True)
class Batching:
    """How a pass splits a rank's rows into microbatches (``train.micro_batch_size``,
    ``train.max_tokens_per_microbatch``, ``train.pack_sequences``)."""

    micro_batch_size: int = 1
    """Rows per microbatch when ``max_tokens`` is 0."""
    max_tokens: int = 0
    """Token budget of one microbatch (0: fixed ``micro_batch_size`` rows)."""
    pack: bool = False
    """Concatenate a microbatch's rows into one sequence instead of padding them."""

    @classmethod
    def of(cls, train_cfg) -> "Batching":
        return cls(micro_batch_size=train_cfg.micro_batch_size, max_tokens=train_cfg.max_tokens_per_microbatch,
                   pack=train_cfg.pack_sequences)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def microbatch_cost(lengths: list[int], pack: bool, multiple: int) -> int:
    """Token positions the model runs for rows of these lengths in one microbatch."""
    if not lengths:
        return multiple
    if pack:
        return round_up(sum(lengths), multiple)
    return len(lengths) * round_up(max(lengths), multiple)


def plan_rows(lengths: list[int], batching: Batching, multiple: int) -> list[list[int]]:
    """Row indices of each microbatch (no collective); see the module docstring."""
    if not lengths:
        return []
    if not batching.max_tokens:
        size = batching.micro_batch_size
        return [list(range(start, min(start + size, len(lengths)))) for start in range(0, len(lengths), size)]
    longest = round_up(max(lengths), multiple)
    if longest > batching.max_tokens:
        raise ValueError(f"a row of {max(lengths)} tokens ({longest} after rounding to the sequence-parallel "
                         f"multiple {multiple}) exceeds train.max_tokens_per_microbatch = {batching.max_tokens}")
    bins: list[list[int]] = []
    for row in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for members in bins:
            if microbatch_cost([lengths[i] for i in members + [row]], batching.pack, multiple) <= batching.max_tokens:
                members.append(row)
                break
        else:
            bins.append([row])
    return [sorted(members) for members in bins]


def extend_plan(plan: list[list[int]], count: int) -> list[list[int]]:
    """``plan`` grown to ``count`` microbatches: the microbatch with most rows is split in two
    until every one holds a single row, then empty microbatches are added."""
    plan = [list(members) for members in plan]
    while len(plan) < count:
        widest = max(range(len(plan)), key=lambda i: len(plan[i]), default=None)
        if widest is None or len(plan[widest]) < 2:
            plan.append([])
            continue
        members = plan.pop(widest)
        half = len(members) // 2
        plan[widest:widest] = [members[:half], members[half:]]
    return plan


def plan_microbatches(lengths: list[int], batching: Batching, multiple: int, group) -> list[list[int]]:
    """:func:`plan_rows`, then as many microbatches as the rank of ``group`` that needs most
    (collective over ``group``, the data-parallel group)."""
    from megatron_sapo.parallel.collectives import comm_device

    plan = plan_rows(lengths, batching, multiple)
    count = torch.tensor([len(plan)], dtype=torch.int64, device=comm_device(group))
    if dist.get_world_size(group) > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    return extend_plan(plan, int(count.item()))


# ---- one microbatch, laid out for the model ------------------------------------------------

@dataclass
class Microbatch:
    """One forward pass: rows in row form and the model's input for them."""

    rows: TrainBatch
    """The rows, ``[b, T]`` with ``T`` the longest of them (row form)."""
    row_index: list[int]
    """Each row's index in the rank's batch (empty for an empty microbatch)."""
    tokens: torch.Tensor
    """Model input ``[b, S]`` (padded) or ``[1, S]`` (packed)."""
    targets: torch.Tensor
    """Next tokens in the model's layout."""
    position_ids: torch.Tensor
    """``[b|1, S]``, or ``[3, b|1, S]`` multimodal positions."""
    attention_mask: torch.Tensor | None = None
    """Packed rows under the local spec: bool ``[1, 1, S, S]``, True where attention is masked."""
    packed_seq_params: PackedSeqParams | None = None
    """Packed rows under TransformerEngine: Megatron's ``PackedSeqParams`` (THD)."""
    routes: torch.Tensor | None = None
    """Experts to replay in the model's layout, int64 ``[b|1, S, moe_layers, top_k]``; -1 where
    there is nothing to replay (padding, a row's last token). None in an empty microbatch."""
    gather_index: torch.Tensor | None = None
    """Packed: int64 ``[b, T]`` position in the stream of each row-form position (0 past a row)."""

    @property
    def packed(self) -> bool:
        return self.gather_index is not None

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token model outputs ``[b|1, S, ...]`` in row form ``[b, T, ...]`` (zeros past each
        row's end when packed)."""
        length = self.rows.tokens.shape[1]
        if not self.packed:
            return values[:, :length]
        flat = values[0]
        picked = flat[self.gather_index.reshape(-1)].reshape(*self.gather_index.shape, *flat.shape[1:])
        inside = self._inside_rows().reshape(*self.gather_index.shape, *([1] * (flat.ndim - 1)))
        return torch.where(inside, picked, torch.zeros_like(picked))

    def model_kwargs(self) -> dict:
        """Extra arguments of the model's forward: images, and the packing of the rows."""
        kwargs = {}
        images = self.rows.vision_inputs
        if images is not None:
            kwargs.update(pixel_values=images.pixel_values.to(self.tokens.device),
                          image_grid_thw=images.image_grid_thw.to(self.tokens.device))
        if self.packed_seq_params is not None:
            kwargs["packed_seq_params"] = self.packed_seq_params
        return kwargs

    def _inside_rows(self) -> torch.Tensor:
        steps = torch.arange(self.rows.tokens.shape[1], device=self.tokens.device)
        return steps.unsqueeze(0) < self.rows.lengths.to(self.tokens.device).unsqueeze(1)


def build_microbatch(batch: TrainBatch, row_index: list[int], *, pack: bool, multiple: int,
                     thd: bool = False, with_routes: bool = False) -> Microbatch:
    """Microbatch of ``batch``'s rows ``row_index`` (an empty one when that is empty).

    ``multiple``: the sequence length is rounded up to it (the TP size under sequence
    parallelism). ``thd``: the model's attention takes packed sequences as THD
    (TransformerEngine) rather than through a mask. ``with_routes``: lay ``batch.routes`` out
    for replay, on the batch's device."""
    if not row_index:
        return _empty_microbatch(batch, multiple)
    index = torch.tensor(row_index, dtype=torch.long, device=batch.tokens.device)
    every_length = batch.row_lengths
    lengths = [every_length[i] for i in row_index]
    rows = batch.select(index).trimmed(max(lengths))
    device = rows.tokens.device
    rows.lengths = torch.tensor(lengths, dtype=torch.long)
    if not pack:
        seq_len = round_up(max(lengths), multiple)
        micro = Microbatch(rows=rows, row_index=list(row_index), tokens=_pad_right(rows.tokens, seq_len),
                           targets=_pad_right(rows.targets, seq_len),
                           position_ids=_padded_positions(rows, seq_len))
    else:
        seq_len = round_up(sum(lengths), multiple)
        starts = [0]
        for length in lengths[:-1]:
            starts.append(starts[-1] + length)
        steps = torch.arange(rows.tokens.shape[1], device=device)
        gather_index = (torch.tensor(starts, device=device).unsqueeze(1) + steps).clamp_max(seq_len - 1)
        inside = steps.unsqueeze(0) < torch.tensor(lengths, device=device).unsqueeze(1)
        micro = Microbatch(rows=rows, row_index=list(row_index),
                           tokens=_pack(rows.tokens, inside, seq_len), targets=_pack(rows.targets, inside, seq_len),
                           position_ids=_packed_positions(rows, inside, seq_len), gather_index=gather_index)
        if thd:
            micro.packed_seq_params = _thd_params(lengths, seq_len, device)
        else:
            micro.attention_mask = _block_causal_mask(lengths, seq_len, device)
    if with_routes:
        micro.routes = _model_routes(batch, row_index, micro)
    return micro


def _empty_microbatch(batch: TrainBatch, multiple: int) -> Microbatch:
    """One row of ``multiple`` padding tokens with no loss token: keeps the ranks' microbatch
    counts equal without changing the loss."""
    device = batch.tokens.device
    zeros = torch.zeros(1, multiple, device=device)
    tokens = torch.zeros(1, multiple, dtype=torch.long, device=device)
    rows = TrainBatch(tokens=tokens, targets=tokens, loss_mask=zeros, advantages=zeros[:, 0],
                      rollout_logprobs=zeros, old_logprobs=zeros,
                      position_ids=None if batch.position_ids is None else
                      torch.arange(multiple, device=device).expand(3, 1, multiple),
                      vision=None if batch.vision is None else [None],
                      lengths=torch.tensor([multiple]))
    return Microbatch(rows=rows, row_index=[], tokens=tokens, targets=tokens,
                      position_ids=_padded_positions(rows, multiple))


def _pad_right(values: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - values.shape[-1]
    return values if pad == 0 else torch.nn.functional.pad(values, (0, pad))


def _padded_positions(rows: TrainBatch, seq_len: int) -> torch.Tensor:
    """``0..S-1`` per row, or the rows' multimodal positions continued past their end."""
    if rows.position_ids is None:
        return torch.arange(seq_len, device=rows.tokens.device).unsqueeze(0).expand(rows.batch_size, -1)
    return _continue_positions(rows.position_ids, seq_len)


def _continue_positions(position_ids: torch.Tensor, length: int) -> torch.Tensor:
    """``[3, b, T]`` positions right-padded to ``length``, continuing each row's last position."""
    pad = length - position_ids.shape[-1]
    if pad == 0:
        return position_ids
    steps = torch.arange(1, pad + 1, device=position_ids.device)
    return torch.cat([position_ids, position_ids[..., -1:] + steps], dim=-1)


def _pack(values: torch.Tensor, inside: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Each row's real positions of ``values [b, T]`` one after another, padded to ``[1, S]``."""
    return _pad_right(values[inside].unsqueeze(0), seq_len)


def _packed_positions(rows: TrainBatch, inside: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Positions restarting at each row (``[1, S]``), or the rows' multimodal ones (``[3, 1, S]``)."""
    device = rows.tokens.device
    if rows.position_ids is None:
        steps = torch.arange(rows.tokens.shape[1], device=device).expand_as(inside)
        return _pad_right(steps[inside].unsqueeze(0), seq_len)
    packed = torch.stack([axis[inside] for axis in rows.position_ids]).unsqueeze(1)  # [3, 1, n]
    return _continue_positions(packed, seq_len)


def _segments(lengths: list[int], seq_len: int) -> list[int]:
    """Segment lengths of a packed stream: the rows, then the padding as one more segment."""
    tail = seq_len - sum(lengths)
    return list(lengths) + ([tail] if tail else [])


def _block_causal_mask(lengths: list[int], seq_len: int, device) -> torch.Tensor:
    """bool ``[1, 1, S, S]``, True where a query may not attend: other rows, or the future."""
    segment = torch.repeat_interleave(torch.arange(len(_segments(lengths, seq_len)), device=device),
                                      torch.tensor(_segments(lengths, seq_len), device=device))
    position = torch.arange(seq_len, device=device)
    allowed = (segment.unsqueeze(1) == segment.unsqueeze(0)) & (position.unsqueeze(1) >= position.unsqueeze(0))
    return (~allowed).view(1, 1, seq_len, seq_len)


def _thd_params(lengths: list[int], seq_len: int, device):
    from megatron.core.packed_seq_params import PackedSeqParams

    segments = _segments(lengths, seq_len)
    cu_seqlens = torch.tensor([0] + segments, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
    longest = max(segments)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _model_routes(batch: TrainBatch, row_index: list[int], micro: Microbatch) -> torch.Tensor:
    """The rows' routes in the model's layout, -1 where none (moved to the device here)."""
    if batch.routes is None:
        raise ValueError("routing replay needs TrainBatch.routes (R3: from the rollout; R2: recorded)")
    per_row = [batch.routes[i] for i in row_index]
    device = micro.tokens.device
    shape = per_row[0].shape[1:]
    if micro.packed:
        lengths = micro.rows.row_lengths
        stream = torch.full((micro.seq_len, *shape), -1, dtype=torch.long, device=device)
        start = 0
        for routes, length in zip(per_row, lengths):
            stream[start:start + routes.shape[0]] = routes.to(device, torch.long)
            start += length
        return stream.unsqueeze(0)
    dense = torch.full((len(per_row), micro.seq_len, *shape), -1, dtype=torch.long, device=device)
    for row, routes in enumerate(per_row):
        dense[row, :routes.shape[0]] = routes.to(device, torch.long)
    return dense


__all__ = ["Batching", "Microbatch", "build_microbatch", "extend_plan", "microbatch_cost", "plan_microbatches",
           "plan_rows", "round_up"]
