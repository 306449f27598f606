"""Each data-parallel replica's share of a step's rows, sent by rank 0 to that replica alone.

A step's rows (``prompts_per_step x group_size`` samples) are split into ``train.minibatches``
consecutive minibatches, so minibatch ``m`` holds the same samples at any data-parallel size.
Each minibatch's rows are then divided over the replicas:

* fixed microbatches (``max_tokens_per_microbatch = 0``): an equal, consecutive share each,
  as before;
* token budget: longest row first, each to the replica with the fewest tokens so far (as
  sequence-length balancing does in other RL trainers), so replicas finish their passes at
  about the same time.

Rank 0 sends each rank only its replica's rows (the samples themselves: token ids, rollout
log-probs, compact routes for R3, images), one ``scatter_object_list`` over the world; the
rank builds its own padded ``TrainBatch`` from them. At the 30B-A3B job (1,024 responses, DP 8)
a rank receives 128 samples instead of 1,024 and computes old log-probs, R2 routes and
diagnostics for those 128 only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megatron_sapo.types import Sample, VisionInputs


@dataclass
class ReplicaRows:
    """What one replica trains in a step: its rows of every minibatch, minibatch after minibatch."""

    samples: list[Sample]
    advantages: list[float]
    vision: list[VisionInputs | None] | None
    """Per sample, its prompt's images (None for text models)."""
    minibatch_rows: list[int]
    """How many of ``samples`` belong to each minibatch, in order."""
    step_rows: list[int]
    """Each sample's index among the step's rows (for tests and logs)."""


def assign_rows(lengths: list[int], minibatches: int, dp_size: int, balance: bool) -> list[list[list[int]]]:
    """``[replica][minibatch]`` -> the step's row indices that replica trains in that minibatch.

    ``balance``: by tokens (longest first to the least loaded replica); else equal consecutive
    shares."""
    rows = len(lengths)
    if rows % minibatches:
        raise ValueError(f"{rows} samples do not split into train.minibatches = {minibatches}")
    per_minibatch = rows // minibatches
    if per_minibatch % dp_size:
        raise ValueError(f"a minibatch of {per_minibatch} samples does not split over {dp_size} data-parallel ranks")
    shares: list[list[list[int]]] = [[] for _ in range(dp_size)]
    for m in range(minibatches):
        members = range(m * per_minibatch, (m + 1) * per_minibatch)
        if balance:
            parts = _balanced(list(members), lengths, dp_size)
        else:
            per_rank = per_minibatch // dp_size
            parts = [list(members[r * per_rank:(r + 1) * per_rank]) for r in range(dp_size)]
        for replica, part in enumerate(parts):
            shares[replica].append(part)
    return shares


def _balanced(members: list[int], lengths: list[int], parts: int) -> list[list[int]]:
    loads = [(0, 0, r) for r in range(parts)]  # (tokens, rows, replica)
    chosen: list[list[int]] = [[] for _ in range(parts)]
    for row in sorted(members, key=lambda i: (-lengths[i], i)):
        tokens, count, replica = min(loads)
        chosen[replica].append(row)
        loads[replica] = (tokens + lengths[row], count + 1, replica)
    return [sorted(part) for part in chosen]


def replica_shares(samples: list[Sample], advantages: list[float], vision: list[VisionInputs | None] | None,
                   minibatches: int, dp_size: int, balance: bool) -> list[ReplicaRows]:
    """Rank 0: every replica's :class:`ReplicaRows`."""
    lengths = [len(s.tokens) for s in samples]
    shares = []
    for parts in assign_rows(lengths, minibatches, dp_size, balance):
        order = [row for part in parts for row in part]
        shares.append(ReplicaRows(samples=[samples[i] for i in order], advantages=[advantages[i] for i in order],
                                  vision=None if vision is None else [vision[i] for i in order],
                                  minibatch_rows=[len(part) for part in parts], step_rows=order))
    return shares


def scatter_rows(shares: list[ReplicaRows] | None, replica_of_rank: list[int]) -> ReplicaRows:
    """Collective over the world: rank 0 passes every replica's share (others None); each rank
    returns its replica's. ``replica_of_rank[r]``: the data-parallel rank of world rank ``r``."""
    inputs = [shares[replica_of_rank[r]] for r in range(len(replica_of_rank))] if shares is not None else None
    received = [None]
    dist.scatter_object_list(received, inputs, src=0)
    return received[0]


__all__ = ["ReplicaRows", "assign_rows", "replica_shares", "scatter_rows"]
