"""Megatron DDP, the distributed Adam optimizer and the learning-rate schedule for one model.

Choices:

* Megatron's ``DistributedDataParallel`` keeps gradients in contiguous fp32 buffers and reduces
  them over data-parallel ranks once per minibatch (no overlap with backward: the reduction is
  one collective at the end, which keeps the loss scaling of ``update.py`` easy to reason about).
* The ``DistributedOptimizer`` shards Adam's state and fp32 master weights over data-parallel
  ranks (ZeRO-1); after its step it gathers the updated weights back into every replica.
* ``finalize_model_grads`` is installed on the model config, so the pipeline schedule finishes
  each minibatch's gradients (data-parallel reduce-scatter, sequence-parallel norm gradients
  over TP, tied embeddings over PP) before the optimizer step.
* Gradients are clipped to ``clip_grad`` by their global norm over all model-parallel ranks.
* ``OptimizerParamScheduler`` sets the learning rate: linear warm-up from 0 over
  ``warmup_steps``, then constant, linear or cosine decay to ``min_lr`` at ``total_steps``.
  As in Megatron, step ``k`` (from 0) uses the rate after ``k`` scheduler steps, so with
  warm-up the first step has rate 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple


from megatron_sapo.config import ConfigError, OptimizerConfig

if TYPE_CHECKING:  # annotations only: Megatron is imported when a model is built
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


class Trainable(NamedTuple):
    """What ``build_optimizer`` returns; unpacks as ``model, optimizer, scheduler``."""

    model: DistributedDataParallel
    """The model wrapped in Megatron ``DistributedDataParallel``; train and evaluate through it."""
    optimizer: MegatronOptimizer
    """Megatron's (chained, distributed) optimizer; ``step()`` returns ``(ok, grad_norm, zeros)``."""
    scheduler: OptimizerParamScheduler
    """Megatron ``OptimizerParamScheduler``; ``step(1)`` after each optimizer step."""


def build_optimizer(model, cfg: OptimizerConfig, pg_collection, *, total_steps: int) -> Trainable:
    """Wrap ``model`` (this rank's ``GPTModel``) for training; ``total_steps`` optimizer steps in all."""
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    _check_steps(cfg, total_steps)
    config = model.config
    if config.fp16:
        raise ConfigError("fp16 models need loss scaling, which this trainer does not do; use bf16 or fp32")
    if config.calculate_per_token_loss:
        raise ConfigError("calculate_per_token_loss must be off: update.py normalises the loss itself")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        use_distributed_optimizer=True,
        check_for_nan_in_grad=True,
    )
    wrapped = DistributedDataParallel(config, ddp_config, model, pg_collection=pg_collection)
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=cfg.adam_eps,
            clip_grad=cfg.clip_grad,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=True,
        ),
        [wrapped],
        use_gloo_process_groups=False,  # groups come from pg_collection, which Megatron requires then
        pg_collection=pg_collection,
    )
    return Trainable(wrapped, optimizer, _scheduler(optimizer, cfg, total_steps))


def _scheduler(optimizer, cfg: OptimizerConfig, total_steps: int):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        # Megatron requires decay steps beyond the warm-up even for a constant rate.
        lr_decay_steps=max(total_steps, cfg.warmup_steps + 1),
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )


def _check_steps(cfg: OptimizerConfig, total_steps: int) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ConfigError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if cfg.lr_decay_style != "constant" and total_steps <= cfg.warmup_steps:
        raise ConfigError(f"optimizer.warmup_steps ({cfg.warmup_steps}) must be below the total number of "
                          f"optimizer steps ({total_steps}) for a {cfg.lr_decay_style} decay")


def current_lr(optimizer) -> float:
    """The learning rate the next ``optimizer.step()`` applies."""
    return float(optimizer.param_groups[0]["lr"])


__all__ = ["Trainable", "build_optimizer", "current_lr"]
