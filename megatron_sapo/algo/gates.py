"""Per-token surrogates of the paper's unified objective (eq. 10-14).

Every objective maximises ``1/G sum_i 1/|y_i| sum_t f_it * A_it``; they differ only in ``f``:

* SAPO (soft gate):   ``f(r) = sigmoid(tau * (r - 1)) * 4 / tau``, ``tau = tau_pos if A > 0
  else tau_neg``. Its derivative is ``w(r) = 4 p (1 - p) = sech^2(tau/2 * (r - 1))`` with
  ``p = sigmoid(tau (r - 1))``: 1 on-policy, decaying smoothly off-policy (eq. 8).
* GRPO (token hard clip): ``min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``, optionally capped
  at ``c A`` for ``A < 0`` (dual clip).
* GSPO (sequence hard clip): the same clip applied to ``s_it = sg(s_i) * pi / sg(pi)`` where
  ``log s_i = mean_t log r_it``: equal in value to the sequence ratio, but with each token's own
  gradient path.

Functions here return the *per-token objective* ``f * A`` (to be maximised) so that the loss
module owns signs, masks and aggregation.
"""

from __future__ import annotations

import torch


def select_tau(advantages: torch.Tensor, tau_pos: float, tau_neg: float) -> torch.Tensor:
    """Per-token temperature: ``tau_pos`` where A > 0, ``tau_neg`` elsewhere (A = 0 included)."""
    pos = torch.full_like(advantages, tau_pos)
    return torch.where(advantages > 0, pos, torch.full_like(advantages, tau_neg))


def sapo_gate(ratio: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """The soft gate ``f(r) = sigmoid(tau (r - 1)) * 4 / tau``."""
    return torch.sigmoid(tau * (ratio - 1)) * (4 / tau)


def sapo_grad_weight(ratio: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """``df/dr = sech^2(tau/2 (r - 1))``: the factor SAPO puts on the unclipped token gradient."""
    return torch.cosh(tau * (ratio - 1) / 2).pow(-2)


ATTENUATED_BELOW = 0.5
"""A token's SAPO gate counts as engaged (``attenuated_frac``) where its gradient weight is below this."""


def sapo_attenuated(ratio: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """bool: the soft gate engaged, ``sech^2(tau/2 (r - 1)) < ATTENUATED_BELOW`` (at tau = 1:
    r > 2.76; ratios are positive, so never from below)."""
    return sapo_grad_weight(ratio, tau) < ATTENUATED_BELOW


def clip_sides(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
) -> dict[str, torch.Tensor]:
    """bool flags of the tokens whose gradient ``clipped_objective`` removes, by the side that
    removes it: "low" (A < 0, r < 1 - eps_low), "high" (A > 0, r > 1 + eps_high) and, with the
    dual clip, "dual" (A < 0, r > c). A ratio outside the band whose advantage points back
    into it keeps its gradient and is in no side. The sides never overlap."""
    sides = {"low": (advantages < 0) & (ratio < 1 - eps_low), "high": (advantages > 0) & (ratio > 1 + eps_high)}
    if dual_clip_c is not None:
        sides["dual"] = (advantages < 0) & (ratio > dual_clip_c)
    return sides


def sapo_objective(ratio: torch.Tensor, advantages: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    return sapo_gate(ratio, tau) * advantages


def clipped_objective(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None,
) -> torch.Tensor:
    """PPO-style pessimistic surrogate with asymmetric range and optional dual clip."""
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    objective = torch.minimum(unclipped, clipped)
    if dual_clip_c is not None:
        # For A < 0 the pessimistic bound can fall without limit as r grows; cap it at c * A.
        capped = torch.maximum(objective, dual_clip_c * advantages)
        objective = torch.where(advantages < 0, capped, objective)
    return objective


def gspo_token_log_ratio(log_ratio: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log s_it = sg(mean_t log r_it) + logp_it - sg(logp_it)``, per token of each row.

    ``log_ratio`` and ``logprobs`` are ``[B, T]``; ``mask`` is boolean ``[B, T]``. Masked
    positions of ``log_ratio`` must already be zero.
    """
    lengths = mask.sum(-1, keepdim=True).clamp_min(1)
    seq_log_ratio = log_ratio.sum(-1, keepdim=True) / lengths
    return seq_log_ratio.detach() + logprobs - logprobs.detach()
