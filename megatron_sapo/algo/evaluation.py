"""Evaluation statistics over k sampled responses per problem.

For a problem with ``n`` responses of which ``c`` are correct, the unbiased estimator of pass@k
(the chance that at least one of k responses drawn without replacement is correct) is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i=0}^{k-1} (n - c - i) / (n - i),

1 when ``n - c < k``; pass@1 is ``c / n``. avg@n, the mean reward over all n responses, is
Pass@1 for a 0/1 reward.
"""

from __future__ import annotations

import math


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem with ``c`` of ``n`` responses correct (k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def sample_set_metrics(name: str, scores: list[list[float]], threshold: float = 0.5) -> dict[str, float]:
    """avg@n and pass@k (k = 1, 2, 4, ... below n, and n itself) over problems, each with its n
    responses' rewards; a response counts as correct when its reward is above ``threshold``."""
    n = len(scores[0])
    if any(len(row) != n for row in scores):
        raise ValueError("every problem needs the same number of responses")
    metrics = {f"eval_{name}_avg_at_{n}": sum(map(sum, scores)) / (n * len(scores)),
               f"eval_{name}_problems": float(len(scores))}
    correct = [sum(r > threshold for r in row) for row in scores]
    for k in sorted({*(2**i for i in range(n.bit_length()) if 2**i < n), n}):
        metrics[f"eval_{name}_pass_at_{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(scores)
    return metrics
