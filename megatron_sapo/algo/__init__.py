"""The paper's maths in pure torch: gates, policy losses, advantages and gate diagnostics.

Nothing here imports torch.distributed or Megatron, so every formula is testable alone.
"""

from megatron_sapo.algo.advantages import group_advantages
from megatron_sapo.algo.diagnostics import (
    GateDiagnostics,
    GateRecords,
    gate_diagnostics,
    gate_engaged,
    gate_records,
    histogram,
    log_ratio_variance,
)
from megatron_sapo.algo.gates import sapo_gate, sapo_grad_weight
from megatron_sapo.algo.loss import kl_penalty, loss_normalizer, masked_mean, policy_loss

__all__ = [
    "GateDiagnostics",
    "GateRecords",
    "gate_diagnostics",
    "gate_engaged",
    "gate_records",
    "group_advantages",
    "histogram",
    "kl_penalty",
    "log_ratio_variance",
    "loss_normalizer",
    "masked_mean",
    "policy_loss",
    "sapo_gate",
    "sapo_grad_weight",
]
