"""Per-token log-probs of a batch under the trainer's current weights (the "old" policy).

A forward-only pass through Megatron's schedule over the rank's own rows, microbatch by
microbatch (``training/microbatch.py``: fixed rows or a token budget, padded or packed). On the
last pipeline stage each microbatch's logits (this rank's vocabulary shard) become log-probs of
the targets with ``vocab_parallel_logprobs``, so the vocabulary is never gathered; the result
is then broadcast from the last stage so every rank of the pipeline holds ``[B, T]``.

With routing replay (``routing``): if the batch carries ``routes`` they are replayed (R3: the
rollout engine's routes), otherwise this pass records the router's own choice (R2) into
``routing.recorded`` for the training passes to replay.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

from megatron_sapo.parallel.collectives import comm_device
from megatron_sapo.training.forward import (microbatches, row_logprobs, run_schedule, sequence_multiple,
                                            token_forward_step)
from megatron_sapo.training.microbatch import Batching, plan_microbatches
from megatron_sapo.types import TrainBatch


@torch.no_grad()
def compute_logprobs(model, batch: TrainBatch, pg_collection, *, batching: Batching, temperature: float,
                     true_vocab_size: int, routing=None) -> torch.Tensor:
    """fp32 ``[B, T]`` log-probs of ``batch.targets`` under ``softmax(logits / temperature)``,
    0 where ``batch.loss_mask`` is 0; on every rank. Collective over the model-parallel groups
    and (agreeing on the number of microbatches) the data-parallel group.

    ``routing``: a ``RoutingReplay`` of ``model``; replays ``batch.routes`` when present, else
    records the routes into ``routing.recorded``.
    """
    plan = plan_microbatches(batch.row_lengths, batching, sequence_multiple(model), pg_collection.dp_cp)

    def logprobs_head(logits, micro):
        logp = row_logprobs(logits, micro, pg_collection.tp, temperature=temperature, vocab_size=true_vocab_size)
        return micro.row_index, torch.where(micro.rows.loss_mask.bool(), logp, torch.zeros_like(logp))

    replay = routing is not None and batch.routes is not None
    if routing is None:
        pass_context = nullcontext()
    else:
        pass_context = routing.replaying(batch) if replay else routing.recording(batch)
    last_stage = dist.get_rank(pg_collection.pp) == dist.get_world_size(pg_collection.pp) - 1
    step = token_forward_step(logprobs_head, routing=routing, eager=last_stage)
    was_training = model.training
    model.eval()
    try:
        with pass_context:
            collected = run_schedule(model, microbatches(model, batch, plan, pack=batching.pack, with_routes=replay),
                                     len(plan), step, pg_collection, forward_only=True, collect_non_loss_data=True)
    finally:
        model.train(was_training)
    return _from_last_stage(collected, batch, pg_collection)


def _from_last_stage(collected: list, batch: TrainBatch, pg_collection) -> torch.Tensor:
    """The last stage's log-probs in the batch's row order, broadcast over the pipeline group."""
    from megatron.core.pipeline_parallel.utils import get_pp_last_rank

    logprobs = torch.zeros(batch.tokens.shape, dtype=torch.float32, device=batch.tokens.device)
    for rows, logp in collected:
        if rows:
            logprobs[rows, :logp.shape[1]] = logp
    if dist.get_world_size(pg_collection.pp) > 1:
        device = comm_device(pg_collection.pp)
        shared = logprobs.to(device)
        dist.broadcast(shared, src=get_pp_last_rank(pg_collection.pp), group=pg_collection.pp)
        logprobs = shared.to(batch.tokens.device)
    return logprobs
