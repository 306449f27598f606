"""Rollout samples -> the padded :class:`~megatron_sapo.types.TrainBatch` the trainer consumes."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron_sapo.types import Sample, TrainBatch


def build_train_batch(samples: Sequence[Sample], advantages: Sequence[float], pad_id: int, *,
                      with_routes: bool = False) -> TrainBatch:
    """Right-pad every ``prompt + response`` to the longest; the loss covers response tokens.

    ``with_routes``: also carry the routed experts the rollout engine returned (R3); positions
    past a sequence's end keep zeros, which the replay treats as padding."""
    if len(samples) != len(advantages):
        raise ValueError(f"{len(samples)} samples but {len(advantages)} advantages")
    length = max(len(s.tokens) for s in samples)
    rows = len(samples)
    tokens = torch.full((rows, length), pad_id, dtype=torch.long)
    targets = torch.full((rows, length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(rows, length)
    rollout_logprobs = torch.zeros(rows, length)
    routes = None
    for i, sample in enumerate(samples):
        ids = torch.tensor(sample.tokens)
        n, first = len(ids), len(sample.prompt_ids) - 1
        tokens[i, :n] = ids
        targets[i, :n - 1] = ids[1:]
        loss_mask[i, first:n - 1] = 1.0
        rollout_logprobs[i, first:n - 1] = torch.tensor(sample.rollout_logprobs)
        if with_routes:
            if sample.routed_experts is None:
                raise ValueError(f"sample {i} has no routed experts (R3 needs the rollout to return them)")
            if routes is None:
                _, layers, top_k = sample.routed_experts.shape
                routes = torch.zeros(rows, length, layers, top_k, dtype=torch.int32)
            routes[i, :n - 1] = torch.from_numpy(np.asarray(sample.routed_experts, dtype=np.int32))
    return TrainBatch(tokens=tokens, targets=targets, loss_mask=loss_mask,
                      advantages=torch.tensor(list(advantages), dtype=torch.float32),
                      rollout_logprobs=rollout_logprobs, routes=routes)
