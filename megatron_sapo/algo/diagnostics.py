"""Gate diagnostics of the paper's section 4.1, for any batch of a user's own run.

Under small steps (log r_it near 0) SAPO's token gradient weight is ``g(z_it)`` with
``g(z) = sech^2(tau z / 2)`` and ``z_it = log r_it``. Averaged over a sequence it approximates
the *sequence* gate ``g(mu_i)`` at ``mu_i = mean_t z_it = log s_i`` (GSPO's length-normalised
log ratio). Because ``|g''| <= tau^2 / 2``, a second-order expansion around ``mu_i`` bounds the gap

    D_i = | mean_t g(z_it) - g(mu_i) |  <=  tau^2 / 4 * Var_i,   Var_i = mean_t (z_it - mu_i)^2

(eq. 21). Small ``Var_i`` therefore means SAPO behaves like a smooth sequence-level gate; the
histograms of ``r_it`` and ``Var_i`` show how often a run is in that regime.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_sapo.algo.gates import select_tau


@dataclass
class GateDiagnostics:
    """Per-sequence statistics for the rows of one batch that have response tokens."""

    token_ratios: torch.Tensor
    """``r_it`` of every response token, flattened."""
    log_ratio_var: torch.Tensor
    """``Var_i`` of each sequence's token log-ratios ``[S]``."""
    gate_gap: torch.Tensor
    """``D_i``: |mean token gate - sequence gate| ``[S]``."""
    gap_bound: torch.Tensor
    """``tau_i^2 / 4 * Var_i`` ``[S]``; ``gate_gap <= gap_bound`` holds for every sequence."""
    tau: torch.Tensor
    """Temperature each sequence was gated with ``[S]``."""


def log_ratio_variance(log_ratio: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Population variance of each row's masked log-ratios ``[B]`` (0 for empty rows)."""
    mask = loss_mask.bool()
    count = mask.sum(-1).clamp_min(1)
    zeros = torch.zeros_like(log_ratio)
    mean = torch.where(mask, log_ratio, zeros).sum(-1) / count
    centred = torch.where(mask, log_ratio - mean.unsqueeze(-1), zeros)
    return centred.pow(2).sum(-1) / count


def gate_diagnostics(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> GateDiagnostics:
    """Compute ``r_it``, ``Var_i``, ``D_i`` and its bound for ``[B, T]`` inputs.

    ``advantages`` is per sequence ``[B]`` (or per token ``[B, T]``, of which the first response
    token's sign picks ``tau``). Rows without response tokens are dropped.
    """
    mask = loss_mask.bool()
    keep = mask.any(-1)
    z = torch.where(mask, (logprobs - old_logprobs).detach().double(), torch.zeros((), dtype=torch.float64))
    if advantages.dim() == 2:
        first = mask.to(torch.int64).argmax(-1, keepdim=True)
        advantages = advantages.gather(-1, first).squeeze(-1)
    tau = select_tau(advantages.detach().double(), tau_pos, tau_neg)

    count = mask.sum(-1).clamp_min(1)
    mu = z.sum(-1) / count
    token_gate = torch.where(mask, _sech2(tau.unsqueeze(-1) * z / 2), torch.zeros_like(z))
    gap = (token_gate.sum(-1) / count - _sech2(tau * mu / 2)).abs()
    var = log_ratio_variance(z, mask)
    return GateDiagnostics(
        token_ratios=torch.exp(z[mask]).float(),
        log_ratio_var=var[keep].float(),
        gate_gap=gap[keep].float(),
        gap_bound=(tau.pow(2) / 4 * var)[keep].float(),
        tau=tau[keep].float(),
    )


def histogram(values: torch.Tensor, bins: int, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and ``bins + 1`` edges of ``values`` on ``[low, high]``; outliers land in the end bins."""
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    clipped = values.detach().double().clamp(low, high)
    index = torch.bucketize(clipped, edges[1:-1], right=True)
    counts = torch.bincount(index, minlength=bins)
    return counts, edges


def _sech2(x: torch.Tensor) -> torch.Tensor:
    return torch.cosh(x).pow(-2)
