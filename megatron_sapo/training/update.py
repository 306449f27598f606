"""One optimizer step on a minibatch: the policy loss (RL) or the token NLL (supervised start).

The minibatch (this data-parallel rank's rows) is split into microbatches
(``training/microbatch.py``: fixed rows or a token budget, each padded to its own longest row
or packed) that run forward and backward through Megatron's pipeline schedule, then the
optimizer steps once.

Loss scaling, so that any split gives the gradient of the whole minibatch: each microbatch's
loss is ``policy_loss(..., normalizer=N)`` where ``N`` is the aggregation's denominator (token
or sequence count) summed over the *whole* minibatch, across microbatches and data-parallel
ranks; these partial losses add up to the loss of the minibatch. Megatron then divides each
microbatch's loss by the number of microbatches (schedule) and averages gradients over
data-parallel ranks (DDP), so the loss handed to the schedule is multiplied by
``num_microbatches * dp_size`` to cancel both: gradients become plain sums of the partial
gradients, i.e. the gradient of the minibatch loss.

Metrics are computed on the last pipeline stage per microbatch, combined over microbatches and
data-parallel ranks (token-weighted means, global minimum / maximum, sums for the loss and the
token count) and sent to every pipeline stage.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_sapo.algo import kl_penalty, loss_normalizer, masked_mean, policy_loss
from megatron_sapo.config import LossConfig
from megatron_sapo.parallel.collectives import comm_device
from megatron_sapo.training.forward import (microbatches, row_logprobs, run_schedule, sequence_multiple,
                                            token_forward_step)
from megatron_sapo.training.microbatch import Batching, Microbatch, microbatch_cost, plan_microbatches
from megatron_sapo.training.optimizer import current_lr
from megatron_sapo.types import TrainBatch


@dataclass
class StepMetrics:
    """What one minibatch update reports; token metrics are means over the minibatch's loss tokens
    on all data-parallel ranks. Fields a loss does not produce are None."""

    loss: float
    """The minibatch loss (the sum of the microbatches' partial losses)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    lr: float
    """Learning rate this step applied."""
    tokens: float
    """Loss tokens in the minibatch, all data-parallel ranks together."""
    entropy: float | None = None
    """Mean entropy of the policy at the loss tokens (at the sampling temperature)."""
    ratio_mean: float | None = None
    """Mean token ratio ``pi / pi_old``."""
    ratio_min: float | None = None
    ratio_max: float | None = None
    kl_old: float | None = None
    """Mean k3 estimate of KL between the current and the old policy at the loss tokens."""
    gate_mean: float | None = None
    """SAPO: mean soft gate value."""
    grad_weight_mean: float | None = None
    """SAPO: mean gradient weight ``sech^2(tau/2 (r - 1))``."""
    attenuated_frac: float | None = None
    """SAPO: fraction of tokens whose gradient weight is below 0.5."""
    clip_frac_low: float | None = None
    """GRPO/GSPO: fraction of tokens clipped below (A < 0)."""
    clip_frac_high: float | None = None
    """GRPO/GSPO: fraction of tokens clipped above (A > 0)."""
    clip_frac_dual: float | None = None
    """GRPO/GSPO with dual clip: fraction of tokens capped by it."""
    seq_ratio_mean: float | None = None
    """GSPO: mean length-normalised sequence ratio."""
    kl_ref: float | None = None
    """Mean KL penalty to the reference policy, when one is used."""
    routing_agreement: float | None = None
    """With routing replay: fraction of (token, MoE layer) routes where the router's own choice
    equals the replayed one."""
    microbatches: float | None = None
    """Microbatches each rank ran (the same on every rank)."""
    real_tokens: float | None = None
    """Tokens of the minibatch's rows (prompts and responses), all data-parallel ranks together."""
    processed_tokens: float | None = None
    """Token positions the model ran for them (padding included), all data-parallel ranks together."""

    def as_dict(self) -> dict[str, float]:
        """The fields that have a value, for logging."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# How each metric combines over microbatches and data-parallel ranks; unlisted ones are
# token-weighted means.
_REDUCTIONS = {"loss": "sum", "tokens": "sum", "ratio_min": "min", "ratio_max": "max"}


def train_minibatch(model, optimizer, scheduler, batch: TrainBatch, loss_cfg: LossConfig, pg_collection, *,
                    batching: Batching, temperature: float, true_vocab_size: int,
                    routing=None) -> StepMetrics:
    """One policy-gradient step on ``batch`` (this data-parallel rank's rows of the minibatch).

    ``model``, ``optimizer``, ``scheduler`` come from ``build_optimizer``. ``batch.old_logprobs``
    is required; ``routing`` (a ``RoutingReplay`` of ``model``) replays ``batch.routes``.
    Collective over all ranks.
    """
    _check_policy_inputs(batch, loss_cfg)

    def policy_head(logits, micro: Microbatch, normalizer: torch.Tensor):
        rows = micro.rows
        logp, entropy = row_logprobs(logits, micro, pg_collection.tp, temperature=temperature,
                                     vocab_size=true_vocab_size, entropy=True)
        loss, metrics = policy_loss(logp, rows.old_logprobs, rows.advantages, rows.loss_mask, loss_cfg,
                                    normalizer=normalizer, entropy=entropy, token_weights=rows.token_weights)
        mask = rows.loss_mask.bool()
        metrics["kl_old"] = masked_mean(kl_penalty(logp.detach(), rows.old_logprobs, mask, "k3"), mask)
        return loss, metrics

    return _update(model, optimizer, scheduler, batch, pg_collection, policy_head,
                   normalizer=loss_normalizer(batch.loss_mask, loss_cfg.agg), batching=batching, routing=routing)


def _update(model, optimizer, scheduler, batch: TrainBatch, pg_collection, loss_head, *,
            normalizer: torch.Tensor, batching: Batching, routing) -> StepMetrics:
    """Forward+backward over the microbatches of ``batch`` with ``loss_head``, then one optimizer step.

    ``loss_head(logits, micro, global_normalizer) -> (loss, metrics)``; ``normalizer`` is this
    rank's share of the denominator.
    """
    if not hasattr(model, "zero_grad_buffer"):
        raise TypeError("the model must be the DistributedDataParallel wrapper returned by build_optimizer")
    global_normalizer = _global_normalizer(normalizer, pg_collection)
    if global_normalizer.item() == 0:
        # Every row left the loss on every replica (dynamic sampling's fillers, masking): nothing
        # to learn, so no update; every rank sees the same all-reduced count and skips together.
        return StepMetrics(loss=0.0, grad_norm=0.0, lr=current_lr(optimizer), tokens=0.0, microbatches=0.0,
                           real_tokens=0.0, processed_tokens=0.0)
    multiple = sequence_multiple(model)
    lengths = batch.row_lengths
    plan = plan_microbatches(lengths, batching, multiple, pg_collection.dp_cp)
    # Cancels the schedule's division by the number of microbatches and DDP's mean over replicas.
    loss_scale = len(plan) * dist.get_world_size(pg_collection.dp_cp)

    def head(logits, micro: Microbatch):
        loss, metrics = loss_head(logits, micro, global_normalizer)
        metrics["loss"] = loss.detach()
        return loss * loss_scale, metrics

    step = token_forward_step(head, routing=routing)
    model.train()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    with routing.replaying(batch) if routing is not None else nullcontext():
        collected = run_schedule(model, microbatches(model, batch, plan, pack=batching.pack,
                                                     with_routes=routing is not None),
                                 len(plan), step, pg_collection, forward_only=False)
    lr = current_lr(optimizer)
    succeeded, grad_norm, _ = optimizer.step()
    if not succeeded:
        raise RuntimeError("the optimizer skipped its step (non-finite gradients)")
    scheduler.step(1)
    metrics = _reduce_metrics(collected, pg_collection)
    agreement = routing.agreement if routing is not None else None
    real, processed = _token_counts(lengths, plan, batching.pack, multiple, pg_collection)
    return StepMetrics(grad_norm=float(grad_norm), lr=lr, routing_agreement=agreement, microbatches=float(len(plan)),
                       real_tokens=real, processed_tokens=processed, **metrics)


def _token_counts(lengths: list[int], plan: list[list[int]], pack: bool, multiple: int,
                  pg_collection) -> tuple[float, float]:
    """Real tokens of the rows and token positions the model ran, over all data-parallel ranks."""
    processed = sum(microbatch_cost([lengths[i] for i in rows], pack, multiple) for rows in plan)
    counts = torch.tensor([float(sum(lengths)), float(processed)], dtype=torch.float64,
                          device=comm_device(pg_collection.dp_cp))
    dist.all_reduce(counts, group=pg_collection.dp_cp)
    return counts[0].item(), counts[1].item()


def _check_policy_inputs(batch: TrainBatch, loss_cfg: LossConfig) -> None:
    """What the loss would reject, rejected on every rank before the schedule starts (a stage
    failing alone inside the schedule would leave the other stages waiting)."""
    if batch.old_logprobs is None:
        raise ValueError("TrainBatch.old_logprobs is None; compute_logprobs fills it before the update")
    if loss_cfg.kl_coef > 0:
        raise ValueError("loss.kl_coef > 0 needs reference-policy log-probs, which TrainBatch does not carry")
    if batch.old_logprobs.shape != batch.tokens.shape or batch.advantages.shape != batch.tokens.shape[:1]:
        raise ValueError(f"TrainBatch.old_logprobs {tuple(batch.old_logprobs.shape)} must be [B, T] and "
                         f"advantages {tuple(batch.advantages.shape)} [B], for tokens "
                         f"{tuple(batch.tokens.shape)}")
    mask = batch.loss_mask.bool()
    if not torch.isfinite(batch.old_logprobs[mask]).all() or not torch.isfinite(batch.advantages).all():
        raise ValueError("TrainBatch.old_logprobs (at loss tokens) or advantages hold NaN or inf")


def _global_normalizer(local: torch.Tensor, pg_collection) -> torch.Tensor:
    total = local.detach().to(comm_device(pg_collection.dp_cp), torch.float32).clone()
    dist.all_reduce(total, group=pg_collection.dp_cp)
    return total


def _reduce_metrics(collected: list[dict[str, torch.Tensor]], pg_collection) -> dict[str, float]:
    """Combine per-microbatch metrics over microbatches and data-parallel ranks; on every stage."""
    from megatron.core.pipeline_parallel.utils import get_pp_last_rank

    result = [_reduce_over_data_parallel(collected, pg_collection.dp_cp) if collected else None]
    if dist.get_world_size(pg_collection.pp) > 1:  # only the last stage ran the loss
        dist.broadcast_object_list(result, src=get_pp_last_rank(pg_collection.pp), group=pg_collection.pp)
    return result[0]


def _reduce_over_data_parallel(collected: list[dict[str, torch.Tensor]], group) -> dict[str, float]:
    device = comm_device(group)
    per_key = {key: torch.stack([m[key] for m in collected]).to(device, torch.float64) for key in collected[0]}
    tokens = per_key["tokens"]
    local: dict[str, dict[str, torch.Tensor]] = {"sum": {}, "min": {}, "max": {}}
    for key, values in per_key.items():
        kind = _REDUCTIONS.get(key, "mean")
        if kind == "min":
            local["min"][key] = values.min()
        elif kind == "max":
            local["max"][key] = values.max()
        elif kind == "sum":
            local["sum"][key] = values.sum()
        else:  # summed token-weighted here, divided by the total token count below
            local["sum"][key] = (values * tokens).sum()
    reduced: dict[str, float] = {}
    for kind, op in (("sum", dist.ReduceOp.SUM), ("min", dist.ReduceOp.MIN), ("max", dist.ReduceOp.MAX)):
        if local[kind]:
            packed = torch.stack(list(local[kind].values()))
            dist.all_reduce(packed, op=op, group=group)
            reduced.update(zip(local[kind], packed.tolist()))
    total_tokens = max(reduced["tokens"], 1.0)
    for key in per_key:
        if _REDUCTIONS.get(key, "mean") == "mean":
            reduced[key] /= total_tokens
    return reduced
