"""`megatron-sapo selfcheck`: a short, built-in check of the algorithm core on this machine.

It checks the properties the trainer relies on, on synthetic data, and prints one line per
check with the measured figure: SAPO's soft gate and its gradient weight (eq. 8), that every
objective gives the plain policy gradient on-policy, that the gate gap D_i respects its bound
tau^2/4 Var_i (eq. 21), and that vocabulary-parallel log-probs on two gloo ranks equal
log_softmax over the full vocabulary.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass

import torch

from megatron_sapo.algo import gate_diagnostics, group_advantages, policy_loss, sapo_grad_weight
from megatron_sapo.config import LOSS_NAMES, LossConfig
from megatron_sapo.parallel import vocab_parallel_logprobs


@dataclass
class Check:
    name: str
    figure: float
    limit: float

    @property
    def ok(self) -> bool:
        return self.figure <= self.limit


def _batch(seed: int, spread: float):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(16, 24, generator=g, dtype=torch.float64) * 3
    logp = old + spread * torch.randn(16, 24, generator=g, dtype=torch.float64)
    rewards = (torch.rand(4, 4, generator=g) < 0.5).double()
    mask = torch.rand(16, 24, generator=g) < 0.8
    mask[:, 0] = True
    return logp, old, group_advantages(rewards).flatten(), mask


def check_gradient_weight() -> Check:
    """Autograd of the SAPO loss against w(r) r A / (N |y|) with w = sech^2(tau/2 (r-1))."""
    logp, old, adv, mask = _batch(0, spread=0.5)
    logp.requires_grad_(True)
    cfg = LossConfig()
    policy_loss(logp, old, adv, mask, cfg)[0].backward()
    ratio = torch.exp(logp.detach() - old)
    tau = torch.full_like(adv, cfg.tau_neg).masked_fill(adv > 0, cfg.tau_pos)[:, None]
    lengths = mask.sum(-1, keepdim=True)
    expected = -sapo_grad_weight(ratio, tau) * ratio * adv[:, None] / (lengths * mask.any(-1).sum())
    expected = torch.where(mask, expected, torch.zeros_like(expected))
    return Check("SAPO gradient = eq. 8 weight (max abs diff)", (logp.grad - expected).abs().max().item(), 1e-12)


def check_on_policy() -> list[Check]:
    _, old, adv, mask = _batch(1, spread=0.0)
    grads = {}
    for name in LOSS_NAMES:
        logp = old.clone().requires_grad_(True)
        policy_loss(logp, old, adv, mask, LossConfig(name=name))[0].backward()
        grads[name] = logp.grad
    lengths = mask.sum(-1, keepdim=True)
    plain = torch.where(mask, -adv[:, None] / (lengths * mask.any(-1).sum()), torch.zeros_like(old))
    return [
        Check(f"{name.upper()} at r=1 = plain policy gradient (max abs diff)", (g - plain).abs().max().item(), 1e-12)
        for name, g in grads.items()
    ]


def check_gap_bound() -> Check:
    logp, old, adv, mask = _batch(2, spread=0.3)
    diag = gate_diagnostics(logp, old, adv, mask)
    return Check("max D_i / (tau^2/4 Var_i) over 16 sequences (<= 1)", (diag.gate_gap / diag.gap_bound).max().item(), 1.0)


def _vocab_parallel_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    vocab = 1000
    logits = torch.randn(64, vocab, generator=g)
    targets = torch.randint(0, vocab, (64,), generator=g)
    width = vocab // world
    shard = logits[:, rank * width:(rank + 1) * width]
    logp, ent = vocab_parallel_logprobs(shard, targets, torch.distributed.group.WORLD, 0.7, entropy=True)
    logsm = torch.log_softmax(logits / 0.7, -1)
    diff = max((logp - logsm.gather(-1, targets[:, None]).squeeze(-1)).abs().max().item(),
               (ent + (logsm.exp() * logsm).sum(-1)).abs().max().item())
    if rank == 0:
        with open(result_file, "w") as f:
            f.write(repr(diff))
    torch.distributed.destroy_process_group()


def check_vocab_parallel() -> Check:
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result")
        torch.multiprocessing.spawn(_vocab_parallel_worker, args=(2, init_file, result_file), nprocs=2)
        with open(result_file) as f:
            diff = float(f.read())
    return Check("vocab-parallel logprob/entropy, 2 gloo ranks vs full log_softmax (fp32)", diff, 1e-5)


def gate_table() -> str:
    ratios = [0.5, 0.8, 0.9, 1.0, 1.1, 1.2, 1.5, 2.0]
    lines = [f"  {'r':<12}" + "  ".join(f"{r:>5.2f}" for r in ratios)]
    for tau in (1.0, 1.05, 4.0):
        weights = sapo_grad_weight(torch.tensor(ratios), tau)
        lines.append(f"  {f'w, tau={tau}':<12}" + "  ".join(f"{w:>5.3f}" for w in weights.tolist()))
    return "\n".join(lines)


def run() -> int:
    print("megatron-sapo self-check of the algorithm core (SAPO / GRPO / GSPO maths, vocab-parallel log-probs).")
    print("The full RL job (`megatron-sapo train`) is not part of this build yet; this check stands in for it.\n")
    print("SAPO gradient weight w(r) = sech^2(tau/2 (r-1)) (1 on-policy, soft decay off-policy):")
    print(gate_table() + "\n")
    checks = [check_gradient_weight(), *check_on_policy(), check_gap_bound(), check_vocab_parallel()]
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"  {'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.figure:.3e}  (limit {c.limit:.0e})")
    failed = sum(not c.ok for c in checks)
    print(f"\n{len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run())
