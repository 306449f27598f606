"""Gate diagnostics of the paper's section 4.1, for any batch of a user's own run.

Under small steps (log r_it near 0) SAPO's token gradient weight is ``g(z_it)`` with
``g(z) = sech^2(tau z / 2)`` and ``z_it = log r_it``. Averaged over a sequence it approximates
the *sequence* gate ``g(mu_i)`` at ``mu_i = mean_t z_it = log s_i`` (GSPO's length-normalised
log ratio). Because ``|g''| <= tau^2 / 2``, a second-order expansion around ``mu_i`` bounds the gap

    D_i = | mean_t g(z_it) - g(mu_i) |  <=  tau^2 / 4 * Var_i,   Var_i = mean_t (z_it - mu_i)^2

(eq. 21). Small ``Var_i`` therefore means SAPO behaves like a smooth sequence-level gate; the
histograms of ``r_it`` and ``Var_i`` show how often a run is in that regime.

For a run's diagnostics (``megatron-sapo diagnose``) each data-parallel replica turns its rows
into :class:`GateRecords`, one entry per response token and per sequence, with whether the
objective's gate engaged (:func:`gate_engaged`), and keeps a seeded uniform sample of them; the
budget of a step is split over the replicas in proportion to their token and sequence counts
(:func:`replica_quotas`), so the union of the replicas' samples is a uniform sample of the step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from megatron_sapo.algo import gates
from megatron_sapo.algo.gates import select_tau
from megatron_sapo.config import LossConfig


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


def gate_engaged(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: LossConfig,
) -> torch.Tensor:
    """bool ``[B, T]``: the response tokens where ``cfg.name``'s gate engaged, as the loss's
    metrics count them (``algo/loss.py``), from the same clamped log-ratios:

    * "sapo": the gradient weight fell below ``gates.ATTENUATED_BELOW`` (``attenuated_frac``);
    * "grpo": the hard clip removed the token's gradient: its ratio left the band on the side its
      advantage pushes towards, or passed the dual clip (``clip_frac`` = low + high + dual);
    * "gspo": the same test on the sequence ratio ``s_i``, so every token of a sequence agrees.

    ``advantages`` is per sequence ``[B]`` or per token ``[B, T]``.
    """
    mask = loss_mask.bool()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand(mask.shape)
    advantages = advantages.detach()
    log_ratio = torch.where(mask, (logprobs - old_logprobs).detach(), torch.zeros_like(logprobs))
    log_ratio = log_ratio.clamp(-cfg.logratio_clamp, cfg.logratio_clamp)
    if cfg.name == "sapo":
        engaged = gates.sapo_attenuated(torch.exp(log_ratio), select_tau(advantages, cfg.tau_pos, cfg.tau_neg))
    else:
        if cfg.name == "gspo":
            sequence = gates.gspo_token_log_ratio(log_ratio, torch.zeros_like(log_ratio), mask)
            log_ratio = sequence.clamp(-cfg.logratio_clamp, cfg.logratio_clamp)
        sides = gates.clip_sides(torch.exp(log_ratio), advantages, cfg.eps_low, cfg.eps_high, cfg.dual_clip_c)
        engaged = torch.stack(list(sides.values())).any(0)
    return engaged & mask


@dataclass
class GateRecords:
    """Response tokens and sequences of some rows, one entry each (tokens row by row).

    A sequence is *engaged* when the gate engaged on at least one of its tokens (for GSPO: on
    all of them, its sequence ratio being clipped). Per entry this holds ``TOKEN_BYTES`` and
    ``SEQUENCE_BYTES`` bytes."""

    token_ratio: torch.Tensor
    """float32 ``r_it``."""
    token_advantage_sign: torch.Tensor
    """int8 sign (-1, 0, 1) of the token's advantage."""
    token_engaged: torch.Tensor
    """bool: the objective's gate engaged on the token (:func:`gate_engaged`)."""
    seq_log_ratio_var: torch.Tensor
    """float32 ``Var_i``."""
    seq_gate_gap: torch.Tensor
    """float32 ``D_i``."""
    seq_gap_bound: torch.Tensor
    """float32 ``tau_i^2 / 4 * Var_i``."""
    seq_tau: torch.Tensor
    """float32 SAPO temperature of the sequence (whatever the objective)."""
    seq_ratio: torch.Tensor
    """float32 length-normalised sequence ratio ``s_i = exp(mean_t log r_it)``."""
    seq_length: torch.Tensor
    """int32 response tokens in the loss."""
    seq_advantage_sign: torch.Tensor
    """int8 sign of the sequence's advantage."""
    seq_engaged: torch.Tensor
    """bool: the gate engaged on at least one of the sequence's tokens."""

    @property
    def tokens(self) -> int:
        return self.token_ratio.numel()

    @property
    def sequences(self) -> int:
        return self.seq_length.numel()

    def counts(self) -> torch.Tensor:
        """int64 ``[4]``: tokens, sequences, engaged tokens, engaged sequences."""
        return torch.tensor([self.tokens, self.sequences, int(self.token_engaged.sum()),
                             int(self.seq_engaged.sum())], dtype=torch.int64)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def sample(self, tokens: int, sequences: int, generator: torch.Generator) -> "GateRecords":
        """A uniform random subset of at most ``tokens`` tokens and ``sequences`` sequences
        (drawn independently, without replacement, kept in their order)."""
        token_index = _subset(self.tokens, tokens, generator)
        seq_index = _subset(self.sequences, sequences, generator)
        return GateRecords(**{name: value[token_index if name.startswith("token_") else seq_index]
                              for name, value in self.as_dict().items()})

    @classmethod
    def cat(cls, parts: list["GateRecords"]) -> "GateRecords":
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})


