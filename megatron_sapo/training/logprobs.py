"""Per-token log-probs of a batch under the trainer's current weights (the "old" policy).

A forward-only pass through Megatron's schedule, microbatch by microbatch. On the last pipeline
stage each microbatch's logits (this rank's vocabulary shard) become log-probs of the targets
with ``vocab_parallel_logprobs``, so the vocabulary is never gathered; the result is then
broadcast from the last stage so every rank of the pipeline holds ``[B, T]``.

With routing replay (``routing``): if the batch carries ``routes`` they are replayed (R3: the
rollout engine's routes), otherwise this pass records the router's own choice (R2) into
``routing.recorded`` for the training passes to replay.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

from megatron_sapo.parallel import vocab_parallel_logprobs
from megatron_sapo.training.forward import padded_length, run_schedule, split_microbatches, token_forward_step
from megatron_sapo.types import TrainBatch


@torch.no_grad()
def compute_logprobs(model, batch: TrainBatch, pg_collection, *, micro_batch_size: int, temperature: float,
                     true_vocab_size: int, routing=None) -> torch.Tensor:
    """fp32 ``[B, T]`` log-probs of ``batch.targets`` under ``softmax(logits / temperature)``,
    0 where ``batch.loss_mask`` is 0; on every rank. Collective over the model-parallel groups.

    ``routing``: a ``RoutingReplay`` of ``model``; replays ``batch.routes`` when present, else
    records the routes into ``routing.recorded``.
    """
    seq_len = padded_length(model, batch.tokens.shape[1])

    def logprobs_head(logits, micro: TrainBatch):
        logp = vocab_parallel_logprobs(logits, micro.targets, group=pg_collection.tp, temperature=temperature,
                                       vocab_size=true_vocab_size)
        return torch.where(micro.loss_mask.bool(), logp, torch.zeros_like(logp))

    if routing is None:
        pass_context = nullcontext()
    else:
        pass_context = routing.replaying(batch) if batch.routes is not None else routing.recording()
    step = token_forward_step(logprobs_head, seq_len=seq_len, routing=routing)
    was_training = model.training
    model.eval()
    try:
        with pass_context:
            collected = run_schedule(model, split_microbatches(batch, micro_batch_size), step, pg_collection,
                                     seq_len=seq_len, forward_only=True, collect_non_loss_data=True)
    finally:
        model.train(was_training)
    return _from_last_stage(collected, batch, pg_collection)


def _from_last_stage(collected: list[torch.Tensor], batch: TrainBatch, pg_collection) -> torch.Tensor:
    """The last stage's log-probs, broadcast over the pipeline group."""
    from megatron.core.pipeline_parallel.utils import get_pp_last_rank

    if collected:
        logprobs = torch.cat(collected, dim=0)
    else:
        logprobs = torch.empty(batch.tokens.shape, dtype=torch.float32, device=batch.tokens.device)
    if dist.get_world_size(pg_collection.pp) > 1:
        dist.broadcast(logprobs, src=get_pp_last_rank(pg_collection.pp), group=pg_collection.pp)
    return logprobs
