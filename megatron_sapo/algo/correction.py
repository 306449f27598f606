"""Rollout corrections: the trainer's behaviour policy against the engine that sampled.

The rollout engine samples with its own kernels, precision and (under bounded staleness) older
weights, so its log-probs ``rollout`` differ from the trainer's log-probs ``old`` of the same
tokens under the weights the step starts from. With ``rho_t = exp(old_t - rollout_t)`` (clamped
like the policy ratio), the corrections give each response token a weight ``w_t`` that
multiplies its per-token objective (the SAPO gate, the clipped GRPO term, GSPO's token term) and a
keep flag ``m_t``; tokens with ``m_t = 0`` leave the loss and its normaliser:

* ``tis`` (truncated importance sampling, token level): ``w_t = min(rho_t, high)``, ``m_t = 1``
  (``low`` is not used: a token the engine found more likely than the trainer does keeps its
  small weight);
* ``mis`` (masked importance sampling, sequence level): with the sequence ratio
  ``rho_i = exp(mean_t (old_it - rollout_it))`` (the geometric mean, so that long answers are
  not rejected for their length), ``w_it = rho_i`` and ``m_it = 1`` when
  ``low <= rho_i <= high``, else ``w_it = 0`` and ``m_it = 0`` for the whole sequence;
* ``icepop`` (token masking): ``w_t = rho_t`` and ``m_t = 1`` when ``low <= rho_t <= high``,
  else ``w_t = 0`` and ``m_t = 0``.

Weights are constants (no gradient), computed once per step from the old log-probs: they
depend on no parameter the step updates. The metrics report what the correction did: the mean
and largest weight over the kept tokens, the fraction of response tokens masked, and the k3
estimate of KL(rollout || trainer) (``exp(d) - d - 1`` with ``d = old - rollout``; 0 when the
two agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Correction:
    weights: torch.Tensor
    """float ``[B, T]``: ``w_t`` (0 where masked or not a response token)."""
    keep: torch.Tensor
    """bool ``[B, T]``: response tokens that stay in the loss."""


def rollout_correction(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, loss_mask: torch.Tensor,
                       method: str, low: float, high: float, *, logratio_clamp: float = 20.0) -> Correction:
    """``method``'s weights and keep flags for ``[B, T]`` log-probs (see the module docstring)."""
    mask = loss_mask.bool()
    log_rho = torch.where(mask, old_logprobs - rollout_logprobs, torch.zeros_like(old_logprobs))
    log_rho = log_rho.clamp(-logratio_clamp, logratio_clamp)
    rho = torch.exp(log_rho)
    if method == "none":
        return Correction(weights=mask.to(old_logprobs.dtype), keep=mask)
    if method == "tis":
        return Correction(weights=torch.where(mask, rho.clamp(max=high), torch.zeros_like(rho)), keep=mask)
    if method == "mis":
        lengths = mask.sum(-1, keepdim=True).clamp_min(1)
        seq_rho = torch.exp(log_rho.sum(-1, keepdim=True) / lengths).expand_as(rho)
        keep = mask & (seq_rho >= low) & (seq_rho <= high)
        return Correction(weights=torch.where(keep, seq_rho, torch.zeros_like(rho)), keep=keep)
    if method == "icepop":
        keep = mask & (rho >= low) & (rho <= high)
        return Correction(weights=torch.where(keep, rho, torch.zeros_like(rho)), keep=keep)
    raise ValueError(f"unknown rollout correction {method!r}")


def correction_sums(correction: Correction, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                    loss_mask: torch.Tensor) -> torch.Tensor:
    """``[5]`` float64 sums to all-reduce over data-parallel replicas: weights over kept tokens,
    kept tokens, response tokens, k3 KL over response tokens, and the largest weight (reduce that
    one with MAX: see :func:`correction_metrics`)."""
    mask = loss_mask.bool()
    d = torch.where(mask, (old_logprobs - rollout_logprobs).clamp(-20.0, 20.0), torch.zeros_like(old_logprobs))
    kl = torch.exp(d) - d - 1
    kept = correction.keep
    largest = correction.weights[kept].max() if kept.any() else torch.zeros((), device=kept.device)
    return torch.stack([correction.weights[kept].sum(), kept.sum(), mask.sum(), kl[mask].sum(), largest]).to(
        torch.float64)


def correction_metrics(summed: torch.Tensor, largest: float) -> dict[str, float]:
    """Step metrics from :func:`correction_sums` summed over replicas (``largest``: its last
    entry reduced with MAX)."""
    weight_sum, kept, tokens, kl = summed[:4].tolist()
    return {"rollout_correction_weight_mean": weight_sum / max(kept, 1.0),
            "rollout_correction_weight_max": largest,
            "rollout_correction_masked_frac": 1.0 - kept / max(tokens, 1.0),
            "rollout_kl": kl / max(tokens, 1.0)}

