"""The policy loss: gate -> mask -> aggregation, plus optional KL and entropy terms.

``loss = -J`` where ``J`` aggregates the per-token objective of ``gates`` over response
tokens. Aggregations:

* ``seq-mean-token-mean`` (paper eq. 5): ``sum_i (1/|y_i| sum_t l_it) / N_seq``
* ``token-mean``:                         ``sum_it l_it / N_tok``
* ``seq-mean-token-sum``:                 ``sum_i sum_t l_it / N_seq``

The denominator is the ``normalizer`` argument. Left unset, it is this call's own count
(sequences with at least one response token, or response tokens). A trainer that splits a
batch over microbatches and data-parallel ranks passes the *global* count instead, so the
partial losses add up to the loss of the whole batch (see ``loss_normalizer``).

Log-ratios are masked before anything else, so padding can hold any value (even inf/NaN)
without reaching the loss or the gradient, and clamped to ``+-cfg.logratio_clamp`` before
``exp``.
"""

from __future__ import annotations

import torch

from megatron_sapo.algo import gates
from megatron_sapo.config import LossConfig


def loss_normalizer(loss_mask: torch.Tensor, agg: str) -> torch.Tensor:
    """This batch's share of the denominator: sequence count or token count (a 0-dim tensor).

    Sum it over microbatches and data-parallel ranks to get the ``normalizer`` of each call.
    """
    mask = loss_mask.bool()
    if agg == "token-mean":
        return mask.sum().to(torch.float32)
    return mask.any(-1).sum().to(torch.float32)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: LossConfig,
    *,
    normalizer: torch.Tensor | float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy loss of ``cfg.name`` for ``[B, T]`` log-probs of the sampled tokens.

    Args:
        logprobs: current policy log-probs ``[B, T]`` (differentiable).
        old_logprobs: behaviour policy log-probs ``[B, T]`` (treated as constants).
        advantages: per token ``[B, T]`` or per sequence ``[B]``.
        loss_mask: ``[B, T]``, nonzero on response tokens that count.
        cfg: the objective and its hyper-parameters.
        normalizer: denominator of the aggregation (see module docstring).
        ref_logprobs: reference policy log-probs ``[B, T]``, required when ``cfg.kl_coef > 0``.
        entropy: per-token entropy ``[B, T]`` (differentiable), required when
            ``cfg.entropy_coef > 0``; reported in the metrics whenever given.
        token_weights: ``[B, T]`` constants multiplying each token's objective (the rollout
            correction's weights, ``algo/correction.py``); None: 1.

    Returns:
        ``(loss, metrics)``: a 0-dim loss and a dict of 0-dim tensors (no host syncs);
        metric means are over this call's response tokens.
    """
    mask = loss_mask.bool()
    advantages = _validate(logprobs, old_logprobs, advantages, mask, cfg, normalizer, ref_logprobs, entropy,
                           token_weights)
    if normalizer is None:
        normalizer = loss_normalizer(mask, cfg.agg)

    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    log_ratio = log_ratio.clamp(-cfg.logratio_clamp, cfg.logratio_clamp)
    ratio = torch.exp(log_ratio)
    metrics = _ratio_metrics(ratio.detach(), mask)

    if cfg.name == "sapo":
        tau = gates.select_tau(advantages, cfg.tau_pos, cfg.tau_neg)
        objective = gates.sapo_objective(ratio, advantages, tau)
        metrics.update(_sapo_metrics(ratio.detach(), tau, mask))
    else:
        if cfg.name == "gspo":
            safe_logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))
            seq_log_ratio = gates.gspo_token_log_ratio(log_ratio, safe_logprobs, mask)
            ratio = torch.exp(seq_log_ratio.clamp(-cfg.logratio_clamp, cfg.logratio_clamp))
            metrics["seq_ratio_mean"] = masked_mean(ratio.detach(), mask)
        objective = gates.clipped_objective(ratio, advantages, cfg.eps_low, cfg.eps_high, cfg.dual_clip_c)
        metrics.update(_clip_metrics(ratio.detach(), advantages, mask, cfg))

    if token_weights is not None:
        objective = objective * token_weights.detach().to(objective.dtype)
    token_loss = -objective
    if cfg.kl_coef > 0:
        kl = kl_penalty(logprobs, ref_logprobs, mask, cfg.kl_estimator)
        token_loss = token_loss + cfg.kl_coef * kl
        metrics["kl_ref"] = masked_mean(kl.detach(), mask)
    if entropy is not None:
        if cfg.entropy_coef > 0:
            token_loss = token_loss - cfg.entropy_coef * entropy
        metrics["entropy"] = masked_mean(entropy.detach(), mask)

    loss = aggregate(token_loss, mask, cfg.agg, normalizer)
    metrics["tokens"] = mask.sum().to(torch.float32)
    return loss, metrics


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, agg: str, normalizer) -> torch.Tensor:
    """Reduce ``[B, T]`` token losses to a scalar (masked positions contribute exactly zero)."""
    token_loss = torch.where(mask, token_loss, torch.zeros_like(token_loss))
    if agg == "token-mean":
        total = token_loss.sum()
    elif agg == "seq-mean-token-mean":
        lengths = mask.sum(-1).clamp_min(1).to(token_loss.dtype)
        total = (token_loss.sum(-1) / lengths).sum()
    elif agg == "seq-mean-token-sum":
        total = token_loss.sum()
    else:
        raise ValueError(f"unknown aggregation {agg!r}")
    return total / normalizer


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    k1: ``log pi - log pi_ref`` (unbiased, can be negative). k3: ``exp(d) - d - 1`` with
    ``d = log pi_ref - log pi`` (unbiased, non-negative, low variance).
    """
    diff = torch.where(mask, ref_logprobs.detach() - logprobs, torch.zeros_like(logprobs))
    if estimator == "k1":
        return -diff
    diff = diff.clamp(-20.0, 20.0)
    return torch.exp(diff) - diff - 1


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True (0 when it is nowhere), in fp32."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return (total / mask.sum().clamp_min(1)).to(torch.float32)