TOKEN_BYTES = 4 + 1 + 1
"""Bytes of one token of :class:`GateRecords` (ratio, advantage sign, engaged)."""
SEQUENCE_BYTES = 5 * 4 + 4 + 1 + 1
"""Bytes of one sequence (var, gap, bound, tau, ratio; length; advantage sign; engaged)."""


def gate_records(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    cfg: LossConfig,
) -> GateRecords:
    """Every response token and every sequence with response tokens of ``[B, T]`` rows
    (``advantages`` per sequence ``[B]``), on the CPU."""
    mask = loss_mask.bool()
    keep = mask.any(-1)
    diag = gate_diagnostics(logprobs, old_logprobs, advantages, mask, cfg.tau_pos, cfg.tau_neg)
    engaged = gate_engaged(logprobs, old_logprobs, advantages, mask, cfg)
    sign = torch.sign(advantages.detach()).to(torch.int8)
    lengths = mask.sum(-1)
    log_ratio = torch.where(mask, (logprobs - old_logprobs).detach().double(), torch.zeros((), dtype=torch.float64))
    seq_ratio = torch.exp(log_ratio.sum(-1) / lengths.clamp_min(1))
    rows = mask.nonzero()[:, 0]
    records = GateRecords(
        token_ratio=diag.token_ratios, token_advantage_sign=sign[rows], token_engaged=engaged[mask],
        seq_log_ratio_var=diag.log_ratio_var, seq_gate_gap=diag.gate_gap, seq_gap_bound=diag.gap_bound,
        seq_tau=diag.tau, seq_ratio=seq_ratio[keep].float(), seq_length=lengths[keep].to(torch.int32),
        seq_advantage_sign=sign[keep], seq_engaged=engaged.any(-1)[keep])
    return GateRecords(**{name: value.cpu() for name, value in records.as_dict().items()})


def replica_quotas(budget: int, counts: list[int]) -> list[int]:
    """How many of ``budget`` entries each replica keeps, given how many it has: all of them when
    the budget covers the total, else shares proportional to the counts (largest remainders
    rounded up, ties to the lower replica), which sum to ``budget`` and never exceed a count."""
    total = sum(counts)
    if budget >= total:
        return list(counts)
    quotas = [budget * count // total for count in counts]
    remainders = [budget * count % total for count in counts]
    for replica in sorted(range(len(counts)), key=lambda r: -remainders[r])[:budget - sum(quotas)]:
        quotas[replica] += 1
    return quotas


def _subset(size: int, keep: int, generator: torch.Generator) -> torch.Tensor:
    if keep >= size:
        return torch.arange(size)
    return torch.randperm(size, generator=generator)[:keep].sort().values
