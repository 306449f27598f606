"""The paper's equations written out element by element in plain Python floats.

Independent of megatron_sapo on purpose: the tests compare the vectorised torch code against
these loops, never against itself.
"""

import math


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def sapo_f(r, tau):
    """Eq. 10: f(r) = sigmoid(tau (r - 1)) * 4 / tau."""
    return sigmoid(tau * (r - 1.0)) * 4.0 / tau


def sapo_weight(r, tau):
    """Eq. 8: w = 4 p (1 - p) = sech^2(tau/2 (r - 1))."""
    return 1.0 / math.cosh(tau * (r - 1.0) / 2.0) ** 2


def clip(x, lo, hi):
    return min(max(x, lo), hi)


def ppo_term(r, a, eps_low, eps_high, c=None):
    value = min(r * a, clip(r, 1 - eps_low, 1 + eps_high) * a)
    if c is not None and a < 0:
        value = max(value, c * a)
    return value


def objective(logp, old, adv, mask, name, tau_pos=1.0, tau_neg=1.05, eps_low=0.2, eps_high=0.28, c=None):
    """Eq. 5 / 10-14 with seq-mean-token-mean aggregation; rows = lists of floats."""
    per_seq = []
    for lp_row, old_row, a, m_row in zip(logp, old, adv, mask):
        idx = [t for t, m in enumerate(m_row) if m]
        if not idx:
            continue
        ratios = [math.exp(lp_row[t] - old_row[t]) for t in idx]
        if name == "sapo":
            tau = tau_pos if a > 0 else tau_neg
            terms = [sapo_f(r, tau) * a for r in ratios]
        elif name == "grpo":
            terms = [ppo_term(r, a, eps_low, eps_high, c) for r in ratios]
        elif name == "gspo":
            s = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
            terms = [ppo_term(s, a, eps_low, eps_high, c) for _ in ratios]
        elif name == "pg":  # the unclipped importance-weighted objective r * A
            terms = [r * a for r in ratios]
        per_seq.append(sum(terms) / len(terms))
    return sum(per_seq) / len(per_seq)


def sapo_grad(logp, old, adv, mask, tau_pos=1.0, tau_neg=1.05):
    """d(-J)/d logp_it = -(1/N)(1/|y_i|) w(r_it) r_it A_i for seq-mean-token-mean."""
    n = sum(1 for m_row in mask if any(m_row))
    grads = []
    for lp_row, old_row, a, m_row in zip(logp, old, adv, mask):
        length = sum(1 for m in m_row if m)
        tau = tau_pos if a > 0 else tau_neg
        row = []
        for lp, o, m in zip(lp_row, old_row, m_row):
            if not m:
                row.append(0.0)
                continue
            r = math.exp(lp - o)
            row.append(-sapo_weight(r, tau) * r * a / (n * length))
        grads.append(row)
    return grads