def _masked_fraction(flags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(flags.to(torch.float32), mask)


def _ratio_metrics(ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    inf = torch.full_like(ratio, float("inf"))
    return {
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_min": torch.where(mask, ratio, inf).amin().to(torch.float32),
        "ratio_max": torch.where(mask, ratio, -inf).amax().to(torch.float32),
    }


def _sapo_metrics(ratio: torch.Tensor, tau: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    weight = gates.sapo_grad_weight(ratio, tau)
    return {
        "gate_mean": masked_mean(gates.sapo_gate(ratio, tau), mask),
        "grad_weight_mean": masked_mean(weight, mask),
        "attenuated_frac": _masked_fraction(weight < gates.ATTENUATED_BELOW, mask),
    }


def _clip_metrics(ratio, advantages, mask, cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Fractions of tokens whose gradient the hard clip removes, by which side of the band."""
    sides = gates.clip_sides(ratio, advantages, cfg.eps_low, cfg.eps_high, cfg.dual_clip_c)
    return {f"clip_frac_{side}": _masked_fraction(flags, mask) for side, flags in sides.items()}


def _validate(logprobs, old_logprobs, advantages, mask, cfg, normalizer, ref_logprobs, entropy,
              token_weights) -> torch.Tensor:
    """Check shapes and values; return advantages broadcast to ``[B, T]``."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T]; got shape {tuple(logprobs.shape)}")
    shape = logprobs.shape
    named = {"old_logprobs": old_logprobs, "loss_mask": mask, "ref_logprobs": ref_logprobs, "entropy": entropy,
             "token_weights": token_weights}
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {tuple(shape)} like logprobs")
    if advantages.shape == shape[:1]:
        advantages = advantages.unsqueeze(-1).expand(shape)
    elif advantages.shape != shape:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected per sequence {tuple(shape[:1])} "
            f"or per token {tuple(shape)}"
        )
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("loss.kl_coef > 0 needs ref_logprobs")
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError("loss.entropy_coef > 0 needs entropy")
    if normalizer is None and not mask.any():
        raise ValueError("loss_mask selects no token; pass an explicit normalizer for an empty microbatch")
    for name, tensor in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages)):
        if not torch.isfinite(tensor.detach()[mask]).all():
            raise ValueError(f"{name} has NaN or inf on response tokens (loss_mask != 0)")
    return advantages.detach().to(logprobs.dtype)
